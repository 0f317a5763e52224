"""Envoy's edge configuration (envoy/envoy.yaml.j2 + envoy/ferry.lua) on a real Envoy.

The configuration is validated by Envoy itself. Its error paths and request handling (Retry-After,
mid-stream errors, the OpenAI stream switch, request ids, readiness) are driven here against a
small in-process gRPC upstream that answers on demand, since the real services cannot be made to
fail at will; the real stack's paths are covered by tests/test_launcher.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from ferry.models.v1 import models_pb2, models_pb2_grpc
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from launcher.envoy import (
    DESCRIPTOR,
    described_services,
    envoy_program,
    render_envoy_config,
    upstreams,
    validate_command,
)
from services.common.errors import RpcError
from tests.stack import stack_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_NAMES = [u.health_service for u in upstreams(stack_settings(Path("/nonexistent")))]


def test_rendered_config_is_valid(tmp_path: Path) -> None:
    config = render_envoy_config(stack_settings(tmp_path))
    result = subprocess.run(validate_command(config), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_services_missing_from_the_descriptor_are_not_transcoded(tmp_path: Path) -> None:
    # Envoy refuses to start when a transcoded service is not in the descriptor set, so a
    # descriptor built before a proto exists must still give a valid configuration.
    full = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    partial = descriptor_pb2.FileDescriptorSet(
        file=[f for f in full.file if not f.name.startswith("ferry/transactions/")]
    )
    descriptor = tmp_path / "partial.pb"
    descriptor.write_bytes(partial.SerializeToString())
    assert "ferry.transactions.v1.TransactionsService" not in described_services(descriptor)

    config = render_envoy_config(stack_settings(tmp_path), descriptor)
    text = config.read_text()
    result = subprocess.run(validate_command(config), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # Still routed natively, and still health checked.
    assert 'prefix: "/ferry.transactions.v1.TransactionsService/"' in text
    assert "service_name: ferry.transactions.v1.TransactionsService" in text


# -- a real Envoy in front of a scripted upstream ------------------------------------------------


class Scripted(openai_pb2_grpc.OpenAIServiceServicer, models_pb2_grpc.ModelsServiceServicer):
    """Answers by the prompt it gets, and remembers the request metadata it saw."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def _seen(self, context: grpc.ServicerContext) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})

    def CreateCompletion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen(context)
        prompt = request.prompt.string_value
        if prompt == "busy-with-metadata":
            context.set_trailing_metadata((("retry-after", "7"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        if prompt == "busy-with-retry-info":
            error = RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "BUSY", retry_after_seconds=2.5)
            context.abort_with_status(error.to_status())
        if prompt == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        if prompt == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        return openai_pb2.Completion(id="unary", model=request.model)

    def CreateCompletionStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._seen(context)
        for i in range(3):
            yield openai_pb2.Completion(id=f"chunk-{i}", model=request.model)
            if request.prompt.string_value == "fail-midway" and i == 1:
                context.abort(grpc.StatusCode.INTERNAL, "engine died")

    def CreateChatCompletion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen(context)
        return openai_pb2.ChatCompletion(id="unary-chat")

    def CreateChatCompletionStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._seen(context)
        for i in range(2):
            yield openai_pb2.ChatCompletionChunk(id=f"chat-chunk-{i}")

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen(context)
        return models_pb2.ListModelsResponse(models=[models_pb2.Model(name="models/scripted")])


class Edge:
    def __init__(
        self, base: str, upstream: Scripted, health: health.HealthServicer, grpc_target: str
    ) -> None:
        self.base = base
        self.upstream = upstream
        self.health = health
        self.grpc_target = grpc_target


def _wait_ready(base: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("Envoy did not become ready")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    settings = stack_settings(tmp_path_factory.mktemp("edge"))
    upstream = Scripted()  # type: ignore[abstract]  # the RPCs it does not script answer UNIMPLEMENTED
    health_servicer = health.HealthServicer()
    for name in HEALTH_NAMES:
        health_servicer.set(name, SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    openai_pb2_grpc.add_OpenAIServiceServicer_to_server(upstream, server)
    models_pb2_grpc.add_ModelsServiceServicer_to_server(upstream, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # One process stands in for all four services.
    for u in upstreams(settings):
        server.add_insecure_port(u.endpoint.address)
    server.start()
    program = envoy_program(settings)
    log = (settings.log_dir / "envoy.log").open("w")
    envoy = subprocess.Popen(program.argv, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://{settings.envoy.host}:{settings.envoy.port}"
    try:
        _wait_ready(base)
        yield Edge(base, upstream, health_servicer, f"{settings.envoy.host}:{settings.envoy.port}")
    finally:
        envoy.terminate()
        envoy.wait(10)
        log.close()
        server.stop(0)


def _post(edge: Edge, path: str, body: dict[str, Any] | str, **headers: str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(
        f"{edge.base}{path}", content=content, headers={"content-type": "application/json", **headers}
    )


def test_healthz_answers_while_envoy_is_up(edge: Edge) -> None:
    assert httpx.get(f"{edge.base}/healthz").status_code == 200


def test_readyz_follows_every_cluster_health(edge: Edge) -> None:
    assert httpx.get(f"{edge.base}/readyz").status_code == 200
    edge.health.set("ferry.models.v1.ModelsService", NOT_SERVING)
    try:
        assert _status_within(f"{edge.base}/readyz", 503, seconds=5.0)
    finally:
        edge.health.set("ferry.models.v1.ModelsService", SERVING)
    assert _status_within(f"{edge.base}/readyz", 200, seconds=5.0)


def _status_within(url: str, status: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(url).status_code == status:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    ("body", "streamed"),
    [
        ({"model": "m", "prompt": "hi"}, False),
        ({"model": "m", "prompt": "hi", "stream": False}, False),
        ({"model": "m", "prompt": "hi", "stream": True}, True),
        ('{"model":"m","prompt":"hi","stream" :\n\ttrue}', True),
        # The words inside a string, or in a nested object, are not the flag.
        ({"model": "m", "prompt": 'say "stream": true', "stream": False}, False),
        ({"model": "m", "prompt": '{"stream":true}'}, False),
        ({"model": "m", "prompt": 'escaped \\" "stream": true', "stop": ["stream"]}, False),
        ({"model": "m", "prompt": "hi", "stream_options": {"stream": True}}, False),
        ({"model": "m", "prompt": 'x "stream": true', "stream": True}, True),
    ],
)
def test_openai_stream_flag_selects_the_streaming_rpc(edge: Edge, body: Any, streamed: bool) -> None:
    response = _post(edge, "/v1/completions", body)
    assert response.status_code == 200, response.text
    if streamed:
        assert response.headers["content-type"] == "text/event-stream"
        events = [e for e in response.text.split("\n\n") if e]
        assert [json.loads(e.removeprefix("data: "))["id"] for e in events] == [
            "chunk-0",
            "chunk-1",
            "chunk-2",
        ]
    else:
        assert response.headers["content-type"] == "application/json"
        assert response.json()["id"] == "unary"


def test_chat_completions_stream_as_server_sent_events(edge: Edge) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = _post(edge, "/v1/chat/completions", body)
    assert response.headers["content-type"] == "text/event-stream"
    # OpenAI's framing: `data: <json>` and a blank line per event.
    events = response.text.split("\n\n")
    assert events[-1] == ""
    assert [json.loads(e.removeprefix("data: "))["id"] for e in events[:-1]] == [
        "chat-chunk-0",
        "chat-chunk-1",
    ]


def test_mid_stream_error_reaches_http1_clients_as_trailers(edge: Edge) -> None:
    host, port = edge.grpc_target.split(":")
    body = json.dumps({"model": "m", "prompt": "fail-midway", "stream": True}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"TE: trailers\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    text = raw.decode()
    assert text.startswith("HTTP/1.1 200")
    assert "chunk-1" in text
    assert "chunk-2" not in text
    # The chunked body ends with trailers naming the failure, not a silent clean end.
    trailers = text.rsplit("\r\n0\r\n", 1)[1]
    assert "grpc-status: 13" in trailers
    assert "engine died" in trailers


@pytest.mark.parametrize(
    ("prompt", "status", "retry_after"),
    [
        ("busy-with-metadata", 429, "7"),  # the service's own `retry-after` metadata wins
        ("busy-with-retry-info", 429, "3"),  # google.rpc.RetryInfo 2.5 s, rounded up
        ("busy", 429, "1"),  # nothing said: one second
        ("unavailable", 503, None),  # a 503 gets one only when the service says when
    ],
)
def test_retry_after(edge: Edge, prompt: str, status: int, retry_after: str | None) -> None:
    response = _post(edge, "/v1/completions", {"model": "m", "prompt": prompt})
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert response.headers["content-type"] == "application/json"
    assert response.json()["message"] in {"busy", "try later"}


def test_error_details_are_rendered_as_json(edge: Edge) -> None:
    response = _post(edge, "/v1/completions", {"model": "m", "prompt": "busy-with-retry-info"})
    details = {d["@type"].rsplit("/", 1)[1]: d for d in response.json()["details"]}
    assert details["google.rpc.ErrorInfo"]["reason"] == "BUSY"
    assert details["google.rpc.ErrorInfo"]["domain"] == "ferry.dev"
    assert details["google.rpc.RetryInfo"]["retry_delay"] == "2.500s"


def test_request_id_is_kept_when_well_formed_and_made_otherwise(edge: Edge) -> None:
    kept = httpx.get(f"{edge.base}/api/v1/models", headers={"x-request-id": "client-id.1:2"})
    assert kept.headers["x-request-id"] == "client-id.1:2"
    assert edge.upstream.metadata[-1]["x-request-id"] == "client-id.1:2"

    for bad in ["has spaces", "x" * 200, "semi;colon"]:
        replaced = httpx.get(f"{edge.base}/api/v1/models", headers={"x-request-id": bad})
        assert replaced.headers["x-request-id"] != bad
        assert len(replaced.headers["x-request-id"]) == 36  # a UUID
        assert edge.upstream.metadata[-1]["x-request-id"] == replaced.headers["x-request-id"]

    made = httpx.get(f"{edge.base}/api/v1/models")
    assert len(made.headers["x-request-id"]) == 36
    assert edge.upstream.metadata[-1]["x-request-id"] == made.headers["x-request-id"]


def test_field_names_and_defaults_are_printed(edge: Edge) -> None:
    model = httpx.get(f"{edge.base}/api/v1/models").json()["models"][0]
    # preserve_proto_field_names and always_print_primitive_fields
    assert model["name"] == "models/scripted"
    assert model["state_reason"] == ""
    assert model["context_length"] == 0


def test_unknown_paths_and_query_parameters(edge: Edge) -> None:
    assert httpx.get(f"{edge.base}/api/v1/nothing-here").status_code == 404
    bad_query = httpx.get(f"{edge.base}/api/v1/models", params={"bogus": "1"})
    assert bad_query.status_code == 400
    assert "bogus" in bad_query.text


def test_native_grpc_passes_through_the_same_listener(edge: Edge) -> None:
    with grpc.insecure_channel(edge.grpc_target) as channel:
        models = models_pb2_grpc.ModelsServiceStub(channel).ListModels(
            models_pb2.ListModelsRequest(), metadata=[("x-request-id", "native-1")], timeout=5
        )
        chunks = list(
            openai_pb2_grpc.OpenAIServiceStub(channel).CreateCompletionStream(
                openai_pb2.CreateCompletionRequest(model="m"), timeout=5
            )
        )
    assert [m.name for m in models.models] == ["models/scripted"]
    assert edge.upstream.metadata[-2]["x-request-id"] == "native-1"
    assert [c.id for c in chunks] == ["chunk-0", "chunk-1", "chunk-2"]


@pytest.mark.parametrize(
    "method",
    [
        "/ferry.audit.v1.AuditService/AppendEvents",
        "/ferry.transactions.v1.TransactionsService/CreateTransaction",
        "/ferry.transactions.v1.TransactionsService/CompleteTransaction",
    ],
)
def test_internal_record_methods_are_refused_at_the_edge(edge: Edge, method: str) -> None:
    """Only ferry's own processes deliver records (directly to the service port): no forging via Envoy."""
    with grpc.insecure_channel(edge.grpc_target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
