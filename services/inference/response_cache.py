"""The response cache: identical deterministic requests answered from a kept answer.

A request is cacheable when its answer is determined by what it asks: temperature 0 (greedy) or a
fixed seed, on a Triton model (an upstream server's model version is not ours to know). Its key is
the SHA-256 of everything the engine receives and of the model version: the model's name, Triton's
version and configuration of it (the GGUF file's name, package and every engine parameter) and, when
the file is reachable from this process, its size and modification time; the rendered prompt and
every sampling parameter, the constraint's content included (a named grammar is resolved to its text
before the key is made), the tools offered and their choice. A hit is the kept answer replayed as one
piece (text, token counts, logprobs, finish reason), so it serves either API, streamed or not, however
it was first produced.

Stores: an in-process LRU (cachetools; bounded by entries, bytes and TTL) always; with `redis_url`, a
Redis-compatible store shared by every Inference replica behind it (a local miss asks it; a fresh
answer goes to both). A store that fails or is slow makes the request a miss (logged once per outage,
counted in ferry_inference_response_cache_errors_total) and is left alone for a few seconds.

Opting out: `Cache-Control: no-cache` (REST header or gRPC metadata) or the native `cache_policy`
NO_CACHE always generates and keeps the fresh answer; `no-store` / NO_STORE always generates and keeps
nothing. The response says which it was: `x-ferry-cache: hit|miss|bypass` (gRPC initial metadata,
which Envoy's transcoder makes a response header); requests that cannot be cached carry none.

A hit takes no engine slot, but is otherwise a request like any other: authenticated, scope-checked
and rate limited at the edge, audited, recorded (the transaction's `cache_hit`), and its tokens (the
kept answer's counts) are reported as usage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cachetools
import grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from backends.llamacpp.config import ModelParameters
from backends.llamacpp.gguf import gguf_path
from services.common.auth import principal_var
from services.common.config import ResponseCacheSettings
from services.common.interceptor import current_call
from services.common.triton_client import ModelInfo, Provider
from services.inference import metrics
from services.inference.deadline import Deadline, RequestDeadline
from services.inference.domain import Exchange, Piece, TokenLogprob, TopLogprob

log = logging.getLogger(__name__)

CACHE_HEADER = "x-ferry-cache"
CACHE_CONTROL_HEADER = "cache-control"
HIT, MISS, BYPASS = "hit", "miss", "bypass"
NO_CACHE, NO_STORE = "no-cache", "no-store"
# The key's schema: bump when what a key covers or an entry holds changes.
KEY_VERSION = 2
REDIS_PREFIX = f"ferry:response-cache:v{KEY_VERSION}:"
# llama.cpp's "random seed" values: a request with one of them is not deterministic.
RANDOM_SEEDS = frozenset({-1, 0xFFFFFFFF})
# How long a model's version fingerprint is reused (the catalog caches Triton lookups as long).
FINGERPRINT_SECONDS = 2.0
# After a store failure, the store is not asked again for this long (requests are misses meanwhile).
OUTAGE_BACKOFF_SECONDS = 5.0


@dataclass(frozen=True)
class CachedAnswer:
    """A kept answer: everything a response of either API is made of."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] = ()

    def encode(self) -> bytes:
        return json.dumps(
            {
                "t": self.text,
                "p": self.prompt_tokens,
                "c": self.completion_tokens,
                "f": self.finish_reason,
                "l": [
                    [lp.token, lp.logprob, [[alt.token, alt.logprob] for alt in lp.top_logprobs]]
                    for lp in self.logprobs
                ],
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> CachedAnswer:
        value = json.loads(raw)
        return cls(
            text=value["t"],
            prompt_tokens=int(value["p"]),
            completion_tokens=int(value["c"]),
            finish_reason=value["f"],
            logprobs=tuple(
                TokenLogprob(token, logprob, tuple(TopLogprob(t, lp) for t, lp in top))
                for token, logprob, top in value.get("l", ())
            ),
        )

    def piece(self) -> Piece:
        return Piece(
            text=self.text,
            tokens=self.completion_tokens,
            prompt_tokens=self.prompt_tokens,
            finish_reason=self.finish_reason,
            logprobs=self.logprobs,
        )


@dataclass
class Lookup:
    """One request's dealings with the cache: its key, the kept answer on a hit, and whether the fresh
    answer may be kept."""

    key: str
    answer: CachedAnswer | None = None
    store: bool = True


class LocalStore:
    """The in-process LRU: at most `max_entries` answers and `max_bytes` of their encodings, each
    kept `ttl_seconds`."""

    def __init__(self, settings: ResponseCacheSettings) -> None:
        self.max_entries = settings.max_entries
        self._cache: cachetools.TTLCache[str, tuple[CachedAnswer, int]] = cachetools.TTLCache(
            maxsize=settings.max_bytes, ttl=settings.ttl_seconds, getsizeof=lambda item: item[1]
        )

    def get(self, key: str) -> CachedAnswer | None:
        item = self._cache.get(key)
        return None if item is None else item[0]

    def put(self, key: str, answer: CachedAnswer, size: int) -> None:
        if size > self._cache.maxsize:
            return
        self._cache.pop(key, None)
        while len(self._cache) >= self.max_entries:
            self._cache.popitem()  # the least recently used
        self._cache[key] = (answer, size)  # evicts least recently used ones until the bytes fit
        self.report()

    def report(self) -> None:
        self._cache.expire()
        metrics.RESPONSE_CACHE_ENTRIES.set(len(self._cache))
        metrics.RESPONSE_CACHE_BYTES.set(self._cache.currsize)


class RedisStore:
    """A Redis-compatible store shared by every replica (redis.asyncio). Its failures never fail a
    request: `get` answers None and `put` does nothing while it is out."""

    def __init__(self, settings: ResponseCacheSettings) -> None:
        self.url = settings.redis_url
        self.ttl_ms = int(settings.ttl_seconds * 1000)
        self.timeout = settings.redis_timeout_seconds
        # Imported only when a store is configured: it is most of this module's import time.
        from redis import asyncio as redis_asyncio

        self.client = redis_asyncio.Redis.from_url(
            settings.redis_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
        )
        self._out_until = 0.0
        self._out = False

    async def get(self, key: str) -> bytes | None:
        if time.monotonic() < self._out_until:
            return None
        try:
            value = await asyncio.wait_for(self.client.get(REDIS_PREFIX + key), self.timeout)
        except Exception as err:  # any store failure is a miss
            self._failed("get", err)
            return None
        self._recovered()
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes) -> None:
        if time.monotonic() < self._out_until:
            return
        try:
            await asyncio.wait_for(self.client.set(REDIS_PREFIX + key, value, px=self.ttl_ms), self.timeout)
        except Exception as err:  # a lost entry only costs a later miss
            self._failed("put", err)
            return
        self._recovered()

    def _failed(self, operation: str, err: Exception) -> None:
        metrics.RESPONSE_CACHE_ERRORS.labels(operation).inc()
        self._out_until = time.monotonic() + OUTAGE_BACKOFF_SECONDS
        if not self._out:
            self._out = True
            log.warning(
                "response cache store %s failed (%s: %s); requests are answered without it, retrying in %.0f s",
                _safe_url(self.url),
                type(err).__name__,
                err,
                OUTAGE_BACKOFF_SECONDS,
            )

    def _recovered(self) -> None:
        if self._out:
            self._out = False
            log.info("response cache store %s answers again", _safe_url(self.url))

    async def aclose(self) -> None:
        await self.client.aclose()


def _safe_url(url: str) -> str:
    """The URL without its password (logs never show credentials)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


class ModelVersions(Protocol):
    async def fingerprint(self, model: ModelInfo) -> str | None: ...


class TritonModelVersions:
    """A model version's identity: Triton's loaded version and configuration of the model (reread every
    couple of seconds, so a reload with another file or parameters changes it), and the GGUF file's
    size and modification time when this process can see the file."""

    def __init__(self, client: triton_aio.InferenceServerClient, home: Path) -> None:
        self.client = client
        self.home = home
        self._known: dict[str, tuple[str | None, float]] = {}

    async def fingerprint(self, model: ModelInfo) -> str | None:
        known = self._known.get(model.name)
        if known is not None and time.monotonic() - known[1] < FINGERPRINT_SECONDS:
            return known[0]
        value = await self._read(model.name)
        self._known[model.name] = (value, time.monotonic())
        return value

    async def _read(self, name: str) -> str | None:
        try:
            response: dict[str, Any] = await self.client.get_model_config(name, as_json=True)
            index: dict[str, Any] = await self.client.get_model_repository_index(as_json=True)
        except InferenceServerException:
            return None  # not loaded or Triton unreachable: nothing is cached for it now
        config = response.get("config", {})
        versions = sorted(
            str(entry.get("version", ""))
            for entry in index.get("models", [])
            if entry.get("name") == name and entry.get("state") == "READY"
        )
        identity: dict[str, Any] = {"config": config, "versions": versions}
        try:
            path = gguf_path(ModelParameters.from_triton_config(config), self.home)
            stat = path.stat()
            identity["file"] = [path.name, stat.st_size, stat.st_mtime_ns]
        except Exception:  # another backend, or the file lives on another machine
            pass
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def request_policy(exchange: Exchange) -> str:
    """no-cache, no-store or "" (use the cache): the native field, else a Cache-Control header/metadata."""
    if exchange.request.cache_policy:
        return exchange.request.cache_policy
    call = current_call.get()
    header = call.metadata.get(CACHE_CONTROL_HEADER, "") if call else ""
    directives = {part.strip().lower().replace(" ", "") for part in header.split(",")}
    if NO_STORE in directives:
        return NO_STORE
    if NO_CACHE in directives or "max-age=0" in directives:
        return NO_CACHE
    return ""


def deterministic(exchange: Exchange) -> bool:
    sampling = exchange.request.sampling
    if sampling.temperature is not None and sampling.temperature == 0:
        return True
    return sampling.seed is not None and sampling.seed not in RANDOM_SEEDS


def request_key(exchange: Exchange, model: ModelInfo, fingerprint: str, sharing: str = "key") -> str:
    """What the engine receives, and who may be answered: with `sharing` "key", only the key (principal)
    whose request was kept; with "everyone", any caller (a hit then tells one caller that another sent
    the same prompt)."""
    request = exchange.request
    principal = principal_var.get()
    tools = None
    if request.tool_use is not None:
        use = request.tool_use
        tools = {
            "choice": use.choice.value,
            "function": use.function,
            "parallel": use.parallel,
            "tools": [[t.name, t.description, t.parameters] for t in use.tools],
        }
    material = {
        "v": KEY_VERSION,
        "model": model.name,
        "version": fingerprint,
        "prompt": exchange.prompt,
        # Only the fields the caller set, as the engine gets them (SamplingParameters.to_json): an
        # explicit `"stop": []` overrides the model's default stop sequences, an unset one does not.
        "sampling": json.loads(request.sampling.to_json()),
        "tools": tools,
        "principal": (principal.name if principal is not None else "") if sharing == "key" else "",
    }
    encoded = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


class ResponseCache:
    """The pipeline's hooks: `lookup` after rendering, `replay` for a hit, `keep` when a fresh answer
    is complete, `announce` before the piece that lets the caller's response headers go."""

    def __init__(self, settings: ResponseCacheSettings, versions: ModelVersions | None) -> None:
        self.settings = settings
        self.enabled = settings.enabled and versions is not None
        self.versions = versions
        self.local = LocalStore(settings)
        self.shared = RedisStore(settings) if settings.enabled and settings.redis_url else None
        self._writes: set[asyncio.Task[None]] = set()

    @classmethod
    def off(cls) -> ResponseCache:
        return cls(ResponseCacheSettings(enabled=False), None)

    async def lookup(self, exchange: Exchange, model: ModelInfo) -> Lookup | None:
        """None when the request is not cacheable; else its key, with the kept answer on a hit.
        Sets `exchange.cache` (hit, miss or bypass)."""
        if not self.enabled or model.provider is not Provider.TRITON or not deterministic(exchange):
            return None
        assert self.versions is not None
        fingerprint = await self.versions.fingerprint(model)
        if fingerprint is None:
            return None
        lookup = Lookup(request_key(exchange, model, fingerprint, self.settings.sharing))
        policy = request_policy(exchange)
        label = exchange.model_label
        if policy:
            exchange.cache = BYPASS
            lookup.store = policy != NO_STORE
            metrics.RESPONSE_CACHE_BYPASSES.labels(label).inc()
            return lookup
        lookup.answer = self.local.get(lookup.key)
        if lookup.answer is None and self.shared is not None:
            raw = await self.shared.get(lookup.key)
            if raw is not None:
                try:
                    lookup.answer = CachedAnswer.decode(raw)
                    self.local.put(lookup.key, lookup.answer, len(raw))
                except (ValueError, KeyError, TypeError):
                    log.warning("response cache entry %s is unreadable; treated as a miss", lookup.key[:16])
        if lookup.answer is not None:
            exchange.cache = HIT
            lookup.store = False
            metrics.RESPONSE_CACHE_HITS.labels(label).inc()
        else:
            exchange.cache = MISS
            metrics.RESPONSE_CACHE_MISSES.labels(label).inc()
        return lookup

    async def replay(self, answer: CachedAnswer) -> AsyncGenerator[Piece, None]:
        yield answer.piece()

    def keep(self, exchange: Exchange, lookup: Lookup | None) -> None:
        """Keeps a complete, successful fresh answer (local at once, the shared store in the background)."""
        outcome = exchange.outcome
        if lookup is None or not lookup.store or outcome.error_code:
            return
        if outcome.finish_reason not in ("stop", "length"):
            return
        answer = CachedAnswer(
            text="".join(outcome.text),
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            finish_reason=outcome.finish_reason,
            logprobs=tuple(outcome.logprobs),
        )
        raw = answer.encode()
        if len(raw) > self.settings.max_entry_bytes:
            return
        self.local.put(lookup.key, answer, len(raw))
        metrics.RESPONSE_CACHE_STORES.labels(exchange.model_label).inc()
        if self.shared is not None:
            task = asyncio.create_task(self.shared.put(lookup.key, raw))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    @staticmethod
    def announce_due(exchange: Exchange, piece: Piece, first: bool) -> bool:
        """Whether `x-ferry-cache` must go out before this piece: a stream's first piece; a unary
        answer's last one (earlier, the headers would keep an error's trailers from becoming the REST
        status' headers)."""
        if not exchange.cache:
            return False
        return first if exchange.request.stream else bool(piece.finish_reason)

    @staticmethod
    async def announce(exchange: Exchange, deadline: Deadline) -> None:
        if isinstance(deadline, RequestDeadline):
            try:
                await deadline.context.send_initial_metadata(((CACHE_HEADER, exchange.cache),))
            except (grpc.aio.UsageError, RuntimeError) as err:  # already sent: the answer goes on
                log.debug("x-ferry-cache not sent: %s", err)

    async def aclose(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self.shared is not None:
            await self.shared.aclose()
