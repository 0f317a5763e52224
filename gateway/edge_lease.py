"""Edge leases: the key decision made once, then reused by Envoy without a round trip.

When the edge check (ext_authz) allows a request and Envoy asked for a lease (`x-ferry-lease: want`,
sent only by envoy/edge_lease.lua), the gateway may also grant one: up to `auth.edge_lease_requests`
more requests of the same API key, method and client address, which the Lua filter admits itself
(forwarding the same Principal) until the lease is used up or ends, skipping the check. It is the
decision the gateway would make again, so a lease is granted only where that holds for its whole life:

- **Revocation, expiry, scopes**: a lease lasts at most what is left of the gateway's trust in its
  cached copy of the key (`auth.cache_seconds` after it was read from the store), never past the
  key's expiry, and only while that copy still makes the same decision; so a revoked key stops working
  at the edge within `auth.cache_seconds`. Past half its trust the copy is read again in the
  background, so the next lease gets a whole `cache_seconds`.
- **Rate limits**: the lease's requests are counted in the key's (and the address's) request windows
  when it is granted (all windows or none), so a key never gets more than its limit; a lease takes at
  most an eighth of what is left and no more than the window allows in the lease's life, so a key
  near its limit is checked request by request, and a lease that ends unused costs little. A key with
  request or token limits gets no lease for generations: their answers, which carry the lease to
  Envoy, may come after it ended, and their tokens are counted only afterwards.
- **Outages**: no lease while the key store is degraded or the key was answered from a stale record:
  those requests go on being checked one by one.

Envoy holds leases per worker thread; each worker asks for its own. A lease that counted nothing (a
key without request limits) is renewed halfway through its life, so steady traffic never meets an
expired one. Its life is sent as a duration, which Envoy counts from when it sent the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

from ferry.auth.v1 import auth_pb2
from google.protobuf import struct_pb2
from prometheus_client import Counter

from gateway.authorizer import LocalAuthorizer
from gateway.store import KeyRecord
from services.common.access import INFERENCE, required_scopes
from services.common.edge import encode_principal
from services.common.errors import RpcError
from services.common.timestamps import now
from services.common.tokens import hash_key, is_service_token

log = logging.getLogger(__name__)

# A lease takes at most this share of what is left in a request window (1/8): several Envoy workers
# and replicas each holding one never overrun the limit, and a key near it is checked every time.
WINDOW_SHARE = 8
# Fewer requests than this are not worth a lease (the next check would come at once anyway).
MIN_LEASE_REQUESTS = 2
# A lease shorter than this is not granted (it would expire before Envoy used it).
MIN_LEASE_SECONDS = 0.05
# envoy/edge_lease.lua asks for a lease (`want`) when it will keep one: not while another check of
# the same lease is under way in its worker (a second lease would replace the first, and what was
# counted for it would be lost), and never for a caller (it removes any copy a client sent).
LEASE_HEADER = "x-ferry-lease"
WANT_LEASE = "want"
# Dynamic metadata fields of the check's answer (envoy/edge_lease.lua reads them).
LEASE_REQUESTS = "lease_requests"
LEASE_TTL_MS = "lease_ttl_ms"
LEASE_PRINCIPAL = "lease_principal"
LEASE_RENEW_MS = "lease_renew_ms"

LEASES_GRANTED = Counter(
    "ferry_gateway_edge_leases_total",
    "Edge leases granted to Envoy (requests of one key and method Envoy admits without a key check).",
)
LEASED_REQUESTS = Counter(
    "ferry_gateway_edge_leased_requests_total",
    "Requests granted in edge leases (counted against rate limits when granted).",
)


@dataclass(frozen=True)
class EdgeLease:
    requests: int
    # How long the lease lasts, in milliseconds from when Envoy sent the check (envoy/edge_lease.lua
    # counts from its own clock: no wall clocks of two hosts are compared).
    ttl_ms: int
    principal: auth_pb2.Principal
    # After how many milliseconds Envoy should ask for the next lease while this one still serves
    # (halfway through its life); only for a lease that counted nothing, so replacing it loses nothing.
    renew_ms: int | None = None

    def metadata(self) -> struct_pb2.Struct:
        """The check answer's dynamic metadata (namespace envoy.filters.http.ext_authz)."""
        struct = struct_pb2.Struct()
        struct.update(
            {
                LEASE_REQUESTS: self.requests,
                LEASE_TTL_MS: self.ttl_ms,
                LEASE_PRINCIPAL: encode_principal(self.principal),
            }
        )
        if self.renew_ms is not None:
            struct[LEASE_RENEW_MS] = self.renew_ms
        return struct


class LeaseGrantor:
    """Grants leases for `authorizer`'s decisions (gateway/ext_authz.py asks after each allow)."""

    def __init__(self, authorizer: LocalAuthorizer) -> None:
        self.authorizer = authorizer
        # Refresh-ahead lookups under way (kept so they are not collected mid-flight).
        self._rereads: set[asyncio.Task[None]] = set()

    async def grant(
        self, request: auth_pb2.AuthorizeRequest, principal: auth_pb2.Principal
    ) -> EdgeLease | None:
        """A lease for more requests like `request`, which the authorizer has just allowed, or None.
        Never raises: without a lease the next request is simply checked."""
        try:
            return await self._grant(request, principal)
        except Exception:
            log.exception("edge lease not granted")
            return None

    async def _grant(
        self, request: auth_pb2.AuthorizeRequest, principal: auth_pb2.Principal
    ) -> EdgeLease | None:
        authorizer = self.authorizer
        most = authorizer.auth.edge_lease_requests
        scopes = required_scopes(request.method)
        if most < MIN_LEASE_REQUESTS or not scopes or not request.api_key or authorizer.degraded:
            return None
        if is_service_token(authorizer.auth, request.api_key):
            return None
        key_hash = hash_key(request.api_key)
        record, read_at = authorizer.by_hash.get(key_hash), authorizer.read_at.get(key_hash)
        if record is None or read_at is None:
            return None  # answered from a stale record (an outage) or just forgotten (revoked here)
        # The record must still make the decision that was just made (a revocation, expiry or scope
        # change read meanwhile ends leasing at once).
        if not self._decides_alike(record, scopes, principal):
            return None
        age = time.monotonic() - read_at
        if age > authorizer.auth.cache_seconds / 2:
            # Refresh-ahead, in the background: past half its trust the key is read again, so the
            # next lease (a renewal) gets a whole cache_seconds instead of what is left of this one.
            self._reread(key_hash)
        seconds = authorizer.auth.cache_seconds - age
        if record.expire_time is not None:
            seconds = min(seconds, record.expire_time.timestamp() - time.time())
        if seconds < MIN_LEASE_SECONDS:
            return None
        windows = authorizer.request_windows(principal)
        address = authorizer.address_window(request.client_address)
        if address is not None:
            windows.append(address)
        generates = scopes == {INFERENCE}
        if generates and (windows or authorizer.token_windows(principal, request.client_address)):
            # A generation's answer (which carries the lease to Envoy) may come seconds later, when
            # the lease has ended unused; and its tokens are counted only after it. Such a key's
            # generations are checked one by one.
            return None
        limiter = authorizer.limiter
        for window in windows:
            # At most an eighth of what is left, and no more than the window allows in the lease's life.
            most = min(
                most,
                await limiter.remaining(window) // WINDOW_SHARE,
                math.ceil(window.per_minute * seconds / 60),
            )
        if most < MIN_LEASE_REQUESTS:
            return None
        for window in windows:  # all fit, or none is counted
            if await limiter.seconds_until_free(window, most) > 0:
                return None
        for window in windows:
            await limiter.hit(window, most)
        LEASES_GRANTED.inc()
        LEASED_REQUESTS.inc(most)
        renew = None if windows else int(seconds * 500)
        return EdgeLease(most, int(seconds * 1000), principal, renew)

    def _decides_alike(
        self, record: KeyRecord, scopes: frozenset[str] | set[str], principal: auth_pb2.Principal
    ) -> bool:
        if record.revoke_time is not None:
            return False
        if record.expire_time is not None and record.expire_time <= now():
            return False
        if not scopes.intersection(record.scopes):
            return False
        return self.authorizer.principal(record) == principal

    def _reread(self, key_hash: str) -> None:
        async def reread() -> None:
            with contextlib.suppress(RpcError):  # an outage: the authorizer reports it
                await self.authorizer.reread(key_hash)

        task = asyncio.create_task(reread(), name="edge-lease-reread")
        self._rereads.add(task)
        task.add_done_callback(self._rereads.discard)
