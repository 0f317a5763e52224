"""Overload refused at the edge: generations beyond the fleet's admission capacity are refused by Envoy
itself (the generation cluster's circuit breaker, response flag UO) with the service's own OVERLOADED
answer, without the inference service seeing them; reads and embeddings never count.

The configuration tests render Envoy's file; the stack test runs a stack of its own (one trivial
streaming model of 2 slots and 2 queue places: the fleet admits 4) and sends a burst beside 4 held
generations.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from ferry.inference.v1 import inference_pb2 as pb
from ferry.inference.v1 import inference_pb2_grpc
from google.protobuf import text_format
from google.rpc import error_details_pb2
from tritonclient.grpc import model_config_pb2

from launcher import envoy
from services.common.config import REPO_ROOT, Settings, UpstreamModel
from services.common.errors import CATALOGUE, DEFAULT_RETRY_AFTER_SECONDS, DOMAIN, Reason, error_details
from services.common.triton_client import ModelInfo, _capabilities
from services.inference.admission import Admissions
from tests.inference.conftest import Metrics
from tests.inference.test_capacity_stack import until
from tests.stack import RunningStack, running_stack, scratch_home, stack_settings

DESCRIPTOR = REPO_ROOT / "build" / "ferry.pb"
SLOW_MODEL = REPO_ROOT / "tests" / "resilience" / "models" / "slow-stream"
MODEL = "edge-stream"
SLOTS, QUEUED = 2, 2
CAPACITY = SLOTS + QUEUED
HELD_TOKENS = 100  # 50 ms each: the held generations outlast the burst by seconds
READY_TIMEOUT_SECONDS = 240.0


# -- configuration -------------------------------------------------------------------------------------


def rendered(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(envoy.render_envoy_config(settings, DESCRIPTOR).read_text())
    return config


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def route_cluster(config: dict[str, Any], path: str) -> str:
    (edge,) = [lis for lis in config["static_resources"]["listeners"] if lis["name"] == "edge"]
    manager = edge["filter_chains"][0]["filters"][0]["typed_config"]
    for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
        match = route["match"]
        if "headers" in match:
            continue
        if match.get("path") == path or path.startswith(match.get("prefix", "\0")):
            cluster: str = route["route"]["cluster"]
            return cluster
    raise AssertionError(f"no route for {path}")


def max_requests(config: dict[str, Any], name: str) -> int:
    (thresholds,) = clusters(config)[name]["circuit_breakers"]["thresholds"]
    return int(thresholds["max_requests"])


def service_capacity(settings: Settings) -> int:
    """What the inference service admits, by its own code: every generation model of the repository
    (config.pbtxt read by Triton's own schema, sized by Admissions.limits), times the replicas."""
    admissions = Admissions(settings.inference)
    total = 0
    for path in sorted(settings.triton.repository.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        params = {k: v.string_value for k, v in config.parameters.items()}
        capabilities = _capabilities(params.get("capabilities"))
        if not {"completion", "chat"} & capabilities:
            continue
        slots = int(params.get("n_parallel") or params.get("concurrent_requests") or 1)
        info = ModelInfo(path.parent.name, config.backend, 0, 0, "", "", slots, capabilities)
        in_flight, queued = admissions.limits(info)
        total += in_flight + queued
    return total * settings.inference.replicas


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"auth": {"service_token": "token"}, **overrides}
    return Settings(home=tmp_path / "home", **values)


def test_generations_have_a_cluster_of_their_own_and_reads_and_embeddings_do_not(tmp_path: Path) -> None:
    config = rendered(settings_for(tmp_path))
    for service, methods in envoy.GENERATION_METHODS.items():
        for method in methods:
            assert route_cluster(config, f"/{service}/{method}") == envoy.GENERATION_CLUSTER, method
    for path in (
        "/ferry.inference.v1.InferenceService/Embed",
        "/ferry.openai.v1.OpenAIService/CreateEmbedding",
        "/ferry.openai.v1.OpenAIService/ListModels",
        "/ferry.openai.v1.OpenAIService/RetrieveModel",
    ):
        assert route_cluster(config, path) == "inference", path
    # The same replicas, health check and outlier detection as the inference cluster.
    own, generation = clusters(config)["inference"], clusters(config)[envoy.GENERATION_CLUSTER]
    for key in ("load_assignment", "health_checks", "outlier_detection", "typed_extension_protocol_options"):
        expected = own[key] if key != "load_assignment" else {**own[key], "cluster_name": generation["name"]}
        assert generation[key] == expected, key


def test_the_edge_limit_is_what_the_inference_services_admit(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, inference={"replicas": 3})
    derived = service_capacity(settings)
    # Gemma and SmolLM2 (4 slots, 32 queued each), the embedding model not counted; three replicas.
    assert derived == 3 * (36 + 36)
    assert max_requests(rendered(settings), envoy.GENERATION_CLUSTER) == derived
    # Configured admission bounds apply to every model, as in the service.
    settings = settings_for(tmp_path, inference={"max_in_flight": 2, "max_queued": 1})
    assert max_requests(rendered(settings), envoy.GENERATION_CLUSTER) == service_capacity(settings) == 6
    # An upstream model's slots are its max_in_flight.
    upstream = {"remote": UpstreamModel(base_url="http://127.0.0.1:9/v1", max_in_flight=3)}
    settings = settings_for(tmp_path, upstream_models=upstream)
    assert max_requests(rendered(settings), envoy.GENERATION_CLUSTER) == 72 + 3 + 24


def test_an_unknown_fleet_keeps_the_old_ceiling_and_the_operator_may_set_it(tmp_path: Path) -> None:
    # Replicas behind a DNS name (Compose, Kubernetes): the pod count is not known here.
    dns = settings_for(tmp_path, inference={"host": "inference"})
    assert max_requests(rendered(dns), envoy.GENERATION_CLUSTER) == envoy.LIMITS["inference"].max_requests
    remote = settings_for(tmp_path, triton={"repository": tmp_path / "nowhere"})
    assert max_requests(rendered(remote), envoy.GENERATION_CLUSTER) == envoy.LIMITS["inference"].max_requests
    # A Triton elsewhere serves its own repository, whatever folder this checkout has.
    elsewhere = settings_for(tmp_path, triton={"host": "10.1.2.3"})
    assert (
        max_requests(rendered(elsewhere), envoy.GENERATION_CLUSTER) == envoy.LIMITS["inference"].max_requests
    )
    configured = settings_for(
        tmp_path, inference={"host": "inference"}, envoy={"generation_max_requests": 40}
    )
    assert max_requests(rendered(configured), envoy.GENERATION_CLUSTER) == 40
    # The embeddings and reads cluster keeps its own limit.
    assert max_requests(rendered(configured), "inference") == envoy.LIMITS["inference"].max_requests


def test_a_commented_out_parameter_is_not_read(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "m"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "m"  # a model\'s "name"\n'
        '# parameters { key: "n_parallel" value: { string_value: "64" } }\n'
        'parameters { key: "chat_template" value: { string_value: "{# x #} \\"#\\"" } }\n'
        'parameters { key: "n_parallel" value: { string_value: "3" } }\n'
    )
    assert envoy.repository_generation_slots(tmp_path / "repo") == {"m": 3}


def test_the_edge_refusal_is_the_services_overloaded() -> None:
    entry = CATALOGUE[Reason.OVERLOADED]
    assert (envoy.ERROR_DOMAIN, envoy.OVERLOADED) == (DOMAIN, Reason.OVERLOADED.value)
    overload = envoy.Overload(72)
    assert (overload.openai_type, overload.openai_code) == (entry.openai_type, entry.openai_code)
    assert entry.retryable and overload.retry_after == DEFAULT_RETRY_AFTER_SECONDS
    assert entry.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- on a stack ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack serving one model of 2 slots with 2 queue places: the fleet admits 4 generations."""
    repository = tmp_path_factory.mktemp("edge-models")
    model = repository / MODEL
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").symlink_to((SLOW_MODEL / "1" / "model.py").resolve())
    config = (SLOW_MODEL / "config.pbtxt").read_text()
    config = config.replace('name: "slow-stream"', f'name: "{MODEL}"')
    config = config.replace('string_value: "16"', f'string_value: "{SLOTS}"')
    assert f'"n_parallel" value: {{ string_value: "{SLOTS}" }}' in config
    (model / "config.pbtxt").write_text(config)
    scratch, home = scratch_home("ferry-edge-overload-")
    settings = stack_settings(
        home,
        triton={"repository": repository, "default_model": MODEL, "load_models": [MODEL]},
        inference={"max_queued": QUEUED},
    )
    with running_stack(settings, READY_TIMEOUT_SECONDS) as running:
        yield running
    shutil.rmtree(scratch, ignore_errors=True)


def test_the_edge_limit_is_the_capacity_the_service_reports(edge_stack: RunningStack) -> None:
    metrics = Metrics(edge_stack.metrics_urls["inference"])
    in_flight = metrics.value("ferry_inference_admission_limit", model=MODEL, kind="in_flight")
    queued = metrics.value("ferry_inference_admission_limit", model=MODEL, kind="queued")
    assert (in_flight, queued) == (SLOTS, QUEUED)
    page = httpx.get(f"{edge_stack.envoy_admin}/clusters", timeout=5).text
    assert f"{envoy.GENERATION_CLUSTER}::default_priority::max_requests::{CAPACITY}" in page


def admitted(metrics: Metrics) -> Callable[[], bool]:
    def check() -> bool:
        return (
            metrics.value("ferry_inference_requests_in_flight", model=MODEL) == SLOTS
            and metrics.value("ferry_inference_requests_queued", model=MODEL) == QUEUED
        )

    return check


async def test_a_burst_beyond_capacity_is_refused_by_envoy_as_the_service_would(
    edge_stack: RunningStack,
) -> None:
    stack = edge_stack
    metrics = Metrics(stack.metrics_urls["inference"])
    # Beyond max_requests (active), or beyond max_pending_requests (the same number) while Envoy's
    # connection to the replica is still opening: both are the cluster's circuit breaker.
    overflows = [
        f"cluster.{envoy.GENERATION_CLUSTER}.upstream_rq_active_overflow",
        f"cluster.{envoy.GENERATION_CLUSTER}.upstream_rq_pending_overflow",
    ]
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with (
        stack.async_http(limits=limits, timeout=120) as http,
        stack.aio_channel(stack.grpc_target) as channel,
    ):
        native = inference_pb2_grpc.InferenceServiceStub(channel)
        body = {"model": MODEL, "prompt": "x", "max_tokens": HELD_TOKENS, "stream": True}

        async def hold() -> str:
            """One held generation, read to its end: its text."""
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                events = [line async for line in response.aiter_lines() if line.startswith("data:")]
            assert events[-1] == "data: [DONE]"
            return "".join(json.loads(e[5:])["choices"][0]["text"] for e in events[:-1])

        held = [asyncio.create_task(hold()) for _ in range(CAPACITY)]
        try:
            await until(admitted(metrics), 60.0, f"{SLOTS} running and {QUEUED} queued")
            overflow_before = sum(stack.envoy_stat(name) for name in overflows)
            refused_before = metrics.value("ferry_inference_requests_total", outcome="resource_exhausted")

            one = {"model": MODEL, "prompt": "x", "max_tokens": 1}
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
            rest = [http.post("/v1/completions", json=one) for _ in range(8)]
            rest += [http.post("/v1/chat/completions", json=chat | {"stream": True}) for _ in range(4)]
            api = [http.post(f"/api/v1/models/{MODEL}:generate", json={"prompt": "x"}) for _ in range(4)]
            request = pb.GenerateRequest(
                model=f"models/{MODEL}", prompt="x", sampling=pb.SamplingParams(max_tokens=1)
            )
            calls = [native.Generate(request, timeout=60) for _ in range(8)]
            answers = await asyncio.gather(*rest, *api, *calls, return_exceptions=True)
            rest_answers, api_answers = answers[: len(rest)], answers[len(rest) : len(rest) + len(api)]
            grpc_answers = answers[len(rest) + len(api) :]
            refusals = 0
            refused_by_kind = {"rest": 0, "api": 0, "grpc": 0}

            # REST /v1/*: 429, Retry-After and OpenAI's error object with the service's type and code.
            for answer in rest_answers:
                assert isinstance(answer, httpx.Response), answer
                if answer.status_code == 200:  # admitted once a held generation ended: served
                    continue
                refusals += 1
                refused_by_kind["rest"] += 1
                assert answer.status_code == 429, answer.text
                assert int(answer.headers["retry-after"]) >= 1
                assert answer.headers["content-type"].startswith("application/json")
                error = answer.json()["error"]
                assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded"), error
                assert "overloaded" in error["message"]
            # ferry's API: google.rpc.Status JSON with the ErrorInfo and RetryInfo.
            for answer in api_answers:
                assert isinstance(answer, httpx.Response), answer
                if answer.status_code == 200:
                    continue
                refusals += 1
                refused_by_kind["api"] += 1
                assert answer.status_code == 429, answer.text
                assert int(answer.headers["retry-after"]) >= 1
                status = answer.json()
                assert status["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                details = {d["@type"].rsplit(".", 1)[1]: d for d in status["details"]}
                assert (details["ErrorInfo"]["reason"], details["ErrorInfo"]["domain"]) == (
                    "OVERLOADED",
                    DOMAIN,
                )
                assert details["RetryInfo"]["retry_delay"] == "1s"
            # Native gRPC: RESOURCE_EXHAUSTED with ErrorInfo, RetryInfo and retry-after.
            for answer in grpc_answers:
                if isinstance(answer, pb.GenerateResponse):
                    continue
                assert isinstance(answer, grpc.RpcError), answer  # ferry_client's ResourceExhausted
                refusals += 1
                refused_by_kind["grpc"] += 1
                assert answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
                found = error_details(answer)
                info, retry = found["ErrorInfo"], found["RetryInfo"]
                assert isinstance(info, error_details_pb2.ErrorInfo)
                assert isinstance(retry, error_details_pb2.RetryInfo)
                assert (info.reason, info.domain) == ("OVERLOADED", DOMAIN)
                assert retry.retry_delay.seconds >= 1
                trailers = dict(answer.trailing_metadata() or ())
                assert int(trailers["retry-after"]) >= 1
            # Refused by Envoy: its overflow counted each one, the service refused none of them.
            # Every kind of caller met the edge's refusal (the held generations fill the capacity).
            assert all(refused_by_kind.values()), refused_by_kind
            assert sum(stack.envoy_stat(name) for name in overflows) - overflow_before == refusals
            assert (
                metrics.value("ferry_inference_requests_total", outcome="resource_exhausted")
                == refused_before
            )

            # The held generations are served to their end.
            texts = await asyncio.gather(*held)
            assert [t.count("tok") for t in texts] == [HELD_TOKENS] * CAPACITY
        finally:
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
    # Not retried, and no replica ejected for it.
    assert stack.envoy_stat(f"cluster.{envoy.GENERATION_CLUSTER}.upstream_rq_retry") == 0
    assert (
        stack.envoy_stat(f"cluster.{envoy.GENERATION_CLUSTER}.outlier_detection.ejections_enforced_total")
        == 0
    )
