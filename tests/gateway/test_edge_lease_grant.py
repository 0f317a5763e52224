"""How the gateway sizes an edge lease (gateway/edge_lease.py): never past the key's limits, its expiry
or the gateway's trust in its cached copy of the key, and never during a key-store outage. The
behaviour through Envoy is tests/auth/test_edge_lease.py."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from ferry.auth.v1 import auth_pb2

from gateway import edge_lease
from gateway.authorizer import LocalAuthorizer
from services.common.config import AuthSettings, Settings
from services.common.timestamps import now
from services.common.tokens import new_key_secret
from tests.resilience.test_stale_keys import FlakyStore

GENERATE = "/ferry.inference.v1.InferenceService/Generate"
LIST_MODELS = "/ferry.openai.v1.OpenAIService/ListModels"
HEALTH = "/grpc.health.v1.Health/Check"


def authorizer(**auth: Any) -> tuple[LocalAuthorizer, FlakyStore]:
    settings = Settings(auth=AuthSettings(**{"cache_seconds": 2.0, **auth}))
    local = LocalAuthorizer(settings)
    store = FlakyStore()
    local.attach(store)  # type: ignore[arg-type]
    return local, store


async def allow_and_lease(
    local: LocalAuthorizer, secret: str, method: str = LIST_MODELS
) -> edge_lease.EdgeLease | None:
    request = auth_pb2.AuthorizeRequest(api_key=secret, method=method, client_address="10.0.0.7")
    principal = await local.authorize(request)
    return await edge_lease.grant(local, request, principal)


async def test_an_unlimited_key_gets_a_whole_lease_within_the_cache_time() -> None:
    local, store = authorizer(edge_lease_requests=100)
    secret = new_key_secret()
    record = store.add(secret)
    before = time.time()
    lease = await allow_and_lease(local, secret)
    assert lease is not None
    assert lease.requests == 100
    assert lease.principal.name == record.name and list(lease.principal.scopes) == ["inference"]
    assert before * 1000 < lease.expire_ms <= (time.time() + 2.0) * 1000
    assert lease.metadata()["lease_requests"] == 100
    # It counted nothing: Envoy renews it halfway through its life.
    assert lease.renew_ms is not None and before * 1000 < lease.renew_ms < lease.expire_ms
    assert lease.metadata()["lease_renew_ms"] == lease.renew_ms


async def test_a_lease_takes_an_eighth_of_the_rate_limit_left_and_counts_it() -> None:
    local, store = authorizer()
    secret = new_key_secret()
    store.add(secret, rpm=100)
    lease = await allow_and_lease(local, secret)
    assert lease is not None and lease.requests == 99 // 8
    assert lease.renew_ms is None  # renewing early would waste what it counted
    window = local.request_windows(lease.principal)[0]
    assert await local.limiter.remaining(window) == 100 - 1 - lease.requests
    # Near the limit, every request is checked.
    small, _ = authorizer()
    small_secret = new_key_secret()
    small.attach(store)  # type: ignore[arg-type]
    store.add(small_secret, rpm=10)
    assert await allow_and_lease(small, small_secret) is None


async def test_no_lease_past_the_key_expiry() -> None:
    local, store = authorizer()
    secret = new_key_secret()
    record = store.add(secret)
    store.records[record.key_hash] = record.__class__(
        **{**record.__dict__, "expire_time": now() + timedelta(seconds=0.5)}
    )
    lease = await allow_and_lease(local, secret)
    assert lease is not None and lease.expire_ms <= (time.time() + 0.5) * 1000


async def test_a_generation_lease_fits_the_token_limit() -> None:
    local, store = authorizer()
    secret = new_key_secret()
    record = store.add(secret)
    limits = auth_pb2.Limits(tokens_per_minute=1000, max_tokens=100)
    store.records[record.key_hash] = record.__class__(**{**record.__dict__, "limits": limits})
    lease = await allow_and_lease(local, secret, GENERATE)
    assert lease is not None and lease.requests == 10
    # Without max_tokens a request may generate far more: no lease within 1000 tokens a minute.
    unbounded = auth_pb2.Limits(tokens_per_minute=1000)
    store.records[record.key_hash] = record.__class__(**{**record.__dict__, "limits": unbounded})
    local.forget(record)
    assert await allow_and_lease(local, secret, GENERATE) is None


async def test_no_lease_from_a_stale_record_or_while_degraded() -> None:
    local, store = authorizer(cache_seconds=0.3, key_store_timeout_seconds=0.1)
    secret = new_key_secret()
    store.add(secret)
    assert await allow_and_lease(local, secret) is not None
    await asyncio.sleep(0.35)  # past cache_seconds: the next check asks the store, which fails
    store.mode = "fail"
    assert await allow_and_lease(local, secret) is None  # allowed from the stale record, not leased
    assert local.degraded


async def test_no_lease_when_off_or_for_public_methods() -> None:
    local, store = authorizer(edge_lease_requests=0)
    secret = new_key_secret()
    store.add(secret)
    assert await allow_and_lease(local, secret) is None
    local, store = authorizer()
    store.add(secret)
    assert await allow_and_lease(local, secret, HEALTH) is None


async def test_a_key_past_half_its_cache_time_is_read_again_for_a_whole_lease() -> None:
    local, store = authorizer(cache_seconds=0.4)
    secret = new_key_secret()
    store.add(secret)
    assert await allow_and_lease(local, secret) is not None
    assert store.calls == 1
    await asyncio.sleep(0.25)  # past half of cache_seconds: the lease would last only 0.15 s
    lease = await allow_and_lease(local, secret)
    assert store.calls == 2
    assert lease is not None and lease.expire_ms >= (time.time() + 0.3) * 1000
