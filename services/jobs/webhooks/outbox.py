"""The outbox of job-end events (`job_webhook_events`) and their tries (`job_webhook_attempts`).

An event is stored once per job (a job ends once; a second enqueue for the job returns the first
event's webhook-id), claimed by one delivery loop at a time under a lease, and every try is recorded,
oldest first, for GetJob's `webhook_attempts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from ferry.jobs.v1 import jobs_pb2
from psycopg.rows import dict_row

from services.common.database import Database
from services.common.timestamps import to_timestamp

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# NOTIFY'd on every enqueue (delivered at commit), so a delivery loop in another process wakes at once.
NOTIFY_CHANNEL = "job_webhook_events"


@dataclass(frozen=True)
class Event:
    """One event to deliver, as claimed."""

    id: str
    job: str
    event_type: str
    url: str
    creator: str
    payload: str
    attempts: int
    create_time: datetime


@dataclass(frozen=True)
class EventState:
    id: str
    state: str
    attempts: int


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(
        self,
        *,
        webhook_id: str,
        job: str,
        event_type: str,
        url: str,
        creator: str,
        payload: str,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> str:
        """Stores the job's event unless it has one; returns the job's webhook-id either way.
        With `conn`, inside the caller's transaction (the job's end and its event commit together)."""
        sql = (
            "WITH added AS (INSERT INTO job_webhook_events (id, job, event_type, url, creator, payload)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (job) DO NOTHING RETURNING id)"
            " SELECT id FROM added UNION ALL SELECT id FROM job_webhook_events WHERE job = %s"
        )
        params = (webhook_id, job, event_type, url, creator, payload, job)
        if conn is not None:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
        else:
            async with self.db.connection() as own:
                cur = await own.execute(sql, params)
                row = await cur.fetchone()
                await own.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
        assert row is not None
        return str(row[0])

    def conninfo(self) -> str:
        """The database's connection string (for a listening connection of its own)."""
        if self.db.pool is None:
            raise RuntimeError("the outbox's database is not started")
        return str(self.db.pool.conninfo)

    async def claim_due(self, limit: int, lease_seconds: float) -> list[Event]:
        """Up to `limit` due events, each leased to the caller for `lease_seconds`."""
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "UPDATE job_webhook_events SET lease_until = now() + make_interval(secs => %s)"
                " WHERE id IN (SELECT id FROM job_webhook_events"
                "   WHERE state = 'pending' AND next_attempt_time <= now()"
                "     AND (lease_until IS NULL OR lease_until < now())"
                "   ORDER BY next_attempt_time LIMIT %s FOR UPDATE SKIP LOCKED)"
                " RETURNING id, job, event_type, url, creator, payload, attempts, create_time",
                (lease_seconds, limit),
            )
            rows = await cur.fetchall()
        return [Event(**row) for row in rows]

    async def record(
        self,
        event: Event,
        *,
        attempt_time: datetime,
        http_status: int,
        error: str,
        next_attempt_time: datetime | None,
    ) -> str:
        """Records one try and what follows: delivered (no error), another try at
        `next_attempt_time`, or failed for good (None). Returns the event's new state."""
        state = DELIVERED if not error else (PENDING if next_attempt_time is not None else FAILED)
        attempt = event.attempts + 1
        async with self.db.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO job_webhook_attempts (event_id, attempt, job, attempt_time, http_status, error)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (event.id, attempt, event.job, attempt_time, http_status, error),
            )
            # Only the try that holds the event's current attempt count writes its outcome: a try that
            # outlived its lease (a slow DNS lookup) must not undo what a later try recorded.
            await conn.execute(
                "UPDATE job_webhook_events SET attempts = %s, state = %s,"
                " next_attempt_time = coalesce(%s, next_attempt_time), lease_until = NULL"
                " WHERE id = %s AND attempts = %s",
                (attempt, state, next_attempt_time, event.id, event.attempts),
            )
        return state

    async def attempts_for(self, job: str) -> list[jobs_pb2.WebhookAttempt]:
        """Every try of the job's event, oldest first (empty: no webhook, or not ended yet)."""
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT attempt_time, http_status, error FROM job_webhook_attempts"
                " WHERE job = %s ORDER BY attempt",
                (job,),
            )
            rows = await cur.fetchall()
        return [
            jobs_pb2.WebhookAttempt(
                attempt_time=to_timestamp(row["attempt_time"]),
                http_status=row["http_status"],
                error=row["error"],
            )
            for row in rows
        ]

    async def event_for(self, job: str) -> EventState | None:
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT id, state, attempts FROM job_webhook_events WHERE job = %s", (job,))
            row = await cur.fetchone()
        return EventState(**row) if row else None
