"""Small asyncio load clients measuring the definitions of bench.metrics.

- `GrpcClient`: ferry's native `InferenceService/GenerateStream` (through Envoy's port or direct).
- `SseClient`: an OpenAI `/v1/completions` SSE stream (cross-check of aiperf, and the tier runs).
- `TritonClient`: Triton's `ModelStreamInfer` with the model's wire contract, as the Inference
  service calls it (one gRPC stream per request).
`run_load` keeps `concurrency` requests in flight: a warm-up batch first, then the measured ones.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
import httpx
import numpy as np
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from tritonclient.grpc import InferInput
from tritonclient.grpc import aio as triton_aio

from bench.metrics import Record
from services.common.config import TritonSettings
from services.common.triton_client import with_access

Call = Callable[[str, int], Awaitable[Record]]


class Client(Protocol):
    name: str

    async def __call__(self, prompt: str, max_tokens: int) -> Record: ...

    async def close(self) -> None: ...


class GrpcClient:
    name = "grpc"

    def __init__(self, address: str, model: str, api_key: str | None = None) -> None:
        # Default channel options, as a user's client would have them.
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.model = model if model.startswith("models/") else f"models/{model}"
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def __call__(self, prompt: str, max_tokens: int) -> Record:
        request = inference_pb2.GenerateRequest(
            model=self.model,
            prompt=prompt,
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        start = time.perf_counter()
        ttft: float | None = None
        tokens = 0
        usage_tokens = 0
        try:
            async for piece in self.stub.GenerateStream(request, timeout=600, metadata=self.metadata):
                if ttft is None and piece.text:
                    ttft = time.perf_counter() - start
                tokens += piece.token_count
                if piece.HasField("usage"):
                    usage_tokens = piece.usage.completion_tokens
        except grpc.aio.AioRpcError as err:
            return Record(start, time.perf_counter(), ttft, tokens, f"{err.code().name}: {err.details()}")
        return Record(start, time.perf_counter(), ttft, usage_tokens or tokens)

    async def close(self) -> None:
        await self.channel.close()


class SseClient:
    name = "sse"

    def __init__(
        self, base_url: str, model: str, extra: dict[str, Any] | None = None, api_key: str | None = None
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), headers=headers)
        self.model = model
        self.extra = extra or {}

    async def __call__(self, prompt: str, max_tokens: int) -> Record:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            **self.extra,
        }
        start = time.perf_counter()
        ttft: float | None = None
        chunks = 0
        usage_tokens = 0
        try:
            async with self.http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    return Record(start, time.perf_counter(), None, 0, f"HTTP {response.status_code}: {text}")
                async for event in sse_events(response):
                    if event.get("error"):
                        return Record(
                            start, time.perf_counter(), ttft, chunks, f"stream error: {event['error']}"
                        )
                    choices = event.get("choices") or []
                    if choices and choices[0].get("text"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - start
                    if event.get("usage"):
                        usage_tokens = int(event["usage"].get("completion_tokens") or 0)
        except httpx.HTTPError as err:
            return Record(start, time.perf_counter(), ttft, chunks, f"{type(err).__name__}: {err}")
        return Record(start, time.perf_counter(), ttft, usage_tokens or chunks)

    async def close(self) -> None:
        await self.http.aclose()


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an OpenAI server-sent-event stream, until `[DONE]` or the end of the body."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _string_input(name: str, value: str) -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


class TritonClient:
    name = "triton"

    def __init__(self, address: str, model: str, triton: TritonSettings | None = None) -> None:
        # `triton`: the stack's settings, whose access secret Triton asks for (as it does of ferry).
        self.client = triton_aio.InferenceServerClient(url=address)
        if triton is not None:
            with_access(self.client, triton)
        self.model = model

    async def __call__(self, prompt: str, max_tokens: int) -> Record:
        finished = asyncio.Event()
        request = {
            "model_name": self.model,
            "inputs": [
                _string_input("text_input", prompt),
                _string_input(
                    "sampling_parameters", json.dumps({"max_tokens": max_tokens, "ignore_eos": True})
                ),
            ],
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request
            await finished.wait()  # keep the stream open until the final response, as ferry does

        start = time.perf_counter()
        ttft: float | None = None
        tokens = 0
        error: str | None = None
        responses = self.client.stream_infer(requests())
        try:
            async for result, err in responses:
                if err is not None:
                    error = str(err)
                    break
                text = result.as_numpy("text_output").reshape(-1)[0]
                if ttft is None and text:
                    ttft = time.perf_counter() - start
                tokens += int(result.as_numpy("num_output_tokens").reshape(-1)[0])
                if result.as_numpy("finish_reason").reshape(-1)[0]:
                    break
        finally:
            finished.set()
            responses.cancel()
        return Record(start, time.perf_counter(), ttft, tokens, error)

    async def close(self) -> None:
        await self.client.close()


async def run_load(
    call: Call, prompts: Sequence[str], concurrency: int, max_tokens: int, warmup: int
) -> list[Record]:
    """Warm-up requests (not recorded), then `prompts[warmup:]` with `concurrency` in flight."""

    async def drain(queue: list[str], out: list[Record] | None) -> None:
        while queue:
            record = await call(queue.pop(0), max_tokens)
            if out is not None:
                out.append(record)

    warm = list(prompts[:warmup])
    await asyncio.gather(*(drain(warm, None) for _ in range(concurrency)))
    measured = list(prompts[warmup:])
    records: list[Record] = []
    await asyncio.gather(*(drain(measured, records) for _ in range(concurrency)))
    return records
