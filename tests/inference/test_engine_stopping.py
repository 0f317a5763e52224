"""Triton stopping while generations stream: every caller gets a retryable UNAVAILABLE, and the stack
recovers once Triton is back.

What each client gets when Triton is stopped (SIGTERM through the stack's supervisor) under a stream
that has started. The backend's shutdown monitor (backends/llamacpp/shutdown.py) sees the server exiting
within about half a second and ends every stream in flight with its MODEL_UNLOADING fault ("the model is
being unloaded; retry shortly"). In about one run in seven Triton's gRPC server closes the connection
first (GOAWAY), and the service answers that the engine stopped answering. Both paths are the same
code (UNAVAILABLE), reason (ENGINE_UNAVAILABLE) and retry hint; the test accepts either and prints which
one each client took.
- REST (SSE): the response is already `200 text/event-stream`, so the failure arrives as a last event
  `{"error": {"type": "server_error", "code": "engine_unavailable", "message": ...}}`; there is no
  Retry-After header on a stream that has started (the headers are gone). A request sent while Triton
  is down is a plain `503` with `Retry-After` (reason TRITON_UNAVAILABLE).
- OpenAI SDK: raises `openai.APIError` from the iterator, `body["code"] == "engine_unavailable"`.
- native gRPC: the stream ends with UNAVAILABLE, ErrorInfo reason ENGINE_UNAVAILABLE, RetryInfo and a
  `retry-after` trailer.

Uses the session's stack and restarts Triton before it returns (model READY, services SERVING), so
the tests after it run against a whole stack.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import openai
import pytest
from ferry.inference.v1 import inference_pb2 as pb
from ferry.inference.v1 import inference_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends.llamacpp.faults import RETRY_AFTER_SECONDS, model_unloading
from services.common.errors import DEFAULT_RETRY_AFTER_SECONDS, error_details
from tests.stack import RunningStack

pytestmark = pytest.mark.stack

LONG = 4000  # tokens: far more than a stream produces before Triton is stopped under it
STARTED_WITHIN = 60.0
ENDED_WITHIN = 60.0

# The two ways a stream in flight learns that Triton stops, by the caller's message.
UNLOADING = "MODEL_UNLOADING fault"
CONNECTION_CLOSED = "connection closed first (GOAWAY)"
# The service's message when Triton's stream breaks (engine_errors.FAILURES, EngineUnreachable).
STOPPED_ANSWERING = "the engine stopped answering"


def path_taken(client: str, message: str) -> str:
    """Which of the two paths a client's error came by (printed: `pytest -s` shows it)."""
    if message == model_unloading().message:
        path = UNLOADING
    elif message.startswith(STOPPED_ANSWERING):
        path = CONNECTION_CLOSED
    else:
        raise AssertionError(f"{client}: neither the backend's fault nor a closed connection: {message!r}")
    print(f"{client}: {path}: {message}")
    return path


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def model_serving(stack: RunningStack) -> Callable[[], bool]:
    health = health_pb2_grpc.HealthStub(stack.channel(stack.service_targets["inference"]))

    def check() -> bool:
        request = health_pb2.HealthCheckRequest(service="ferry.inference.v1.InferenceService")
        try:
            return health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    return check


async def rest_stream(http: httpx.AsyncClient, model: str, started: asyncio.Event) -> tuple[int, list[Any]]:
    """A raw SSE chat completion: (HTTP status, every `data:` event), read until the stream ends."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[Any] = []
    async with http.stream("POST", "/v1/chat/completions", json=body, timeout=120) as response:
        try:
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    events.append(json.loads(line[5:]))
                    started.set()
        except httpx.HTTPError:
            pass  # the stream may end abruptly after its error event; the events are what counts
        return response.status_code, events


async def sdk_stream(sdk: openai.AsyncOpenAI, model: str, started: asyncio.Event) -> openai.APIError:
    stream = await sdk.completions.create(
        model=model, prompt="Once upon a time", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
    )
    try:
        async for _chunk in stream:
            started.set()
    except openai.APIError as err:
        return err
    raise AssertionError("the SDK stream ended without an error")


async def native_stream(
    native: inference_pb2_grpc.InferenceServiceStub, model: str, started: asyncio.Event
) -> grpc.RpcError:
    call = native.GenerateStream(
        pb.GenerateRequest(
            model=f"models/{model}",
            prompt="Once upon a time",
            sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True),
        )
    )
    try:
        async for _piece in call:
            started.set()
    except grpc.RpcError as err:  # ferry_client's typed error (tests/stack.py channels)
        return err
    raise AssertionError("the native stream ended without an error")


async def test_stopping_triton_under_streams_is_a_retryable_unavailable(
    stack: RunningStack,
    arest: httpx.AsyncClient,
    anative: inference_pb2_grpc.InferenceServiceStub,
    model: str,
) -> None:
    supervisor = stack.supervisor()
    started = [asyncio.Event() for _ in range(3)]
    async with openai.AsyncOpenAI(base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0) as sdk:
        rest = asyncio.create_task(rest_stream(arest, model, started[0]))
        via_sdk = asyncio.create_task(sdk_stream(sdk, model, started[1]))
        native = asyncio.create_task(native_stream(anative, model, started[2]))
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), STARTED_WITHIN)
            await asyncio.to_thread(supervisor.stop, "triton")
            (status, events), sdk_error, grpc_error = await asyncio.wait_for(
                asyncio.gather(rest, via_sdk, native), ENDED_WITHIN
            )
            # Triton is down: a new request is refused at once with a retry hint.
            refused = await arest.post(
                "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}
            )
        finally:
            for task in (rest, via_sdk, native):
                task.cancel()
            await asyncio.to_thread(supervisor.start, "triton")
            await asyncio.to_thread(wait_for, model_serving(stack), 180, "the model READY again")
            await asyncio.to_thread(stack.wait_ready, 60)

    assert status == 200 and any(e.get("choices") for e in events), "the REST stream had started"
    rest_error = events[-1]["error"]
    path_taken("REST", rest_error["message"])
    assert (rest_error["code"], rest_error["type"]) == ("engine_unavailable", "server_error"), rest_error

    assert isinstance(sdk_error.body, dict), sdk_error
    path_taken("OpenAI SDK", sdk_error.body["message"])
    assert (sdk_error.body["code"], sdk_error.body["type"]) == ("engine_unavailable", "server_error")

    native_path = path_taken("native gRPC", grpc_error.details() or "")
    assert grpc_error.code() == grpc.StatusCode.UNAVAILABLE, grpc_error.details()
    details = error_details(grpc_error)
    assert details["ErrorInfo"].reason == "ENGINE_UNAVAILABLE"  # type: ignore[attr-defined]
    # The fault's own delay, or the catalogue's default for a retryable reason: both one second today.
    expected_delay = RETRY_AFTER_SECONDS if native_path == UNLOADING else DEFAULT_RETRY_AFTER_SECONDS
    delay = details["RetryInfo"].retry_delay.ToTimedelta().total_seconds()  # type: ignore[attr-defined]
    assert delay == expected_delay, (native_path, delay)
    trailers = dict(grpc_error.trailing_metadata() or ())
    assert int(trailers["retry-after"]) == math.ceil(expected_delay), (native_path, trailers)

    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1

    # Restored: the next test finds a working stack.
    ok = await arest.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200, ok.text
