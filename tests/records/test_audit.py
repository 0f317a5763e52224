"""AuditService against real PostgreSQL: chained appends, idempotency, list, verify, tamper evidence,
and the database refusing to change history."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import psycopg
import pytest
from ferry.audit.v1 import audit_pb2
from ferry.transactions.v1 import transactions_pb2 as tx
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2
from psycopg.types.json import Jsonb

from services.common.errors import error_details
from tests.records.conftest import Services

AuditEvent = audit_pb2.AuditEvent
Problem = audit_pb2.VerifyChainResponse.Problem


def _event(**fields: Any) -> AuditEvent:
    fields.setdefault("event_id", uuid.uuid4().hex)
    fields.setdefault("kind", AuditEvent.Kind.KIND_OPERATIONAL)
    fields.setdefault("action", "test.event")
    fields.setdefault("principal", "tester")
    event = AuditEvent(**fields)
    if not event.HasField("event_time"):
        event.event_time.GetCurrentTime()
    return event


async def _append(audit: Any, *events: AuditEvent) -> audit_pb2.AppendEventsResponse:
    reply: audit_pb2.AppendEventsResponse = await audit.AppendEvents(
        audit_pb2.AppendEventsRequest(events=events)
    )
    return reply


async def _events(audit: Any, filter_: str) -> list[AuditEvent]:
    out: list[AuditEvent] = []
    token = ""
    while True:
        page = await audit.ListEvents(
            audit_pb2.ListEventsRequest(filter=filter_, page_size=100, page_token=token, order_by="sequence")
        )
        out += page.events
        token = page.next_page_token
        if not token:
            return out


async def test_append_is_idempotent_and_chained(audit: Any) -> None:
    marker = uuid.uuid4().hex
    events = [_event(request_id=marker, attributes={"n": str(i), "ünï": "cödé"}) for i in range(3)]
    first = await _append(audit, *events)
    assert (first.appended_count, first.duplicate_count) == (3, 0)
    again = await _append(audit, events[1], _event(event_id=events[2].event_id, request_id=marker))
    assert (again.appended_count, again.duplicate_count) == (0, 2)
    stored = await _events(audit, f"request_id = {marker}")
    assert [e.event_id for e in stored] == [e.event_id for e in events]
    # One batch: consecutive places in the chain, ending where the append said.
    assert [e.sequence for e in stored] == list(range(first.last_sequence - 2, first.last_sequence + 1))
    for previous, current in itertools.pairwise(stored):
        assert current.previous_hash == previous.hash
    assert stored[0].attributes == {"n": "0", "ünï": "cödé"}
    assert stored[0].name == f"audit/events/{events[0].event_id}"


async def test_concurrent_appends_keep_one_chain(audit: Any, services: Services) -> None:
    from ferry.audit.v1 import audit_pb2_grpc

    # Separate channels, so the appends really run at once on the server.
    channels = [grpc.aio.insecure_channel(services.address("audit")) for _ in range(6)]
    try:
        stubs = [audit_pb2_grpc.AuditServiceStub(c) for c in channels]
        await asyncio.gather(
            *(
                _append(stub, *[_event(action="test.concurrent") for _ in range(5)])
                for stub in stubs
                for _ in range(4)
            )
        )
    finally:
        for channel in channels:
            await channel.close()
    verdict = await audit.VerifyChain(audit_pb2.VerifyChainRequest())
    assert verdict.valid, verdict.description
    assert len(await _events(audit, "action = test.concurrent")) >= 120


async def test_append_refuses_bad_events_and_changes_nothing(audit: Any) -> None:
    before = await audit.VerifyChain(audit_pb2.VerifyChainRequest())
    good = _event()
    cases = [
        (audit_pb2.AppendEventsRequest(), "events"),
        (audit_pb2.AppendEventsRequest(events=[good, _event(event_id="")]), "events[1].event_id"),
        (
            audit_pb2.AppendEventsRequest(events=[_event(kind=AuditEvent.Kind.KIND_UNSPECIFIED)]),
            "events[0].kind",
        ),
        (
            audit_pb2.AppendEventsRequest(
                events=[_event(event_time=timestamp_pb2.Timestamp(seconds=-(10**12)))]
            ),
            "events[0].event_time",
        ),
        (audit_pb2.AppendEventsRequest(events=[_event(latency={"seconds": -3})]), "events[0].latency"),
        (audit_pb2.AppendEventsRequest(events=[_event(code=99)]), "events[0].code"),  # type: ignore[arg-type]
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await audit.AppendEvents(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error_details(info.value)["BadRequest"].field_violations] == [field]  # type: ignore[attr-defined]
    after = await audit.VerifyChain(audit_pb2.VerifyChainRequest())
    assert after.head_sequence >= before.head_sequence
    assert await _events(audit, f"request_id = {good.event_id}") == []


async def test_list_filters_pagination_and_bad_input(audit: Any) -> None:
    marker = uuid.uuid4().hex
    await _append(
        audit,
        *[
            _event(
                request_id=marker,
                principal="p1" if i % 2 else "p2",
                code=code_pb2.OK if i % 3 else code_pb2.NOT_FOUND,
            )
            for i in range(12)
        ],
    )
    newest_first: list[int] = []
    token = ""
    while True:
        page = await audit.ListEvents(
            audit_pb2.ListEventsRequest(filter=f"request_id = {marker}", page_size=5, page_token=token)
        )
        newest_first += [e.sequence for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert len(newest_first) == 12 and newest_first == sorted(newest_first, reverse=True)
    assert len(await _events(audit, f"request_id = {marker} AND principal = p1")) == 6
    assert len(await _events(audit, f"request_id = {marker} AND code = NOT_FOUND")) == 4
    assert len(await _events(audit, f'request_id = {marker} AND event_time > "2000-01-01T00:00:00Z"')) == 12
    assert len(await _events(audit, f"request_id = {marker} AND kind = RPC")) == 0
    for request, field in [
        (audit_pb2.ListEventsRequest(page_token="!!"), "page_token"),
        (audit_pb2.ListEventsRequest(filter="sequence > ten"), "filter"),
        (audit_pb2.ListEventsRequest(filter="code = MAYBE"), "filter"),
        (audit_pb2.ListEventsRequest(filter='event_time < "not a time"'), "filter"),
        (audit_pb2.ListEventsRequest(filter="p" * 1025), "filter"),
        (audit_pb2.ListEventsRequest(order_by="event_time"), "order_by"),
        (audit_pb2.ListEventsRequest(page_size=-5), "page_size"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await audit.ListEvents(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error_details(info.value)["BadRequest"].field_violations] == [field]  # type: ignore[attr-defined]


async def test_every_rpc_is_audited_but_deliveries_are_not(audit: Any, transactions: Any) -> None:
    rid = uuid.uuid4().hex
    await transactions.CreateTransaction(
        tx.CreateTransactionRequest(
            transaction=tx.Transaction(request_id=rid, status=tx.Transaction.Status.STATUS_SUCCEEDED)
        )
    )
    await transactions.GetTransaction(
        tx.GetTransactionRequest(name=f"transactions/{rid}"), metadata=[("x-request-id", rid)]
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await transactions.GetTransaction(
            tx.GetTransactionRequest(name="transactions/missing"), metadata=[("x-request-id", rid + "-2")]
        )
    await audit.ListEvents(audit_pb2.ListEventsRequest(page_size=1), metadata=[("x-request-id", rid + "-3")])

    deadline = asyncio.get_running_loop().time() + 15
    while True:
        got = {e.request_id: e for e in await _events(audit, "kind = RPC") if e.request_id.startswith(rid)}
        if len(got) == 3 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert set(got) == {rid, rid + "-2", rid + "-3"}
    ok, missing, listed = got[rid], got[rid + "-2"], got[rid + "-3"]
    assert (ok.service, ok.method, ok.code, ok.resource) == (
        "ferry.transactions.v1.TransactionsService",
        "GetTransaction",
        code_pb2.OK,
        f"transactions/{rid}",
    )
    assert (ok.source, ok.principal, ok.action) == ("transactions", "anonymous", "rpc")
    assert ok.peer.startswith("ipv") and ok.HasField("latency") and ok.HasField("event_time")
    assert (missing.code, missing.resource) == (code_pb2.NOT_FOUND, "transactions/missing")
    assert "not found" in missing.message
    assert (listed.source, listed.method) == ("audit", "ListEvents")
    # Deliveries (CreateTransaction here, AppendEvents always) are not audited: no recursion.
    methods = {e.method for e in await _events(audit, "kind = RPC")}
    assert not methods & {"AppendEvents", "CreateTransaction", "CompleteTransaction"}
    starts = await _events(audit, "action = service.start")
    assert {"transactions", "audit"} <= {e.source for e in starts}


@contextmanager
def _admin(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def test_database_refuses_update_delete_truncate(services: Services) -> None:
    """The service's own role (here the URL's user, even a superuser) cannot change history."""
    with _admin(services.database.url) as conn:
        for statement in (
            "UPDATE audit_events SET principal = 'mallory' WHERE sequence = 1",
            "DELETE FROM audit_events WHERE sequence = 1",
            "TRUNCATE audit_events",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)


async def test_verify_detects_tampering(audit: Any, services: Services) -> None:
    await _append(audit, *[_event(action="test.tamper") for _ in range(5)])
    assert (await audit.VerifyChain(audit_pb2.VerifyChainRequest())).valid
    victims = await _events(audit, "action = test.tamper")
    target = victims[2]

    with _admin(services.database.admin_url) as conn:
        # An attacker with superuser rights bypasses the trigger...
        conn.execute("SET session_replication_role = replica")
        row = conn.execute("SELECT * FROM audit_events WHERE sequence = %s", (target.sequence,)).fetchone()
        assert row is not None
        columns = [c.name for c in conn.execute("SELECT * FROM audit_events LIMIT 0").description or []]
        try:
            conn.execute(
                "UPDATE audit_events SET principal = 'mallory' WHERE sequence = %s", (target.sequence,)
            )
            verdict = await audit.VerifyChain(audit_pb2.VerifyChainRequest())
            assert not verdict.valid
            assert verdict.problem == Problem.PROBLEM_CONTENT_MODIFIED
            assert verdict.broken_sequence == target.sequence
            assert verdict.broken_event == target.name
            assert verdict.checked_count == target.sequence - 1

            # ...or deletes the row outright: the gap is reported at the event after it.
            conn.execute("DELETE FROM audit_events WHERE sequence = %s", (target.sequence,))
            verdict = await audit.VerifyChain(audit_pb2.VerifyChainRequest())
            assert (verdict.valid, verdict.problem, verdict.broken_sequence) == (
                False,
                Problem.PROBLEM_EVENTS_MISSING,
                target.sequence + 1,
            )
        finally:
            # Put the original row back so the chain holds again for the other tests.
            conn.execute("DELETE FROM audit_events WHERE sequence = %s", (target.sequence,))
            placeholders = ", ".join(["%s"] * len(columns))
            values = [Jsonb(v) if isinstance(v, dict) else v for v in row]
            conn.execute(f"INSERT INTO audit_events ({', '.join(columns)}) VALUES ({placeholders})", values)
            conn.execute("SET session_replication_role = DEFAULT")
    verdict = await audit.VerifyChain(audit_pb2.VerifyChainRequest())
    assert verdict.valid, verdict.description


async def test_verify_detects_a_removed_tail(audit: Any, services: Services) -> None:
    reply = await _append(audit, _event(action="test.tail"))
    with _admin(services.database.admin_url) as conn:
        conn.execute("SET session_replication_role = replica")
        row = conn.execute(
            "SELECT * FROM audit_events WHERE sequence = %s", (reply.last_sequence,)
        ).fetchone()
        assert row is not None
        columns = [c.name for c in conn.execute("SELECT * FROM audit_events LIMIT 0").description or []]
        try:
            conn.execute("DELETE FROM audit_events WHERE sequence = %s", (reply.last_sequence,))
            verdict = await audit.VerifyChain(audit_pb2.VerifyChainRequest())
            # Usually the head no longer matches; if an event was appended meanwhile (the services
            # audit these very calls), it links to the deleted one and shows as a gap instead.
            assert not verdict.valid
            assert (verdict.problem, verdict.broken_sequence) in {
                (Problem.PROBLEM_HEAD_MISMATCH, reply.last_sequence),
                (Problem.PROBLEM_EVENTS_MISSING, reply.last_sequence + 1),
            }
        finally:
            values = [Jsonb(v) if isinstance(v, dict) else v for v in row]
            placeholders = ", ".join(["%s"] * len(columns))
            conn.execute(
                f"INSERT INTO audit_events ({', '.join(columns)}) VALUES ({placeholders}) ON CONFLICT DO NOTHING",
                values,
            )
            conn.execute("SET session_replication_role = DEFAULT")
    assert (await audit.VerifyChain(audit_pb2.VerifyChainRequest())).valid
