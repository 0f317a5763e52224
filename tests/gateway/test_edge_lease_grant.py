"""How the gateway sizes an edge lease (gateway/edge_lease.py): never past the key's limits, its expiry,
a revocation or scope change it has read, or the gateway's trust in its cached copy of the key, and
never during a key-store outage. The behaviour through Envoy is tests/auth/test_edge_lease.py."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

from ferry.auth.v1 import auth_pb2

from gateway.authorizer import LocalAuthorizer
from gateway.edge_lease import EdgeLease, LeaseGrantor
from gateway.store import KeyRecord
from services.common.config import AuthSettings, RateLimitSettings, Settings
from services.common.timestamps import now
from services.common.tokens import new_key_secret
from tests.resilience.test_stale_keys import FlakyStore

GENERATE = "/ferry.inference.v1.InferenceService/Generate"
LIST_MODELS = "/ferry.openai.v1.OpenAIService/ListModels"
HEALTH = "/grpc.health.v1.Health/Check"
ADDRESS = "10.0.0.7"


def authorizer(**auth: Any) -> tuple[LeaseGrantor, FlakyStore]:
    settings = Settings(auth=AuthSettings(**{"cache_seconds": 2.0, **auth}))
    local = LocalAuthorizer(settings)
    store = FlakyStore()
    local.attach(store)  # type: ignore[arg-type]
    return LeaseGrantor(local), store


def change(store: FlakyStore, record: KeyRecord, **fields: Any) -> KeyRecord:
    changed = dataclasses.replace(record, **fields)
    store.records[record.key_hash] = changed
    return changed


async def allow_and_lease(leases: LeaseGrantor, secret: str, method: str = LIST_MODELS) -> EdgeLease | None:
    request = auth_pb2.AuthorizeRequest(api_key=secret, method=method, client_address=ADDRESS)
    principal = await leases.authorizer.authorize(request)
    return await leases.grant(request, principal)


async def test_an_unlimited_key_gets_a_whole_renewable_lease_within_the_cache_time() -> None:
    leases, store = authorizer(edge_lease_requests=100)
    secret = new_key_secret()
    record = store.add(secret)
    lease = await allow_and_lease(leases, secret)
    assert lease is not None
    assert lease.requests == 100
    assert lease.principal.name == record.name and list(lease.principal.scopes) == ["inference"]
    assert 1900 <= lease.ttl_ms <= 2000
    # It counted nothing: Envoy renews it halfway through its life.
    assert lease.renew_ms == lease.ttl_ms // 2
    assert lease.metadata()["lease_requests"] == 100
    assert lease.metadata()["lease_ttl_ms"] == lease.ttl_ms
    # An unlimited key's generations are leased too.
    assert await allow_and_lease(leases, secret, GENERATE) is not None


async def test_a_lease_counts_what_it_grants_within_the_rate_and_what_is_left() -> None:
    leases, store = authorizer()
    local = leases.authorizer
    secret = new_key_secret()
    store.add(secret, rpm=600)
    lease = await allow_and_lease(leases, secret)
    # No more than the window allows in the lease's life: 600 a minute is 20 in 2 s.
    assert lease is not None and lease.requests == 20
    assert lease.renew_ms is None  # renewing early would waste what it counted
    window = local.request_windows(lease.principal)[0]
    assert await local.limiter.remaining(window) == 600 - 1 - 20
    # Near the limit a lease takes at most an eighth of what is left ...
    await local.limiter.hit(window, 600 - 1 - 20 - 40)  # 40 left
    near = await allow_and_lease(leases, secret)
    assert near is not None and near.requests == 39 // 8
    # ... and with less than 16 left every request is checked.
    await local.limiter.hit(window, 39 - near.requests - 10)  # 10 left
    assert await allow_and_lease(leases, secret) is None
    # A limited key's generations are checked one by one.
    assert await allow_and_lease(leases, secret, GENERATE) is None


async def test_every_window_fits_or_none_is_counted() -> None:
    leases, store = authorizer(rate_limits=RateLimitSettings(per_address_requests_per_minute=10_000))
    secret = new_key_secret()
    store.add(secret, rpm=1000)
    local = leases.authorizer
    address = local.address_window(ADDRESS)
    assert address is not None
    await local.limiter.hit(address, 10_000 - 20)  # the address has 20 left; the key 999 after the check
    lease = await allow_and_lease(leases, secret)
    assert lease is not None and lease.requests == 19 // 8  # the tighter window sizes it
    key_window = local.request_windows(lease.principal)[0]
    assert await local.limiter.remaining(key_window) == 1000 - 1 - lease.requests


async def test_no_lease_past_the_key_expiry() -> None:
    leases, store = authorizer()
    secret = new_key_secret()
    change(store, store.add(secret), expire_time=now() + timedelta(seconds=0.5))
    lease = await allow_and_lease(leases, secret)
    assert lease is not None and lease.ttl_ms <= 500


async def test_no_lease_once_a_revocation_or_scope_change_is_read() -> None:
    leases, store = authorizer(cache_seconds=0.4)
    secret = new_key_secret()
    record = store.add(secret)
    assert await allow_and_lease(leases, secret) is not None
    # Revoked through another replica; past half the cache time the key is read again (in the
    # background): the request that was allowed from the old copy gets no lease once it is read.
    change(store, record, revoke_time=now())
    await asyncio.sleep(0.25)
    await allow_and_lease(leases, secret)
    await asyncio.sleep(0.05)
    assert leases.authorizer.by_hash[record.key_hash].revoke_time is not None  # type: ignore[union-attr]
    request = auth_pb2.AuthorizeRequest(api_key=secret, method=LIST_MODELS, client_address=ADDRESS)
    principal = leases.authorizer.principal(record)
    assert await leases.grant(request, principal) is None
    # Scopes changed: the old decision is not leased either.
    other = new_key_secret()
    other_record = store.add(other)
    assert await allow_and_lease(leases, other) is not None
    change(store, other_record, scopes=("read",))
    leases.authorizer.forget(other_record)
    await leases.authorizer.reread(other_record.key_hash)
    assert await leases.grant(request.__class__(api_key=other, method=LIST_MODELS), principal) is None


async def test_a_key_past_half_its_cache_time_is_read_again_for_the_next_lease() -> None:
    leases, store = authorizer(cache_seconds=0.4)
    secret = new_key_secret()
    store.add(secret)
    assert await allow_and_lease(leases, secret) is not None
    assert store.calls == 1
    await asyncio.sleep(0.25)  # past half of cache_seconds: this lease gets what is left
    short = await allow_and_lease(leases, secret)
    assert short is not None and short.ttl_ms <= 150
    await asyncio.sleep(0.01)
    assert store.calls == 2  # read again in the background
    renewed = await allow_and_lease(leases, secret)
    assert renewed is not None and renewed.ttl_ms >= 300


async def test_no_lease_from_a_stale_record_or_while_degraded() -> None:
    leases, store = authorizer(cache_seconds=0.3, key_store_timeout_seconds=0.1)
    secret = new_key_secret()
    store.add(secret)
    assert await allow_and_lease(leases, secret) is not None
    await asyncio.sleep(0.35)  # past cache_seconds: the next check asks the store, which fails
    store.mode = "fail"
    assert await allow_and_lease(leases, secret) is None  # allowed from the stale record, not leased
    assert leases.authorizer.degraded


async def test_no_lease_when_off_or_for_public_methods() -> None:
    leases, store = authorizer(edge_lease_requests=0)
    secret = new_key_secret()
    store.add(secret)
    assert await allow_and_lease(leases, secret) is None
    leases, store = authorizer()
    store.add(secret)
    assert await allow_and_lease(leases, secret, HEALTH) is None
