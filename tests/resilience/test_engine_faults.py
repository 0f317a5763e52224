"""Triton as a user would find it on the package's shared stack (tests/resilience/conftest.py; test
models under tests/resilience/models, one " tok" every 50 ms, so generations are still streaming when
Triton dies; two replicas of the inference and models services):

- Nobody gets around the edge: Triton's gRPC and HTTP endpoints refuse inference, the repository
  index, load and unload to a caller without the per-start access secret, and grant them with it
  (so the refusal is the secret); health stays open for probes.
- Triton killed (SIGKILL) under streaming load: every generation in flight ends with UNAVAILABLE and
  a retry hint, `/readyz` turns 503 and back to 200, generation serves again (the time from the kill
  to the first answer is printed: `pytest -s`), and the model loaded through LoadModel before the crash
  is loaded again after it, audited as the `system` principal.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from ferry.inference.v1 import inference_pb2 as pb
from ferry.inference.v1 import inference_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from services.common.errors import error_details
from services.common.triton_client import access_headers, http_access_headers
from tests.resilience.support import SLOW_MODEL, wait_for
from tests.stack import RunningStack

pytestmark = pytest.mark.stack

MODEL = SLOW_MODEL  # loaded at start (triton.load_models)
SPARE = "spare-stream"  # loaded later, through LoadModel
# Generous bounds for a loaded 2-core machine; the measured figure is printed.
RECOVERY_BOUND_SECONDS = 90.0
STREAMS = 4
LONG = 2000  # tokens at 50 ms each: far longer than the test


# -- Triton directly ------------------------------------------------------------------------------


def _stream_request(model: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, value in (("text_input", "hello"), ("sampling_parameters", json.dumps({"max_tokens": 2}))):
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        request.raw_input_contents.append(
            serialize_byte_tensor(np.array([value.encode()], dtype=np.object_)).item()
        )
    return request


def grpc_calls(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, metadata: list[tuple[str, str]]
) -> dict[str, Any]:
    """Each call Triton must guard, made with `metadata`: the error code, or "OK"."""
    calls: dict[str, Callable[[], Any]] = {
        "index": lambda: stub.RepositoryIndex(
            service_pb2.RepositoryIndexRequest(), metadata=metadata, timeout=30
        ),
        "load": lambda: stub.RepositoryModelLoad(
            service_pb2.RepositoryModelLoadRequest(model_name=SPARE), metadata=metadata, timeout=60
        ),
        "unload": lambda: stub.RepositoryModelUnload(
            service_pb2.RepositoryModelUnloadRequest(model_name=SPARE), metadata=metadata, timeout=60
        ),
        "inference": lambda: list(
            stub.ModelStreamInfer(iter([_stream_request(MODEL)]), metadata=metadata, timeout=30)
        ),
        "model config": lambda: stub.ModelConfig(
            service_pb2.ModelConfigRequest(name=MODEL), metadata=metadata, timeout=30
        ),
    }
    outcome: dict[str, Any] = {}
    for name, call in calls.items():
        try:
            result = call()
        except grpc.RpcError as err:
            outcome[name] = (err.code(), err.details())
            continue
        if name == "inference":
            errors = [r.error_message for r in result if r.error_message]
            outcome[name] = ("OK", len(result)) if not errors else ("STREAM ERROR", errors[0])
        else:
            outcome[name] = ("OK", "")
    return outcome


def test_triton_grpc_refuses_callers_without_the_secret(stack: RunningStack) -> None:
    secret = list(access_headers(stack.stack.settings.triton).items())
    assert secret, "the launcher gives every start an access secret"
    with grpc.insecure_channel(stack.triton_grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        refused = grpc_calls(stub, [])
        wrong = grpc_calls(stub, [(secret[0][0], "not-the-secret")])
        granted = grpc_calls(stub, secret)
        # Health stays open (probes, the models service's liveness watch).
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
        model_ready = stub.ModelReady(service_pb2.ModelReadyRequest(name=MODEL), metadata=secret, timeout=10)
    print(f"\nwithout the secret: {refused}\nwith a wrong one: {wrong}\nwith it: {granted}")
    for outcome in (refused, wrong):
        for call, (code, details) in outcome.items():
            # Triton answers a restricted protocol with UNAVAILABLE naming the header it expects.
            assert code == grpc.StatusCode.UNAVAILABLE and "restricted" in details, (call, code, details)
    for call, (code, _) in granted.items():
        assert code == "OK", (call, granted[call])
    # The unload refused above did nothing: ferry's model still serves.
    assert model_ready.ready


def test_triton_http_refuses_callers_without_the_secret(stack: RunningStack) -> None:
    triton = stack.settings.triton
    base = f"http://{triton.host}:{triton.http_port}"
    calls = {
        "index": ("POST", "/v2/repository/index", None),
        "load": ("POST", f"/v2/repository/models/{SPARE}/load", None),
        "unload": ("POST", f"/v2/repository/models/{SPARE}/unload", None),
        "inference": ("POST", f"/v2/models/{MODEL}/generate", {"text_input": "hi", "max_tokens": 2}),
        "model config": ("GET", f"/v2/models/{MODEL}/config", None),
    }
    with httpx.Client(base_url=base, timeout=60) as http:
        refused = {name: http.request(m, p, json=b) for name, (m, p, b) in calls.items()}
        granted = {
            name: http.request(m, p, json=b, headers=http_access_headers(stack.stack.settings.triton))
            for name, (m, p, b) in calls.items()
        }
        live = http.get("/v2/health/live")
    print({name: (r.status_code, r.text[:80]) for name, r in refused.items()})
    print({name: (r.status_code, r.text[:80]) for name, r in granted.items()})
    for name, response in refused.items():
        assert response.status_code == 403 and "restricted" in response.text, (name, response.text)
    for name, response in granted.items():
        # Reached: a decoupled model refuses /generate itself (400, "decoupled"), never "restricted".
        assert response.status_code != 403 and "restricted" not in response.text, (name, response.text)
        if name != "inference":
            assert response.status_code == 200, (name, response.text)
    assert live.status_code == 200  # health stays open: probes and the backend's shutdown monitor


# -- Triton killed under load ---------------------------------------------------------------------


async def _stream(stub: inference_pb2_grpc.InferenceServiceStub, model: str, started: asyncio.Event) -> Any:
    """A long generation through Envoy; returns the RpcError it ended with (or the finish)."""
    call = stub.GenerateStream(
        pb.GenerateRequest(model=f"models/{model}", prompt="go", sampling=pb.SamplingParams(max_tokens=LONG)),
        timeout=240,
    )
    pieces = 0
    try:
        async for _ in call:
            pieces += 1
            if pieces == 1:
                started.set()
    except grpc.RpcError as err:  # ferry-client's FerryError (a grpc.RpcError) on stack.aio_channel()
        return err, pieces
    return None, pieces


def _generates(stack: RunningStack, model: str) -> bool:
    try:
        with stack.http() as http:
            response = http.post(
                "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=10
            )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _model_state(stack: RunningStack, model: str) -> str:
    with stack.http() as http:
        response = http.get(f"/api/v1/models/{model}", timeout=10)
    return (
        str(response.json().get("state", ""))
        if response.status_code == 200
        else f"HTTP {response.status_code}"
    )


def _readyz(stack: RunningStack) -> int:
    try:
        return httpx.get(f"{stack.rest}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_triton_killed_under_load(stack: RunningStack) -> None:
    # A model loaded through the models service (audited with the caller) before the crash.
    with stack.http() as http:
        loaded = http.post(f"/api/v1/models/{SPARE}:load", json={}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["state"] == "STATE_READY"
    assert _generates(stack, SPARE)

    async def load_and_kill() -> tuple[list[Any], httpx.Response, float]:
        async with stack.aio_channel() as channel, stack.async_http(timeout=240) as rest:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            # A unary REST generation in flight too (it answers only at its end, or at its failure).
            unary = asyncio.create_task(
                rest.post("/v1/completions", json={"model": MODEL, "prompt": "go", "max_tokens": LONG})
            )
            events = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [
                asyncio.create_task(_stream(stub, MODEL if i % 2 == 0 else SPARE, events[i]))
                for i in range(STREAMS)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            pid = stack.supervisor().pid("triton")
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return list(results), await asyncio.wait_for(unary, 60), killed

    results, unary, killed = asyncio.run(load_and_kill())
    # REST: 503 with Retry-After and OpenAI's error body.
    assert unary.status_code == 503, unary.text
    assert int(unary.headers["retry-after"]) >= 1
    print(
        f"\nREST in flight: {unary.status_code} Retry-After {unary.headers['retry-after']}: {unary.text[:160]}"
    )
    ended = time.monotonic() - killed
    for err, pieces in results:
        assert err is not None, f"a stream finished although Triton was killed under it ({pieces} pieces)"
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        details = error_details(err)
        assert details["RetryInfo"].retry_delay.seconds >= 1  # type: ignore[attr-defined]
        trailers = dict(err.trailing_metadata() or ())
        assert int(trailers["retry-after"]) >= 1, trailers
    print(
        f"\n{STREAMS} streams in flight ended UNAVAILABLE with a retry hint {ended:.2f} s after the kill: "
        f"{[(e.details(), n) for e, n in results]}"
    )

    # /readyz goes 503 while Triton is away, then 200; generation serves again.
    went_down = wait_for(lambda: _readyz(stack) == 503, 30, "/readyz 503 after the kill", every=0.05)
    first_answer = wait_for(lambda: _generates(stack, MODEL), RECOVERY_BOUND_SECONDS, "generation again", 0.1)
    crash_to_answer = time.monotonic() - killed
    ready_again = wait_for(lambda: _readyz(stack) == 200, RECOVERY_BOUND_SECONDS, "/readyz 200 again")
    crash_to_ready = time.monotonic() - killed
    # The model loaded through LoadModel is back (the models service restores it).
    wait_for(lambda: _model_state(stack, SPARE) == "STATE_READY", 60, f"{SPARE} loaded again")
    crash_to_spare = time.monotonic() - killed
    assert _generates(stack, SPARE)
    print(
        f"Triton SIGKILL -> /readyz 503 within {went_down:.2f} s of the streams ending; first successful "
        f"answer {crash_to_answer:.2f} s after the kill; /readyz 200 at {crash_to_ready:.2f} s "
        f"(+{ready_again:.2f}); {SPARE} READY again at {crash_to_spare:.2f} s (first answer loop took "
        f"{first_answer:.2f} s)"
    )

    # Both loads of the restart are audited as the system principal, after the caller's LoadModel.
    def audited() -> dict[str, list[dict[str, Any]]]:
        with stack.http() as http:
            events = (
                http.get(
                    "/api/v1/audit/events",
                    params={"filter": 'kind = OPERATIONAL AND action = "model.load"', "page_size": 100},
                )
                .json()
                .get("events", [])
            )
        by_model: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            by_model.setdefault(event.get("resource", ""), []).append(event)
        return by_model

    def restart_loads() -> bool:
        events = audited()
        return all(
            any(
                e.get("attributes", {}).get("trigger") == "triton_restart"
                for e in events.get(f"models/{m}", [])
            )
            for m in (MODEL, SPARE)
        )

    wait_for(restart_loads, 30, "the restart's loads in the audit trail", every=0.5)
    for model in (MODEL, SPARE):
        event = next(
            e
            for e in audited()[f"models/{model}"]
            if e.get("attributes", {}).get("trigger") == "triton_restart"
        )
        assert event["principal"] == "system"
