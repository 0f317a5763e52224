"""The gateway's key checks while its key store fails (stale-if-error), against a store that fails or
hangs on command: the error paths of gateway/authorizer.py. The real outage (PostgreSQL paused under
load behind Envoy) is tests/resilience/test_database_outage.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from ferry.auth.v1 import auth_pb2

from gateway import key_memory
from gateway.authorizer import KEY_STORE_DEGRADED, UNKNOWN_KEY_WAIT_SECONDS, LocalAuthorizer
from gateway.key_memory import MEMORY_KEYS, KeyMemory
from gateway.store import KeyRecord
from launcher.envoy import render_envoy_config
from services.common.config import AuthSettings, Settings
from services.common.errors import Reason, RpcError, rpc_error
from services.common.timestamps import now
from services.common.tokens import hash_key, new_key_secret
from tests.stack import stack_settings

GENERATE = "/ferry.inference.v1.InferenceService/Generate"


class FlakyStore:
    """Answers from a dict; `mode` "fail" raises what Database.connection raises when PostgreSQL is
    down, "hang" never answers (a paused or partitioned database), "slow" answers after `delay`."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.mode = "ok"
        self.calls = 0
        self.delay = 0.0
        self.release = asyncio.Event()

    def add(self, secret: str, *, revoked: bool = False, rpm: int = 0) -> KeyRecord:
        record = KeyRecord(
            id=f"id{len(self.records)}",
            display_name="k",
            key_hash=hash_key(secret),
            scopes=("inference",),
            limits=auth_pb2.Limits(requests_per_minute=rpm),
            create_time=now(),
            expire_time=None,
            revoke_time=now() - timedelta(seconds=1) if revoked else None,
            creator="test",
        )
        self.records[record.key_hash] = record
        return record

    async def _answer(self, found: KeyRecord | None) -> KeyRecord | None:
        self.calls += 1
        if self.mode == "fail":
            raise rpc_error(Reason.DATABASE_UNAVAILABLE, "database unavailable: OperationalError")
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        return found

    async def by_hash(self, key_hash: str) -> KeyRecord | None:
        return await self._answer(self.records.get(key_hash))

    async def by_id(self, key_id: str) -> KeyRecord | None:
        return await self._answer(next((r for r in self.records.values() if r.id == key_id), None))

    # What gateway/key_memory.py reads (the SQL is gateway/store.py's; this is its meaning).
    async def page(self, *, show_inactive: bool, after: tuple[Any, ...] | None, size: int) -> list[KeyRecord]:
        await self._answer(None)
        found = sorted(
            (r for r in self.records.values() if show_inactive or r.revoke_time is None),
            key=lambda r: (r.create_time, r.id),
            reverse=True,
        )
        return [r for r in found if after is None or (r.create_time, r.id) < after][:size]

    async def changed_since(self, since: datetime, limit: int) -> list[KeyRecord]:
        await self._answer(None)
        changed = [
            r for r in self.records.values() if max(r.create_time, r.revoke_time or r.create_time) >= since
        ]
        return changed[:limit]

    def revoke(self, record: KeyRecord) -> KeyRecord:
        """Revoked elsewhere (another gateway replica, or in the database)."""
        revoked = dataclasses.replace(record, revoke_time=now())
        self.records[record.key_hash] = revoked
        return revoked


def authorizer(**auth: Any) -> tuple[LocalAuthorizer, FlakyStore]:
    settings = Settings(
        auth=AuthSettings(**{"cache_seconds": 0.05, "key_store_timeout_seconds": 0.2, **auth})
    )
    local = LocalAuthorizer(settings)
    store = FlakyStore()
    local.attach(store)  # type: ignore[arg-type]
    return local, store


async def check(local: LocalAuthorizer, secret: str) -> auth_pb2.Principal:
    return await local.authorize(auth_pb2.AuthorizeRequest(api_key=secret, method=GENERATE))


async def refused(local: LocalAuthorizer, secret: str) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await check(local, secret)
    return caught.value


def degraded_gauge() -> float:
    return float(KEY_STORE_DEGRADED._value.get())


async def eventually(condition: Any, what: str, timeout: float = 10.0) -> None:
    """Waits (generously: a loaded CI box) for a condition the code reaches by itself."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def degraded_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.authorizer" and r.levelno >= logging.WARNING
    ]


async def test_known_key_keeps_working_and_unknown_is_503_while_the_store_fails() -> None:
    local, store = authorizer()
    known, unknown = new_key_secret(), new_key_secret()
    record = store.add(known)
    assert (await check(local, known)).name == record.name
    await asyncio.sleep(0.1)  # past auth.cache_seconds: the next check asks the store
    store.mode = "fail"
    for _ in range(3):
        assert (await check(local, known)).name == record.name
    err = await refused(local, unknown)
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == Reason.AUTH_UNAVAILABLE
    assert err.retry_after_seconds is not None and err.http_status == 503
    assert local.degraded and degraded_gauge() == 1
    store.mode = "ok"
    await asyncio.sleep(0.1)
    # Degraded: answered from memory at once, while the lookup it starts finds the store back.
    assert (await check(local, known)).name == record.name
    await asyncio.sleep(0.05)
    assert not local.degraded and degraded_gauge() == 0


async def test_a_hanging_store_costs_a_known_key_the_store_timeout_until_it_counts_as_down() -> None:
    """Each check of a known key waits at most the store timeout (then its stale record answers);
    once a lookup has gone the unknown-key wait without an answer the store is down, and checks
    answer at once."""
    local, store = authorizer()
    known = new_key_secret()
    store.add(known)
    await check(local, known)
    await asyncio.sleep(0.1)
    store.mode = "hang"
    started = time.monotonic()
    await check(local, known)
    first = time.monotonic() - started
    started = time.monotonic()
    for _ in range(20):
        await check(local, known)
    rest = time.monotonic() - started
    assert local.degraded
    # One lookup per key at a time, however many checks wait on it.
    assert store.calls == 2
    print(f"first check during the stall {first * 1000:.0f} ms, next 20 {rest * 1000:.0f} ms")
    assert first >= 0.2  # it did wait for the store
    store.release.set()
    # The pending lookup answers (late: it starts one probe lookup, which answers at once): back to normal.
    await eventually(lambda: not local.degraded, "still degraded after the store answered again")
    assert degraded_gauge() == 0


async def test_revoked_and_rate_limited_keys_stay_refused_during_an_outage() -> None:
    local, store = authorizer(rate_limits={"requests_per_minute": 0})
    revoked, limited = new_key_secret(), new_key_secret()
    store.add(revoked, revoked=True)
    store.add(limited, rpm=3)
    assert (await refused(local, revoked)).code == grpc.StatusCode.UNAUTHENTICATED
    await check(local, limited)
    await asyncio.sleep(0.1)
    store.mode = "fail"
    assert (await refused(local, revoked)).code == grpc.StatusCode.UNAUTHENTICATED
    await check(local, limited)
    await check(local, limited)
    # The rate limits live outside the database: the outage does not reset or skip them.
    assert (await refused(local, limited)).code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_stale_record_is_bounded_and_forgotten_on_a_local_change() -> None:
    local, store = authorizer(stale_if_error_seconds=0.3)
    bounded, changed = new_key_secret(), new_key_secret()
    store.add(bounded)
    record = store.add(changed)
    await check(local, bounded)
    await check(local, changed)
    await asyncio.sleep(0.1)
    store.mode = "fail"
    await check(local, bounded)
    local.forget(record)  # revoked (or changed) through this gateway: no stale copy survives it
    assert (await refused(local, changed)).code == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(0.3)  # past auth.stale_if_error_seconds since the last good lookup
    assert (await refused(local, bounded)).code == grpc.StatusCode.UNAVAILABLE


async def test_a_key_only_another_replica_checked_works_through_an_outage() -> None:
    # Envoy may send a key's checks (few, with edge leases) all to one replica; the one asked once the
    # database stops answering knows the key from its background read of the store.
    local, store = authorizer()
    memory = KeyMemory(local, store)  # type: ignore[arg-type]
    await memory.read_once()  # the full read: every working key
    old_key, new_key = new_key_secret(), new_key_secret()
    old = store.add(old_key)  # created after the full read: the next read takes what changed since
    await memory.read_once()
    new = store.add(new_key)
    await memory.read_once()
    assert store.calls == 3  # reads only, no lookup of either key by this replica
    assert MEMORY_KEYS._value.get() == 2
    store.mode = "fail"
    assert (await check(local, old_key)).name == old.name
    assert (await check(local, new_key)).name == new.name
    assert (await refused(local, new_key_secret())).reason == Reason.AUTH_UNAVAILABLE


async def test_a_key_revoked_through_another_replica_stays_refused_in_an_outage() -> None:
    local, store = authorizer()
    memory = KeyMemory(local, store)  # type: ignore[arg-type]
    secret = new_key_secret()
    record = store.add(secret)
    assert (await check(local, secret)).name == record.name  # looked up here: a stale record
    store.revoke(record)
    await memory.read_once()
    await memory.read_once()  # what changed since the full read: the revocation
    await asyncio.sleep(0.1)  # past auth.cache_seconds
    store.mode = "fail"
    err = await refused(local, secret)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED, err  # revoked, not merely unknown (503)


async def test_a_read_that_began_before_a_local_change_is_not_kept() -> None:
    local, store = authorizer()
    secret = new_key_secret()
    record = store.add(secret)
    generation = local.generation
    local.forget(record)  # revoked through this replica while the read was under way
    local.remember([record], read_at_generation=generation)
    store.mode = "fail"
    assert (await refused(local, secret)).reason == Reason.AUTH_UNAVAILABLE


async def test_an_older_read_does_not_undo_a_revocation() -> None:
    # A full read that began before another replica revoked the key ends after this replica learnt of
    # the revocation (a lookup, or the read of what changed): the read's active copy is older.
    local, store = authorizer()
    secret = new_key_secret()
    active = store.add(secret)
    revoked = store.revoke(active)
    local.remember([revoked], read_at_generation=local.generation)
    local.remember([active], read_at_generation=local.generation)
    store.mode = "fail"
    assert (await refused(local, secret)).code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_full_read_goes_a_page_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(key_memory, "PAGE_SIZE", 3)
    local, store = authorizer()
    secrets = [new_key_secret() for _ in range(7)]
    for secret in secrets:
        store.add(secret)
        await asyncio.sleep(0.001)  # distinct create times
    await KeyMemory(local, store).read_once()  # type: ignore[arg-type]
    assert store.calls == 3  # pages of 3, 3 and 1
    store.mode = "fail"
    for secret in secrets:
        await check(local, secret)


async def test_a_full_read_drops_keys_the_store_no_longer_has() -> None:
    local, store = authorizer()
    memory = KeyMemory(local, store)  # type: ignore[arg-type]
    secret = new_key_secret()
    record = store.add(secret)
    await check(local, secret)
    del store.records[record.key_hash]  # deleted in the database
    await memory.read_once()
    await asyncio.sleep(0.1)
    store.mode = "fail"
    assert (await refused(local, secret)).reason == Reason.AUTH_UNAVAILABLE


async def test_stale_if_error_off() -> None:
    local, store = authorizer(stale_if_error_seconds=0)
    known = new_key_secret()
    store.add(known)
    await check(local, known)
    await asyncio.sleep(0.1)
    store.mode = "fail"
    assert (await refused(local, known)).code == grpc.StatusCode.UNAVAILABLE


async def test_a_stalled_lookup_marks_the_outage_even_when_its_callers_gave_up() -> None:
    """Envoy may give up on a key check before the store timeout (its own timeout, a retry): the
    lookup still marks the store down when it is late, so the next checks answer at once."""
    local, store = authorizer()
    known = new_key_secret()
    store.add(known)
    await check(local, known)
    await asyncio.sleep(0.1)
    store.mode = "hang"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(check(local, known), 0.05)
    await eventually(lambda: local.degraded, "a lookup without an answer did not mark the store down")
    calls = store.calls
    # Degraded: answered from the stale record without waiting on the store (no new store call, and
    # done within a few turns of the event loop, with no timer to wait for).
    answer = asyncio.create_task(check(local, known))
    for _ in range(20):
        await asyncio.sleep(0)
    assert answer.done() and answer.result().name
    assert store.calls == calls
    store.release.set()
    # (The tests share one event loop: end with the lookups done, not logging into the next test.)
    await eventually(lambda: not local.degraded, "still degraded after the store answered again")


async def test_a_slow_but_answering_store_finds_new_keys_and_is_not_degraded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store that answers in 0.5 s (past auth.key_store_timeout_seconds, within the unknown-key
    wait): a key never seen is found, not refused; a known key is answered from its stale record
    after the store timeout; nothing is marked degraded, nothing logged."""
    caplog.set_level(logging.INFO, logger="gateway.authorizer")
    local, store = authorizer(key_store_timeout_seconds=0.25)
    known = new_key_secret()
    record = store.add(known)
    await check(local, known)
    await asyncio.sleep(0.1)  # past auth.cache_seconds
    store.mode, store.delay = "slow", 0.5
    assert store.delay < UNKNOWN_KEY_WAIT_SECONDS
    for _ in range(3):
        new = new_key_secret()
        found = store.add(new)
        assert (await check(local, new)).name == found.name  # no refusal
        assert (await check(local, known)).name == record.name
        await asyncio.sleep(0.1)
    await asyncio.sleep(UNKNOWN_KEY_WAIT_SECONDS)  # every lookup has ended; no late verdict either
    assert not local.degraded and degraded_gauge() == 0
    assert degraded_lines(caplog) == []


async def test_a_hanging_store_serves_the_stale_key_and_refuses_an_unknown_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.authorizer")
    local, store = authorizer(key_store_timeout_seconds=0.25)
    known, unknown = new_key_secret(), new_key_secret()
    record = store.add(known)
    await check(local, known)
    await asyncio.sleep(0.1)
    store.mode = "hang"
    assert (await check(local, known)).name == record.name  # from its stale record
    err = await refused(local, unknown)  # waits until the store counts as down, then 503
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == Reason.AUTH_UNAVAILABLE
    assert err.retry_after_seconds is not None and err.http_status == 503
    assert local.degraded and degraded_gauge() == 1
    assert (await check(local, known)).name == record.name
    lines = degraded_lines(caplog)
    assert len(lines) == 1 and "DEGRADED" in lines[0], lines
    store.release.set()
    await eventually(lambda: not local.degraded, "still degraded after the store answered again")
    assert degraded_gauge() == 0
    assert len(degraded_lines(caplog)) == 2


async def test_a_store_slower_than_the_unknown_key_wait_stays_degraded_without_flapping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Answering, but later than a new key can wait (Envoy would give up): degraded once, not once
    per lookup; the late answers still refresh the records; back to normal when it is fast again."""
    caplog.set_level(logging.INFO, logger="gateway.authorizer")
    local, store = authorizer(key_store_timeout_seconds=0.25)
    known = new_key_secret()
    record = store.add(known)
    await check(local, known)
    await asyncio.sleep(0.1)
    store.mode, store.delay = "slow", UNKNOWN_KEY_WAIT_SECONDS + 0.3
    for _ in range(3):
        assert (await check(local, known)).name == record.name
        await asyncio.sleep(UNKNOWN_KEY_WAIT_SECONDS)
    await eventually(lambda: not local._lookups and local._probe is None, "lookups still running")
    assert local.degraded and degraded_gauge() == 1
    assert len(degraded_lines(caplog)) == 1, degraded_lines(caplog)
    store.mode = "ok"
    await asyncio.sleep(0.1)
    assert (await check(local, known)).name == record.name
    await eventually(lambda: not local.degraded, "still degraded with a fast store")
    assert len(degraded_lines(caplog)) == 2


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def test_envoy_gives_a_key_check_the_whole_wait_of_the_gateway(tmp_path: Path) -> None:
    """Envoy's ext_authz retry policy makes its back-off max_interval the per-try timeout: it must
    cover the longest the gateway waits for the store (a key seen before: the store timeout; a new
    one: the unknown-key wait), else a check of a known key waiting on a paused database is cut and
    the request gets Envoy's own 503 (the PostgreSQL-pause test's refusals at 0.25 s)."""
    settings = stack_settings(tmp_path, auth={"service_token": "unused"})
    config = yaml.safe_load(render_envoy_config(settings).read_text())
    (authz,) = [
        f["typed_config"]
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for net in chain["filters"]
        for f in net.get("typed_config", {}).get("http_filters", [])
        if f["name"] == "envoy.filters.http.ext_authz"
    ]
    service = authz["grpc_service"]
    timeout = _seconds(service["timeout"])
    per_try = _seconds(service["retry_policy"]["retry_back_off"]["max_interval"])
    assert per_try >= timeout
    gateway = LocalAuthorizer(settings)
    assert gateway.unknown_key_wait < timeout and settings.auth.key_store_timeout_seconds < timeout
