"""Edge leases: the key decision made once, then reused by Envoy without a round trip.

When the edge check (ext_authz) allows a request, the gateway may also grant Envoy a *lease*: up to
`auth.edge_lease_requests` more requests of the same API key, method and client address, which
envoy/edge_lease.lua admits itself (forwarding the same Principal) until the lease is used up or
expires, skipping the check. It is the same decision the gateway would make again, so a lease is
granted only where that holds for its whole life:

- **Revocation and expiry**: a lease lasts at most what is left of the gateway's trust in its cached
  copy of the key (`auth.cache_seconds` after the key was read from the store; a copy past half of
  that is read again first) and never past the key's expiry, so a revoked key stops working at the
  edge within `auth.cache_seconds`, as before.
- **Rate limits**: the lease's requests are counted in the key's (and the address's) request windows
  when it is granted, so a key never gets more than its limit; a lease takes at most an eighth of what
  is left in each window, so a key near its limit is checked request by request (and is refused at
  most that early when a lease goes unused). A generating method is leased only while its token
  windows hold a whole lease's worth of `max_tokens`.
- **Outages**: no lease while the key store is degraded or the key was answered from a stale record:
  those requests go on being checked one by one.

Envoy holds leases per worker thread; each worker asks for its own. A lease that counted nothing (a
key without request limits) is renewed halfway through its life, so steady traffic never meets an
expired one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ferry.auth.v1 import auth_pb2
from google.protobuf import struct_pb2
from prometheus_client import Counter

from gateway.authorizer import LocalAuthorizer
from services.common.access import INFERENCE, required_scopes
from services.common.edge import encode_principal
from services.common.tokens import hash_key, is_service_token

# A lease takes at most this share of what is left in a request window (1/8): several Envoy workers
# and replicas each holding one never overrun the limit, and a key near it is checked every time.
WINDOW_SHARE = 8
# Fewer requests than this are not worth a lease (the next check would come at once anyway).
MIN_LEASE_REQUESTS = 2
# A lease shorter than this is not granted (it would expire before Envoy used it).
MIN_LEASE_SECONDS = 0.05
# What one request may generate when the key sets no max_tokens (its token windows are then compared
# with a lease's worth of this).
UNBOUNDED_MAX_TOKENS = 4096
# envoy/edge_lease.lua asks for no lease (`no`) while another check of the same lease is under way.
LEASE_HEADER = "x-ferry-lease"
NO_LEASE = "no"
# Dynamic metadata fields of the check's answer (envoy/edge_lease.lua reads them).
LEASE_REQUESTS = "lease_requests"
LEASE_EXPIRE_MS = "lease_expire_ms"
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
    # Wall-clock expiry in milliseconds since the epoch (Envoy compares it with its own clock).
    expire_ms: int
    principal: auth_pb2.Principal
    # When Envoy should ask for the next lease while this one still serves (halfway through its life);
    # only for a lease that counted nothing against a limit, so replacing it early loses nothing.
    renew_ms: int | None = None

    def metadata(self) -> struct_pb2.Struct:
        """The check answer's dynamic metadata (namespace envoy.filters.http.ext_authz)."""
        struct = struct_pb2.Struct()
        struct.update(
            {
                LEASE_REQUESTS: self.requests,
                LEASE_EXPIRE_MS: self.expire_ms,
                LEASE_PRINCIPAL: encode_principal(self.principal),
            }
        )
        if self.renew_ms is not None:
            struct[LEASE_RENEW_MS] = self.renew_ms
        return struct


async def grant(
    authorizer: LocalAuthorizer, request: auth_pb2.AuthorizeRequest, principal: auth_pb2.Principal
) -> EdgeLease | None:
    """A lease for more requests like `request`, which `authorizer` has just allowed, or None."""
    most = authorizer.auth.edge_lease_requests
    scopes = required_scopes(request.method)
    if most < MIN_LEASE_REQUESTS or not scopes or not request.api_key or authorizer.degraded:
        return None
    if is_service_token(authorizer.auth, request.api_key):
        return None
    key_hash = hash_key(request.api_key)
    read_at = authorizer.read_at.get(key_hash)
    if read_at is not None and time.monotonic() - read_at > authorizer.auth.cache_seconds / 2:
        # Refresh-ahead: past half its trust, the key is read again so the lease gets a whole
        # cache_seconds (a renewal every half lease, not a lease that halves each time).
        await authorizer.reread(key_hash)
    record, read_at = authorizer.by_hash.get(key_hash), authorizer.read_at.get(key_hash)
    if record is None or read_at is None or record.name != principal.name:
        return None  # answered from a stale record (an outage) or just forgotten (revoked here)
    seconds = authorizer.auth.cache_seconds - (time.monotonic() - read_at)
    wall = time.time()
    if record.expire_time is not None:
        seconds = min(seconds, record.expire_time.timestamp() - wall)
    if seconds < MIN_LEASE_SECONDS:
        return None
    windows = authorizer.request_windows(principal)
    address = authorizer.address_window(request.client_address)
    if address is not None:
        windows.append(address)
    limiter = authorizer.limiter
    for window in windows:
        most = min(most, await limiter.remaining(window) // WINDOW_SHARE)
    if scopes == {INFERENCE}:
        per_request = principal.limits.max_tokens or UNBOUNDED_MAX_TOKENS
        for window in authorizer.token_windows(principal, request.client_address):
            most = min(most, await limiter.remaining(window) // per_request)
    if most < MIN_LEASE_REQUESTS:
        return None
    for window in windows:
        if not await limiter.hit(window, most):  # another check took the room meanwhile
            return None
    LEASES_GRANTED.inc()
    LEASED_REQUESTS.inc(most)
    renew = None if windows else int((wall + seconds / 2) * 1000)
    return EdgeLease(most, int((wall + seconds) * 1000), principal, renew)
