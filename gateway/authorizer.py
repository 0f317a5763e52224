"""The gateway's own authorization decision: authenticate a key, check its scope, apply rate limits.

Every service's interceptor asks for it over `AuthService/Authorize`; the gateway's own interceptor
and Envoy's edge check (ext_authz) call it in-process. Keys are looked up by the hash of the secret and
kept for `auth.cache_seconds` (misses too, so a flood of wrong keys does not reach PostgreSQL); a
revocation made through this gateway drops its entry at once.

Serving through a database outage (stale-if-error): the last good record of every key found is also
kept for `auth.stale_if_error_seconds`, and so is every working key of the store, read in the
background (gateway/key_memory.py: a replica knows the keys the others checked, which Envoy's leases
make common). A check of a key with such a record waits for the store
`auth.key_store_timeout_seconds`, then is answered from it; a check of a key without one waits up to
UNKNOWN_KEY_WAIT_SECONDS (just under Envoy's ext_authz timeout), so a new key on a slow but answering
database is still found. The gateway is *degraded* (`ferry_gateway_key_store_degraded` 1, one log line
on entering and one on leaving) when a lookup fails (the store raised UNAVAILABLE) or gives no answer
within UNKNOWN_KEY_WAIT_SECONDS, not merely because one was slower than the store timeout; it leaves
that state on the first lookup that answers within UNKNOWN_KEY_WAIT_SECONDS (a lookup that answers
later still refreshes the caches and starts one probe lookup, so a store that stays slower than that
stays degraded instead of flapping, and one that recovered is seen at once). While degraded, known
keys keep working (rate limits keep counting: they live outside the database) and unknown keys are
refused with AUTH_UNAVAILABLE (503 + retry hint), both at once, without waiting for the store. One
lookup per key runs at a time, in the background, so a stalled database (a network partition) delays
a request only until the degraded state begins. News older than the last good answer (a lookup that
began before it and fails or hangs afterwards) changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, Literal

from cachetools import TTLCache
from ferry.auth.v1 import auth_pb2
from prometheus_client import Counter, Gauge

from gateway.limiter import Limiter, Window
from gateway.store import KeyRecord, KeyStore
from services.common.access import INFERENCE, INTERNAL, UNVERIFIED_PRINCIPAL, required_scopes
from services.common.config import Settings
from services.common.errors import (
    Reason,
    RpcError,
    permission_denied,
    rate_limited,
    rpc_error,
    unauthenticated,
)
from services.common.timestamps import now
from services.common.tokens import hash_key, is_service_token, service_principal

log = logging.getLogger(__name__)

PUBLIC_PRINCIPAL = "anonymous"
# ErrorInfo metadata naming the known key a refusal concerns.
REFUSED_KEY = "key"
# Keys (and misses) remembered at once; beyond it the oldest go first.
CACHE_ENTRIES = 100_000
# Background key lookups at once: beyond it (a flood of distinct keys while the store hangs), a key
# without a stale record is refused at once instead of queueing another lookup.
MAX_LOOKUPS_IN_FLIGHT = 256
# How long a check of a key without a stale record waits for the store (not degraded): just under
# Envoy's 1 s ext_authz timeout, so a new key on a slow database is still found in time. A lookup
# without an answer after this long (or auth.key_store_timeout_seconds when longer) means the store
# is down: the gateway is degraded from then on.
UNKNOWN_KEY_WAIT_SECONDS = 0.8
# How long a key changed through this gateway is remembered as changed: longer than any read of the
# store takes (gateway/key_memory.py abandons a page after 5 s).
CHANGES_KEPT_SECONDS = 120.0

KEY_STORE_DEGRADED = Gauge(
    "ferry_gateway_key_store_degraded",
    "1 while the key store (PostgreSQL) fails or does not answer: keys seen before are served from "
    "memory (auth.stale_if_error_seconds), unknown keys are refused with 503.",
)
STALE_KEY_ANSWERS = Counter(
    "ferry_gateway_stale_key_answers",
    "Key lookups answered from a stale record because the key store failed or was too slow.",
)
KEY_STORE_REFUSALS = Counter(
    "ferry_gateway_key_store_unavailable_refusals",
    "Key checks refused with 503 because the key store could not answer and the key was not known.",
)

LookupKind = Literal["hash", "id"]


class LocalAuthorizer:
    """`services.common.auth.Authorizer` answered from the key store (the gateway process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = settings.auth
        self.limits = settings.auth.rate_limits
        self.store: KeyStore | None = None
        self.limiter = Limiter(self.limits)
        self.by_hash: TTLCache[str, KeyRecord | None] = TTLCache(CACHE_ENTRIES, self.auth.cache_seconds)
        self.by_id: TTLCache[str, KeyRecord | None] = TTLCache(CACHE_ENTRIES, self.auth.cache_seconds)
        # When each cached record was read from the store (time.monotonic()): an edge lease lasts only
        # what is left of its record's cache_seconds (gateway/edge_lease.py).
        self.read_at: TTLCache[str, float] = TTLCache(CACHE_ENTRIES, self.auth.cache_seconds)
        # The last good record of each key, used only while the store fails (never misses: an unknown
        # key is refused with 503 during an outage, not with 401).
        stale_seconds = max(self.auth.stale_if_error_seconds, 1e-9)
        self.stale_by_hash: TTLCache[str, KeyRecord] = TTLCache(CACHE_ENTRIES, stale_seconds)
        self.stale_by_id: TTLCache[str, KeyRecord] = TTLCache(CACHE_ENTRIES, stale_seconds)
        self._lookups: dict[tuple[LookupKind, str], asyncio.Task[KeyRecord | None]] = {}
        # Bumped by forget(): a lookup that started before a change here must not cache what it read,
        # nor a background read of the store (gateway/key_memory.py) keep what it read of that key.
        self._generation = 0
        self._changed_at: TTLCache[str, int] = TTLCache(CACHE_ENTRIES, CHANGES_KEPT_SECONDS)
        # How long a lookup may go unanswered before the store counts as down (see the module doc).
        self.unknown_key_wait = max(UNKNOWN_KEY_WAIT_SECONDS, self.auth.key_store_timeout_seconds)
        self.degraded = False
        self._degraded_since = 0.0
        self._signal: asyncio.Future[None] | None = None
        # Loop time at which the latest lookup that answered in time began: older failures are old news.
        self._good_since = float("-inf")
        # The one probe lookup run after a late answer while degraded (is the store back to normal?).
        self._probe: asyncio.Task[KeyRecord | None] | None = None
        KEY_STORE_DEGRADED.set(0)

    def attach(self, store: KeyStore) -> None:
        self.store = store

    # -- the key store, through the cache --------------------------------------------------------

    def _store(self) -> KeyStore:
        if self.store is None:
            raise rpc_error(Reason.AUTH_UNAVAILABLE, "the key store is not ready yet")
        return self.store

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        if key_hash in self.by_hash:
            return self.by_hash[key_hash]
        return await self._lookup("hash", key_hash)

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        if key_id in self.by_id:
            return self.by_id[key_id]
        return await self._lookup("id", key_id)

    async def reread(self, key_hash: str) -> KeyRecord | None:
        """The key read from the store again, cache or not (refresh-ahead for an edge lease), with the
        outage rules of any lookup: answered from a stale record when the store fails or is slow."""
        return await self._lookup("hash", key_hash)

    def forget(self, record: KeyRecord) -> None:
        """Drops what the cache knows of a key that changed here (revoked, created), stale copies too."""
        self._generation += 1
        self._changed_at[record.id] = self._generation
        for cache in (self.by_hash, self.stale_by_hash, self.read_at):
            cache.pop(record.key_hash, None)
        for cache in (self.by_id, self.stale_by_id):
            cache.pop(record.id, None)

    @property
    def generation(self) -> int:
        """Changes whenever forget() does: a read of the store begun before then may be out of date."""
        return self._generation

    def remember(self, records: Iterable[KeyRecord], *, read_at_generation: int) -> set[str]:
        """This replica's outage memory brought up to a read of the key store (gateway/key_memory.py), not
        only the keys it looked up itself: each record read becomes the key's stale record (a revoked one
        stays refused), except for a key changed here after the read began (the read may predate the
        change) and an active copy of a key already known revoked (revocation is one-way: that read is
        older). The ids read, for `keep_only`."""
        read: set[str] = set()
        if self.auth.stale_if_error_seconds <= 0:
            return read
        for record in records:
            read.add(record.id)
            if self._changed_at.get(record.id, 0) > read_at_generation:
                continue
            held = self.stale_by_id.get(record.id)
            if held is not None and held.revoke_time is not None and record.revoke_time is None:
                continue
            self.stale_by_hash[record.key_hash] = record
            self.stale_by_id[record.id] = record
        return read

    def keep_only(self, ids: set[str]) -> None:
        """After a read of every working key: the records of keys it did not find (deleted, expired,
        revoked in a way no later read shows) leave the outage memory."""
        for gone in [r for r in self.stale_by_id.values() if r.id not in ids]:
            self.stale_by_hash.pop(gone.key_hash, None)
            self.stale_by_id.pop(gone.id, None)

    async def _lookup(self, kind: LookupKind, value: str) -> KeyRecord | None:
        """The store's answer, waited for `key_store_timeout_seconds` when the key has a stale record
        (then answered from it) and `unknown_key_wait` when it has none (then AUTH_UNAVAILABLE); at
        once from the stale record, or refused, while degraded. The lookup itself goes on in the
        background (one per key) and refreshes the caches when it ends."""
        stale = (self.stale_by_hash if kind == "hash" else self.stale_by_id).get(value)
        if self.auth.stale_if_error_seconds <= 0:
            stale = None
        task = self._lookups.get((kind, value))
        if task is None:
            if len(self._lookups) >= MAX_LOOKUPS_IN_FLIGHT:
                return self._without_store(stale, "too many key lookups are waiting for the key store")
            loop = asyncio.get_running_loop()
            started = loop.time()
            task = asyncio.create_task(self._fetch(kind, value, started), name=f"key-lookup-{kind}")
            self._lookups[(kind, value)] = task
            task.add_done_callback(lambda done: self._lookup_done(kind, value, done))
            # No answer within the unknown-key wait is down, even when every caller waiting on it
            # has gone (Envoy gave up on them); merely slower than the store timeout is not.
            loop.call_later(self.unknown_key_wait, self._note_unanswered, task, started)
        if self.degraded:
            # Known to be down: no waiting (a slow key check would hold every request, and Envoy
            # counts it against the gateway); the lookup started above tells when it is back.
            return self._without_store(stale, "")
        # A key with a stale record waits the store timeout; an unknown one as long as Envoy allows:
        # a new key on a slow (not failing) database is still found.
        wait = self.auth.key_store_timeout_seconds if stale is not None else self.unknown_key_wait
        # Ended early when another lookup finds the store down meanwhile.
        waiters: set[asyncio.Future[Any]] = {task, self._degraded_signal()}
        await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        done = task.done()
        if done and not task.cancelled() and task.exception() is None:
            return task.result()
        if done and not task.cancelled():
            error = task.exception()
            if not (isinstance(error, RpcError) and error.code.name == "UNAVAILABLE"):
                raise error  # type: ignore[misc]  # a bug, not an outage: as before
            cause = error.message  # _fetch has entered the degraded state (unless old news)
        elif self.degraded:
            cause = f"no answer within {self.unknown_key_wait:g} s"
        elif stale is not None:
            # Slower than the store timeout: answered from memory, but not (yet) an outage.
            return self._without_store(stale, "")
        else:
            # Waited the whole unknown-key wait; the lookup's own timer marks the store down (unless
            # a later lookup answered in time meanwhile: then only this one is stuck).
            cause = f"no answer within {self.unknown_key_wait:g} s"
        return self._without_store(stale, cause)

    def _degraded_signal(self) -> asyncio.Future[None]:
        """Resolved when the degraded state begins (waiting checks then answer at once)."""
        if self._signal is None:
            self._signal = asyncio.get_running_loop().create_future()
        return self._signal

    def _note_unanswered(self, task: asyncio.Task[KeyRecord | None], started: float) -> None:
        if not task.done() and started >= self._good_since:
            self.set_degraded(True, f"no answer within {self.unknown_key_wait:g} s")

    def _lookup_done(self, kind: LookupKind, value: str, task: asyncio.Task[KeyRecord | None]) -> None:
        self._lookups.pop((kind, value), None)
        if not task.cancelled():
            task.exception()  # retrieved: a failed background lookup is reported by set_degraded

    async def _fetch(self, kind: LookupKind, value: str, started: float) -> KeyRecord | None:
        store = self._store()
        generation = self._generation
        try:
            record = await (store.by_hash(value) if kind == "hash" else store.by_id(value))
        except RpcError as err:
            if err.code.name == "UNAVAILABLE" and started >= self._good_since:
                self.set_degraded(True, err.message)
            raise
        if asyncio.get_running_loop().time() - started <= self.unknown_key_wait:
            self._good_since = max(self._good_since, started)
            self.set_degraded(False)
        elif self.degraded and self._probe is None:
            # Answered, but later than a new key can wait: one more lookup tells whether the store
            # is back to normal (after a pause, the lookups it held answer late, then all is well).
            self._probe = asyncio.create_task(self._run_probe(kind, value), name="key-store-probe")
        if generation == self._generation:
            (self.by_hash if kind == "hash" else self.by_id)[value] = record
            if record is not None:
                self.by_hash[record.key_hash] = record
                self.read_at[record.key_hash] = time.monotonic()
                self.by_id[record.id] = record
                self.stale_by_hash[record.key_hash] = record
                self.stale_by_id[record.id] = record
        return record

    async def _run_probe(self, kind: LookupKind, value: str) -> KeyRecord | None:
        try:
            return await self._fetch(kind, value, asyncio.get_running_loop().time())
        except RpcError:
            return None  # reported by set_degraded; the next check's lookup tries again
        except Exception:
            log.exception("key store probe failed")
            return None
        finally:
            self._probe = None

    def _without_store(self, stale: KeyRecord | None, cause: str) -> KeyRecord:
        if stale is not None:
            STALE_KEY_ANSWERS.inc()
            return stale
        KEY_STORE_REFUSALS.inc()
        raise rpc_error(
            Reason.AUTH_UNAVAILABLE,
            "the key store is unavailable and this key was not seen before the outage; retry shortly"
            + (f" ({cause})" if cause else ""),
        )

    def set_degraded(self, degraded: bool, cause: str = "") -> None:
        """Enters or leaves the degraded state (the key store fails); logs each change once."""
        if degraded == self.degraded:
            return
        self.degraded = degraded
        KEY_STORE_DEGRADED.set(1 if degraded else 0)
        if degraded:
            self._degraded_since = time.monotonic()
            if self._signal is not None and not self._signal.done():
                self._signal.set_result(None)
            log.warning(
                "key store unavailable (%s): DEGRADED, serving keys seen in the last %g s from memory, "
                "refusing unknown keys with 503",
                cause or "unreachable",
                self.auth.stale_if_error_seconds,
            )
        else:
            self._signal = None
            log.warning(
                "key store reachable again after %.1f s degraded: keys are checked in the database",
                time.monotonic() - self._degraded_since,
            )

    # -- Authorizer ------------------------------------------------------------------------------

    async def authorize(self, request: auth_pb2.AuthorizeRequest) -> auth_pb2.Principal:
        scopes = required_scopes(request.method)
        if scopes is None:
            return auth_pb2.Principal(name=PUBLIC_PRINCIPAL)
        if not scopes:
            # Self-authenticated (a signed webhook): through without a key, counted by address; its
            # service checks the signature. No scope: nothing is forwarded as a principal.
            await self._count_address(request.client_address)
            return auth_pb2.Principal(name=UNVERIFIED_PRINCIPAL)
        if is_service_token(self.auth, request.api_key):
            # ferry's own processes: the internal scope only, never rate limited.
            if INTERNAL not in scopes:
                raise permission_denied(request.method, scopes)
            return service_principal()
        await self._count_address(request.client_address)
        if not request.api_key:
            raise unauthenticated("no API key was presented (send Authorization: Bearer <key>)")
        record = await self.key_by_hash(hash_key(request.api_key))
        if record is None:
            raise unauthenticated("the API key is not valid")
        try:
            if record.revoke_time is not None:
                raise unauthenticated(f"the API key {record.name} was revoked")
            if record.expire_time is not None and record.expire_time <= now():
                raise unauthenticated(f"the API key {record.name} has expired")
            if not scopes.intersection(record.scopes):
                raise permission_denied(request.method, scopes)
            principal = self.principal(record)
            await self._count(principal, request.client_address, generates=scopes == {INFERENCE})
        except RpcError as err:
            # Who was refused (the audit of an edge refusal names the key, never its secret).
            err.metadata.setdefault(REFUSED_KEY, record.name)
            raise
        return principal

    async def record_usage(self, request: auth_pb2.RecordUsageRequest) -> None:
        tokens = request.completion_tokens
        prefix, _, key_id = request.principal.partition("/")
        if tokens <= 0 or prefix != "keys" or not key_id:
            return
        record = await self.key_by_id(key_id)
        if record is None:
            return
        for window in self.token_windows(self.principal(record), request.client_address):
            # A window takes what still fits; the next inference call is refused until it frees.
            cost = min(tokens, await self.limiter.remaining(window))
            if cost > 0:
                await self.limiter.hit(window, cost)

    # -- limits ----------------------------------------------------------------------------------

    def principal(self, record: KeyRecord) -> auth_pb2.Principal:
        """The caller as services see it, with the limits in force: the key's own, else the defaults."""
        own = record.limits
        inference = self.settings.inference
        tokens_per_minute = own.tokens_per_minute or self.limits.tokens_per_minute
        return auth_pb2.Principal(
            name=record.name,
            display_name=record.display_name,
            scopes=list(record.scopes),
            limits=auth_pb2.Limits(
                requests_per_minute=own.requests_per_minute or self.limits.requests_per_minute,
                tokens_per_minute=tokens_per_minute,
                max_prompt_tokens=own.max_prompt_tokens or inference.max_prompt_tokens,
                max_tokens=own.max_tokens or inference.max_tokens,
            ),
            report_usage=tokens_per_minute > 0 or self.limits.per_address_tokens_per_minute > 0,
        )

    def request_windows(self, principal: auth_pb2.Principal) -> list[Window]:
        windows = []
        if principal.limits.requests_per_minute > 0:
            windows.append(
                Window(
                    "requests per minute for this key",
                    "requests-key",
                    principal.name,
                    principal.limits.requests_per_minute,
                )
            )
        return windows

    def address_window(self, address: str) -> Window | None:
        """The per-address request window, when per-address limits are on."""
        if self.limits.per_address_requests_per_minute <= 0 or not address:
            return None
        return Window(
            "requests per minute from this address",
            "requests-address",
            address,
            self.limits.per_address_requests_per_minute,
        )

    async def _count_address(self, address: str) -> None:
        """Counts every attempt from a client address, before its key is looked up: a flood of wrong
        keys is limited like any other traffic and costs no database query once refused."""
        window = self.address_window(address)
        if window is None:
            return
        wait = await self.limiter.seconds_until_free(window)
        if wait > 0 or not await self.limiter.hit(window):
            raise rate_limited(window.what, wait or await self.limiter.seconds_until_free(window))

    def token_windows(self, principal: auth_pb2.Principal, address: str) -> list[Window]:
        windows = []
        if principal.limits.tokens_per_minute > 0:
            windows.append(
                Window(
                    "generated tokens per minute for this key",
                    "tokens-key",
                    principal.name,
                    principal.limits.tokens_per_minute,
                )
            )
        if self.limits.per_address_tokens_per_minute > 0 and address:
            windows.append(
                Window(
                    "generated tokens per minute from this address",
                    "tokens-address",
                    address,
                    self.limits.per_address_tokens_per_minute,
                )
            )
        return windows

    async def _count(self, principal: auth_pb2.Principal, address: str, *, generates: bool) -> None:
        """Refuses when a window is spent; otherwise counts the call in every request window."""
        requests = self.request_windows(principal)
        checked = requests + (self.token_windows(principal, address) if generates else [])
        for window in checked:
            wait = await self.limiter.seconds_until_free(window)
            if wait > 0:
                raise rate_limited(window.what, wait)
        for window in requests:
            if not await self.limiter.hit(window):  # another call took the last place meanwhile
                raise rate_limited(window.what, await self.limiter.seconds_until_free(window))
