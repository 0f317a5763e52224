"""Capacity behaviour on the real stack: cancellation frees engine slots, overload is refused at once
with 429 / RESOURCE_EXHAUSTED and a retry delay, readiness follows the model, metrics count it all.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import grpc
import httpx
import openai
import pytest
from ferry.inference.v1 import inference_pb2 as pb
from ferry.inference.v1 import inference_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import error_details
from tests.inference.conftest import Metrics
from tests.stack import RunningStack

pytestmark = pytest.mark.stack

LONG = 4000  # tokens: far longer than any test waits, so only cancellation can end these early


def limits(metrics: Metrics, model: str) -> tuple[int, int]:
    in_flight = metrics.value("ferry_inference_admission_limit", model=model, kind="in_flight")
    queued = metrics.value("ferry_inference_admission_limit", model=model, kind="queued")
    assert in_flight >= 1, "the admission gauges appear once the model is ready"
    return int(in_flight), int(queued)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def idle(metrics: Metrics, model: str) -> Callable[[], bool]:
    def check() -> bool:
        return (
            metrics.value("ferry_inference_requests_in_flight", model=model) == 0
            and metrics.value("ferry_inference_requests_queued", model=model) == 0
        )

    return check


def stream_body(model: str, max_tokens: int = LONG) -> dict[str, object]:
    return {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


async def first_token_seconds(http: httpx.AsyncClient, model: str) -> float:
    """Client-side time to the first content event of a new SSE completion stream."""
    started = time.monotonic()
    async with http.stream("POST", "/v1/completions", json=stream_body(model, 4)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:") and json.loads(line[5:])["choices"][0]["text"]:
                return time.monotonic() - started
    raise AssertionError("the stream ended without text")


async def test_cancelled_streams_free_their_engine_slots(
    arest: httpx.AsyncClient, anative: inference_pb2_grpc.InferenceServiceStub, metrics: Metrics, model: str
) -> None:
    slots, _ = limits(metrics, model)

    async def rest_stream_then_disconnect() -> None:
        async with arest.stream("POST", "/v1/completions", json=stream_body(model)) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    return  # leaving the block closes the connection mid-stream

    async def grpc_stream_then_cancel() -> None:
        call = anative.GenerateStream(
            pb.GenerateRequest(
                model=f"models/{model}",
                prompt="Once upon a time",
                sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True),
            )
        )
        async for _piece in call:
            break
        call.cancel()

    # Every engine slot holds a long generation that has started; then all callers go away.
    await asyncio.gather(
        *(rest_stream_then_disconnect() if i % 2 == 0 else grpc_stream_then_cancel() for i in range(slots))
    )
    ttft = await first_token_seconds(arest, model)
    assert ttft < 2.0, f"a new request waited {ttft:.2f} s for its first token: slots were not freed"
    await until(idle(metrics, model), 2.0, "admission back to idle after the cancellations")


async def test_unary_rest_request_abandoned_by_its_client_is_cancelled(
    arest: httpx.AsyncClient, metrics: Metrics, model: str
) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        await arest.post("/v1/completions", json=body, timeout=1.0)
    await until(idle(metrics, model), 1.0, "the abandoned request leaving its slot")
    assert await first_token_seconds(arest, model) < 2.0


async def test_overload_is_refused_at_once_with_a_retry_delay(
    stack: RunningStack,
    arest: httpx.AsyncClient,
    anative: inference_pb2_grpc.InferenceServiceStub,
    metrics: Metrics,
    model: str,
) -> None:
    slots, queue = limits(metrics, model)
    release = asyncio.Event()

    async def occupy() -> None:
        async with arest.stream("POST", "/v1/completions", json=stream_body(model)) as response:
            assert response.status_code == 200
            await release.wait()

    holders = [asyncio.create_task(occupy()) for _ in range(slots + queue)]
    try:
        await until(
            lambda: (
                metrics.value("ferry_inference_requests_in_flight", model=model) == slots
                and metrics.value("ferry_inference_requests_queued", model=model) == queue
            ),
            60.0,
            f"{slots} running and {queue} queued",
        )

        started = time.monotonic()
        refused = await arest.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "overloaded"  # OpenAI's error object

        async with openai.AsyncOpenAI(
            base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0
        ) as sdk:
            with pytest.raises(openai.RateLimitError):
                await sdk.completions.create(model=model, prompt="x", max_tokens=1)
            with pytest.raises(openai.RateLimitError):
                await sdk.completions.create(model=model, prompt="x", max_tokens=1, stream=True)

        with pytest.raises(grpc.RpcError) as err:  # ferry_client's ResourceExhausted
            await anative.Generate(
                pb.GenerateRequest(
                    model=f"models/{model}", prompt="x", sampling=pb.SamplingParams(max_tokens=1)
                ),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = error_details(err.value)["RetryInfo"].retry_delay  # type: ignore[attr-defined]
        assert retry.seconds >= 1
        trailers = dict(err.value.trailing_metadata() or ())
        assert int(trailers["retry-after"]) >= 1
    finally:
        release.set()
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    await until(idle(metrics, model), 5.0, "admission back to idle after the overload")


def test_metrics_count_requests_tokens_and_latencies(
    stack: RunningStack, client: openai.OpenAI, metrics: Metrics, model: str
) -> None:
    before = metrics.samples()

    def grew(name: str, **labels: str) -> float:
        now = metrics.value(name, **labels)
        old = sum(v for (n, ls), v in before.items() if n == name and set(labels.items()) <= set(ls))
        return now - old

    list(
        client.completions.create(
            model=model, prompt="Hello", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
        )
    )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="Hello", temperature=5)
    assert grew("ferry_inference_requests_total", model=model, api="completion", outcome="ok") == 1
    assert (
        grew("ferry_inference_requests_total", model=model, api="completion", outcome="invalid_argument") == 1
    )
    # Unknown names are not labels: anyone could otherwise create unbounded series.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model-xyz", prompt="Hello")
    assert (
        grew("ferry_inference_requests_total", model="_unknown", api="completion", outcome="not_found") == 1
    )
    assert not [key for key in metrics.samples() if ("model", "no-such-model-xyz") in key[1]]
    assert grew("ferry_inference_completion_tokens_total", model=model) == 4
    assert grew("ferry_inference_prompt_tokens_total", model=model) >= 1
    assert grew("ferry_inference_time_to_first_token_seconds_count", model=model) == 1
    assert grew("ferry_inference_inter_token_latency_seconds_count", model=model) == 3
    assert grew("ferry_inference_e2e_request_latency_seconds_count", model=model) == 1


def test_model_not_ready_is_unavailable_and_health_follows(
    stack: RunningStack, rest: httpx.Client, model: str
) -> None:
    """Unloading the model in Triton: requests get 503 / UNAVAILABLE and the inference services turn
    NOT_SERVING (so Envoy's /readyz fails); after loading it again everything recovers."""
    health = health_pb2_grpc.HealthStub(stack.channel(stack.service_targets["inference"]))

    def status() -> int:
        request = health_pb2.HealthCheckRequest(service="ferry.openai.v1.OpenAIService")
        return int(health.Check(request, timeout=5).status)

    def wait_for(check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline
            time.sleep(0.1)

    triton = stack.triton()
    triton.unload_model(model)
    try:
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
        response = rest.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
        assert response.status_code == 503, response.text
        assert "not ready" in response.json()["error"]["message"]
        wait_for(lambda: rest.get("/readyz").status_code == 503, 5)
    finally:
        triton.load_model(model)
    wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 30)
    wait_for(lambda: rest.get("/readyz").status_code == 200, 10)
    ok = rest.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200, ok.text
