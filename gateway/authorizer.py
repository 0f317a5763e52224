"""The gateway's own authorization decision: authenticate a key, check its scope, apply rate limits.

Every service's interceptor asks for it over `AuthService/Authorize`; the gateway's own interceptor
and Envoy's edge check (ext_authz) call it in-process. Keys are looked up by the hash of the secret and
kept for `auth.cache_seconds` (misses too, so a flood of wrong keys does not reach PostgreSQL); a
revocation made through this gateway drops its entry at once.
"""

from __future__ import annotations

import logging

from cachetools import TTLCache
from ferry.auth.v1 import auth_pb2

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
        record = await self._store().by_hash(key_hash)
        self.by_hash[key_hash] = record
        if record is not None:
            self.by_id[record.id] = record
        return record

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        if key_id in self.by_id:
            return self.by_id[key_id]
        record = await self._store().by_id(key_id)
        self.by_id[key_id] = record
        return record

    def forget(self, record: KeyRecord) -> None:
        """Drops what the cache knows of a key that changed here (revoked, created)."""
        self.by_hash.pop(record.key_hash, None)
        self.by_id.pop(record.id, None)

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
        for window in self._token_windows(self.principal(record), request.client_address):
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

    def _request_windows(self, principal: auth_pb2.Principal) -> list[Window]:
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

    async def _count_address(self, address: str) -> None:
        """Counts every attempt from a client address, before its key is looked up: a flood of wrong
        keys is limited like any other traffic and costs no database query once refused."""
        if self.limits.per_address_requests_per_minute <= 0 or not address:
            return
        window = Window(
            "requests per minute from this address",
            "requests-address",
            address,
            self.limits.per_address_requests_per_minute,
        )
        wait = await self.limiter.seconds_until_free(window)
        if wait > 0 or not await self.limiter.hit(window):
            raise rate_limited(window.what, wait or await self.limiter.seconds_until_free(window))

    def _token_windows(self, principal: auth_pb2.Principal, address: str) -> list[Window]:
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
        requests = self._request_windows(principal)
        checked = requests + (self._token_windows(principal, address) if generates else [])
        for window in checked:
            wait = await self.limiter.seconds_until_free(window)
            if wait > 0:
                raise rate_limited(window.what, wait)
        for window in requests:
            if not await self.limiter.hit(window):  # another call took the last place meanwhile
                raise rate_limited(window.what, await self.limiter.seconds_until_free(window))
