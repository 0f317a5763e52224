"""The soak's mixed traffic: what a busy day of users sends, at a fixed concurrency, until a deadline.

Each request picks one kind at random:
- OpenAI REST through Envoy (httpx, as any HTTP client): chat and completions, unary and streamed;
- native gRPC through Envoy: Generate and GenerateStream;
- invalid requests, which must be refused (bad temperature, unknown model, empty messages, and a bad
  temperature over native gRPC).
Prompts are 1-400 characters of fresh text (a serial number and random words, so no two are alike and
no cache can answer from an earlier one). A quarter of the streams are dropped after a few chunks:
the client closes its connection (REST) or cancels the call (gRPC) while tokens are still coming.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

from bench.clients import sse_events

KINDS = ("chat", "chat-stream", "completion", "completion-stream", "generate", "generate-stream", "invalid")
STREAM_KINDS = frozenset(k for k in KINDS if k.endswith("-stream"))
# Valid kinds equally often; one request in ten is invalid.
WEIGHTS = (15, 15, 15, 15, 15, 15, 10)
DROP_FRACTION = 0.25
PROMPT_CHARS = (1, 400)
MAX_TOKENS = (4, 64)
# Streams that will be dropped ask for more, so the drop happens mid-generation.
DROPPED_MAX_TOKENS = (64, 128)
BAD_TEMPERATURE = 7.5
TIMEOUT_S = 120.0
# How many error messages per kind the report keeps.
KEPT_ERRORS = 3
WORDS = (
    "river harbour ferry crossing tide morning lantern rope deck captain passenger ticket island "
    "weather fog signal engine whistle gull pier cargo timetable bridge current anchor wave north "
    "south east west quiet busy late early return journey coast light evening storm calm"
).split()
_INVALID_VARIANTS = ("bad-temperature", "unknown-model", "empty-messages", "grpc-bad-temperature")


@dataclass
class Count:
    """Requests of one kind: sent, answered as expected (`ok`; a refused invalid request is ok),
    streams dropped on purpose, and failures (with a few of their messages)."""

    sent: int = 0
    ok: int = 0
    dropped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append(message[:300])


def prompt(rng: random.Random, serial: int) -> str:
    """Fresh text of a random length in PROMPT_CHARS, starting with a serial number."""
    length = rng.randint(*PROMPT_CHARS)
    text = str(serial)
    while len(text) < length:
        text += " " + rng.choice(WORDS)
    return text[:length]


class Outcome(Exception):
    """How a request ended when it did not simply succeed: `dropped` or a failure message."""

    def __init__(self, dropped: bool = False, message: str = "") -> None:
        super().__init__(message)
        self.dropped = dropped


class Traffic:
    """Sends the mix through Envoy with an admin key; `counts` holds the tally by kind."""

    def __init__(self, rest: str, grpc_target: str, model: str, key: str | None, seed: int) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.rest_base = rest
        self.grpc_target = grpc_target
        self.headers = headers
        self.metadata = tuple(headers.items())
        self.model = model
        self.rng = random.Random(seed)
        self.serial = 0
        self.counts: dict[str, Count] = {kind: Count() for kind in KINDS}

    async def run(self, concurrency: int, seconds: float) -> None:
        """`concurrency` requests in flight until `seconds` have passed (the last ones finish)."""
        deadline = time.monotonic() + seconds
        async with (
            httpx.AsyncClient(base_url=self.rest_base, headers=self.headers, timeout=TIMEOUT_S) as http,
            grpc.aio.insecure_channel(self.grpc_target) as channel,
        ):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await self.one(http, stub)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def one(self, http: httpx.AsyncClient, stub: inference_pb2_grpc.InferenceServiceStub) -> None:
        kind = self.rng.choices(KINDS, WEIGHTS)[0]
        count = self.counts[kind]
        count.sent += 1
        self.serial += 1
        text = prompt(self.rng, self.serial)
        drop_after = (
            self.rng.randint(1, 3) if kind in STREAM_KINDS and self.rng.random() < DROP_FRACTION else 0
        )
        max_tokens = self.rng.randint(*(DROPPED_MAX_TOKENS if drop_after else MAX_TOKENS))
        temperature = round(self.rng.uniform(0.0, 1.5), 2)
        try:
            if kind == "invalid":
                await self._invalid(http, stub, text)
            elif kind.startswith("generate"):
                await self._grpc(stub, kind, text, max_tokens, temperature, drop_after)
            else:
                await self._rest(http, kind, text, max_tokens, temperature, drop_after)
            count.ok += 1
        except Outcome as outcome:
            if outcome.dropped:
                count.dropped += 1
            else:
                count.fail(str(outcome))
        except (httpx.HTTPError, grpc.RpcError, ValueError) as err:
            count.fail(f"{type(err).__name__}: {err}")

    # -- OpenAI REST ---------------------------------------------------------------------------------

    async def _rest(
        self,
        http: httpx.AsyncClient,
        kind: str,
        text: str,
        max_tokens: int,
        temperature: float,
        drop_after: int,
    ) -> None:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature}
        if kind.startswith("chat"):
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": text}]
        else:
            path = "/v1/completions"
            body["prompt"] = text
        if kind not in STREAM_KINDS:
            response = await http.post(path, json=body)
            if response.status_code != 200 or not response.json().get("choices"):
                raise Outcome(message=f"HTTP {response.status_code}: {response.text[:200]}")
            return
        body["stream"] = True
        chunks = 0
        finished = False
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raise Outcome(message=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for event in sse_events(response):
                if event.get("error"):
                    raise Outcome(message=f"stream error: {event['error']}")
                chunks += 1
                finished = finished or any(c.get("finish_reason") for c in event.get("choices") or ())
                if drop_after and chunks >= drop_after and not finished:
                    # Leaving the block unread closes the connection: Envoy sees the client go.
                    raise Outcome(dropped=True)
        # ferry ends a stream with the body (no `[DONE]`, see envoy/ferry.lua) after a finish_reason.
        if not finished:
            raise Outcome(message=f"stream ended after {chunks} chunks without a finish_reason")

    # -- native gRPC ---------------------------------------------------------------------------------

    async def _grpc(
        self,
        stub: inference_pb2_grpc.InferenceServiceStub,
        kind: str,
        text: str,
        max_tokens: int,
        temperature: float,
        drop_after: int,
    ) -> None:
        request = inference_pb2.GenerateRequest(
            model=f"models/{self.model}",
            prompt=text,
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature),
        )
        if kind not in STREAM_KINDS:
            await stub.Generate(request, timeout=TIMEOUT_S, metadata=self.metadata)
            return
        call = stub.GenerateStream(request, timeout=TIMEOUT_S, metadata=self.metadata)
        chunks = 0
        async for _ in call:
            chunks += 1
            if drop_after and chunks >= drop_after:
                call.cancel()
                raise Outcome(dropped=True)

    # -- invalid requests ----------------------------------------------------------------------------

    async def _invalid(
        self, http: httpx.AsyncClient, stub: inference_pb2_grpc.InferenceServiceStub, text: str
    ) -> None:
        """Passes when the platform refuses the request as the caller's mistake (4xx / INVALID_ARGUMENT)."""
        variant = self.rng.choice(_INVALID_VARIANTS)
        if variant == "grpc-bad-temperature":
            request = inference_pb2.GenerateRequest(
                model=f"models/{self.model}",
                prompt=text,
                sampling=inference_pb2.SamplingParams(max_tokens=4, temperature=BAD_TEMPERATURE),
            )
            try:
                await stub.Generate(request, timeout=TIMEOUT_S, metadata=self.metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    return
                raise Outcome(message=f"{variant}: {err.code().name}: {err.details()}") from None
            raise Outcome(message=f"{variant}: accepted")
        chat = "/v1/chat/completions"
        body: dict[str, Any] = {"model": self.model, "max_tokens": 4}
        if variant == "bad-temperature":
            path, expected = chat, 400
            body |= {"messages": [{"role": "user", "content": text}], "temperature": BAD_TEMPERATURE}
        elif variant == "unknown-model":
            path, expected = "/v1/completions", 404
            body |= {"model": f"no-such-model-{self.serial}", "prompt": text}
        else:  # empty-messages
            path, expected = chat, 400
            body["messages"] = []
        response = await http.post(path, json=body)
        if response.status_code != expected:
            raise Outcome(
                message=f"{variant}: HTTP {response.status_code} (expected {expected}): {response.text[:200]}"
            )
