"""AuditService over PostgreSQL: chained appends (idempotent on event_id), list, and chain verification."""

from __future__ import annotations

import json
from typing import Any

import grpc
from ferry.audit.v1 import audit_pb2, audit_pb2_grpc
from google.rpc import code_pb2
from psycopg import sql
from psycopg.rows import dict_row

from services.audit.chain import GENESIS, HASHED, event_hash
from services.common import listing
from services.common.database import Database, nul_free
from services.common.errors import invalid_argument
from services.common.names import REQUEST_ID_RULE, is_request_id
from services.common.timestamps import now, to_datetime, to_duration, to_micros, to_timestamp

AuditEvent = audit_pb2.AuditEvent
VerifyChainResponse = audit_pb2.VerifyChainResponse
Problem = VerifyChainResponse.Problem

MAX_EVENTS_PER_APPEND = 1000
VERIFY_BATCH = 2000

FILTER_FIELDS = {
    **{
        name: listing.Field(name)
        for name in (
            "principal",
            "source",
            "service",
            "method",
            "resource",
            "action",
            "request_id",
            "trace_id",
            "peer",
        )
    },
    "kind": listing.Field(
        "kind", "enum", listing.enum_values(list(AuditEvent.Kind.keys()), "KIND_", lambda n: n[5:])
    ),
    "code": listing.Field("code", "enum", listing.enum_values(list(code_pb2.Code.keys()), "", str)),
    "event_time": listing.Field("event_time", "time"),
    "sequence": listing.Field("sequence", "int"),
}
LISTED = listing.Table("audit_events", FILTER_FIELDS, key=[("sequence", "int")])

INSERT = sql.SQL("INSERT INTO audit_events ({}) VALUES ({})")
# Columns written per row: what the hash covers, then the hash itself.
ROW_KEYS = (*HASHED, "hash")


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def AppendEvents(
        self, request: audit_pb2.AppendEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AppendEventsResponse:
        if not request.events:
            raise invalid_argument("events", "at least one event is required")
        if len(request.events) > MAX_EVENTS_PER_APPEND:
            raise invalid_argument("events", f"at most {MAX_EVENTS_PER_APPEND} events per call")
        rows = [_row_from_proto(e, f"events[{i}]") for i, e in enumerate(request.events)]
        insert = INSERT.format(
            sql.SQL(", ").join(map(sql.Identifier, ROW_KEYS)),
            sql.SQL(", ").join(sql.Placeholder() * len(ROW_KEYS)),
        )
        async with self.db.connection() as conn, conn.transaction(), conn.cursor() as cur:
            # The head row lock makes appends one at a time: one chain, no gaps, whoever calls.
            await cur.execute("SELECT last_sequence, last_hash FROM audit_chain WHERE id = 1 FOR UPDATE")
            head = await cur.fetchone()
            assert head is not None, "audit_chain head row missing"
            sequence, previous = int(head[0]), str(head[1])
            await cur.execute(
                "SELECT event_id FROM audit_events WHERE event_id = ANY(%s)", ([r["event_id"] for r in rows],)
            )
            seen = {r[0] for r in await cur.fetchall()}
            record_time = now()
            fresh: list[list[Any]] = []
            for row in rows:
                if row["event_id"] in seen:
                    continue
                seen.add(row["event_id"])
                sequence += 1
                row.update(sequence=sequence, record_time=record_time, previous_hash=previous)
                row["hash"] = previous = event_hash(row)
                fresh.append([json.dumps(row[k]) if k == "attributes" else row[k] for k in ROW_KEYS])
            if fresh:
                await cur.executemany(insert, fresh)
                await cur.execute(
                    "UPDATE audit_chain SET last_sequence = %s, last_hash = %s WHERE id = 1",
                    (sequence, previous),
                )
        return audit_pb2.AppendEventsResponse(
            appended_count=len(fresh), duplicate_count=len(rows) - len(fresh), last_sequence=sequence
        )

    async def ListEvents(
        self, request: audit_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListEventsResponse:
        rows, token = await LISTED.list(self.db, request)
        return audit_pb2.ListEventsResponse(events=[_proto_from_row(r) for r in rows], next_page_token=token)

    async def VerifyChain(
        self, request: audit_pb2.VerifyChainRequest, context: grpc.aio.ServicerContext
    ) -> VerifyChainResponse:
        async with self.db.connection() as conn, conn.transaction():
            # One snapshot for the head and the rows, so appends running meanwhile do not confuse it.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return await _verify(conn)


async def _verify(conn: Any) -> VerifyChainResponse:
    head_cur = await conn.execute("SELECT last_sequence, last_hash FROM audit_chain WHERE id = 1")
    head = await head_cur.fetchone()
    expected, previous, checked = 1, GENESIS, 0

    def broken(row: dict[str, Any], problem: int, description: str) -> VerifyChainResponse:
        return VerifyChainResponse(
            valid=False,
            checked_count=checked,
            broken_sequence=row["sequence"],
            broken_event=f"audit/events/{row['event_id']}",
            problem=problem,  # type: ignore[arg-type]
            description=description,
            head_hash=head[1],
            head_sequence=head[0],
        )

    async with conn.cursor("audit_verify", row_factory=dict_row) as cur:
        cur.itersize = VERIFY_BATCH
        await cur.execute("SELECT * FROM audit_events ORDER BY sequence")
        async for row in cur:
            if row["sequence"] != expected:
                return broken(
                    row,
                    Problem.PROBLEM_EVENTS_MISSING,
                    f"events {expected} to {row['sequence'] - 1} are missing before event {row['sequence']}",
                )
            if row["previous_hash"] != previous:
                return broken(
                    row,
                    Problem.PROBLEM_LINK_BROKEN,
                    f"event {row['sequence']} does not link to the hash of event {row['sequence'] - 1}",
                )
            if event_hash(row) != row["hash"]:
                return broken(
                    row,
                    Problem.PROBLEM_CONTENT_MODIFIED,
                    f"event {row['sequence']} was modified after it was appended",
                )
            previous, expected, checked = row["hash"], expected + 1, checked + 1
    if head[0] != checked or head[1] != previous:
        return VerifyChainResponse(
            valid=False,
            checked_count=checked,
            broken_sequence=checked + 1,
            problem=Problem.PROBLEM_HEAD_MISMATCH,
            description=(
                f"the chain head says {head[0]} events ending in {head[1][:12]}..., "
                f"the table holds {checked} ending in {previous[:12]}...: events at the end were removed"
            ),
            head_hash=head[1],
            head_sequence=head[0],
        )
    return VerifyChainResponse(
        valid=True,
        checked_count=checked,
        description=f"all {checked} events link up",
        head_hash=previous,
        head_sequence=checked,
    )


def _row_from_proto(e: AuditEvent, field: str) -> dict[str, Any]:
    if not is_request_id(e.event_id):
        raise invalid_argument(f"{field}.event_id", f"must be {REQUEST_ID_RULE}")
    if e.kind == AuditEvent.Kind.KIND_UNSPECIFIED:
        raise invalid_argument(f"{field}.kind", "is required")
    if not e.HasField("event_time"):
        raise invalid_argument(f"{field}.event_time", "is required")
    if e.code not in code_pb2.Code.values():
        raise invalid_argument(f"{field}.code", f"{e.code} is not a google.rpc.Code")
    return {
        "event_id": e.event_id,
        "kind": AuditEvent.Kind.Name(e.kind).removeprefix("KIND_"),
        "event_time": to_datetime(e.event_time, f"{field}.event_time"),
        "source": nul_free(e.source),
        "principal": nul_free(e.principal),
        "service": nul_free(e.service),
        "method": nul_free(e.method),
        "resource": nul_free(e.resource),
        "action": nul_free(e.action),
        "code": code_pb2.Code.Name(e.code),
        "message": nul_free(e.message),
        "latency_us": to_micros(e.latency, f"{field}.latency") if e.HasField("latency") else None,
        "request_id": nul_free(e.request_id),
        "trace_id": nul_free(e.trace_id),
        "peer": nul_free(e.peer),
        "attributes": {nul_free(k): nul_free(v) for k, v in e.attributes.items()},
    }


def _proto_from_row(row: dict[str, Any]) -> AuditEvent:
    event = AuditEvent(
        name=f"audit/events/{row['event_id']}",
        event_id=row["event_id"],
        kind=AuditEvent.Kind.Value(f"KIND_{row['kind']}"),  # type: ignore[arg-type]
        event_time=to_timestamp(row["event_time"]),
        source=row["source"],
        principal=row["principal"],
        service=row["service"],
        method=row["method"],
        resource=row["resource"],
        action=row["action"],
        code=code_pb2.Code.Value(row["code"]),  # type: ignore[arg-type]
        message=row["message"],
        request_id=row["request_id"],
        trace_id=row["trace_id"],
        peer=row["peer"],
        attributes=row["attributes"],
        sequence=row["sequence"],
        record_time=to_timestamp(row["record_time"]),
        hash=row["hash"],
        previous_hash=row["previous_hash"],
    )
    if row["latency_us"] is not None:
        event.latency.CopyFrom(to_duration(row["latency_us"]))
    return event
