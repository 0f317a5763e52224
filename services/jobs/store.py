"""The job store: the SQL of `jobs`, `job_results` and `job_attempts`, and nothing else touches them.

State changes are conditional updates, so that the service (create, cancel) and any number of workers
(start, finish, fail) can race without a job ending twice or a cancelled job coming back to life.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ferry.auth.v1 import auth_pb2
from ferry.jobs.v1 import jobs_pb2
from psycopg.rows import dict_row

from services.common.database import Database, nul_free
from services.jobs.domain import JobSpec, JobState, StoredJob, metadata_json

# A job with its result (NULL until it succeeded).
SELECT = "SELECT j.*, r.result FROM jobs j LEFT JOIN job_results r ON r.job_id = j.id"
NOT_ENDED = "('QUEUED', 'RUNNING')"


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self, spec: JobSpec, principal: auth_pb2.Principal, *, request_id: str | None
    ) -> StoredJob | None:
        """The new QUEUED job; None when `request_id` is taken already (nothing changed)."""
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "INSERT INTO jobs (id, request_id, creator, principal, request, kind, model, metadata, "
                "webhook_url, state) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'QUEUED') "
                "ON CONFLICT DO NOTHING RETURNING *, NULL::bytea AS result",
                [
                    new_job_id(),
                    request_id,
                    principal.name,
                    principal.SerializeToString(),
                    spec.request.SerializeToString(),
                    spec.kind,
                    spec.model,
                    metadata_json(spec.metadata),
                    spec.webhook_url,
                ],
            )
            row = await cur.fetchone()
        return StoredJob.from_row(row) if row else None

    async def by_id(self, job_id: str) -> StoredJob | None:
        return await self._one(f"{SELECT} WHERE j.id = %s", job_id)

    async def by_request_id(self, creator: str, request_id: str) -> StoredJob | None:
        return await self._one(f"{SELECT} WHERE j.creator = %s AND j.request_id = %s", creator, request_id)

    async def page(
        self,
        creator: str | None,
        state: JobState | None,
        after: tuple[Any, ...] | None,
        size: int,
    ) -> Sequence[StoredJob]:
        """Up to `size` jobs newest first (of `creator` unless None, in `state` unless None), after the
        (create_time, id) that ended the previous page."""
        where, params = ["TRUE"], []
        if creator is not None:
            where.append("j.creator = %s")
            params.append(creator)
        if state is not None:
            where.append("j.state = %s")
            params.append(state.value)
        if after is not None:
            where.append("(j.create_time, j.id) < (%s, %s)")
            params += list(after)
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"{SELECT} WHERE {' AND '.join(where)} ORDER BY j.create_time DESC, j.id DESC LIMIT %s",
                [*params, size],
            )
            rows = await cur.fetchall()
        return [StoredJob.from_row(row) for row in rows]

    # -- the queue's outbox ------------------------------------------------------------------------

    async def mark_published(self, job_id: str) -> None:
        async with self.db.connection() as conn:
            await conn.execute("UPDATE jobs SET published = true WHERE id = %s", [job_id])

    async def unpublished(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        """Jobs stored whose queue message may not have gone out (NATS was away at create)."""
        async with self.db.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT id FROM jobs WHERE NOT published AND create_time < now() - make_interval(secs => %s) "
                "ORDER BY create_time LIMIT %s",
                [older_than_seconds, limit],
            )
            return [row[0] for row in await cur.fetchall()]

    # -- a worker's run ----------------------------------------------------------------------------

    async def start_attempt(self, job_id: str, worker: str, lease_seconds: float) -> StoredJob | None:
        """Takes the job for a new attempt (RUNNING, attempts + 1, a lease); None when it has ended or
        another worker's lease on it still runs."""
        async with self.db.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "UPDATE jobs SET state = 'RUNNING', attempts = attempts + 1, "
                "start_time = coalesce(start_time, now()), "
                "lease_until = now() + make_interval(secs => %s), update_time = now() "
                "WHERE id = %s AND (state = 'QUEUED' OR (state = 'RUNNING' AND lease_until < now())) "
                "RETURNING *, NULL::bytea AS result",
                [lease_seconds, job_id],
            )
            row = await cur.fetchone()
            if row is None:
                return None
            await cur.execute(
                "INSERT INTO job_attempts (job_id, attempt, worker) VALUES (%s, %s, %s) "
                "ON CONFLICT (job_id, attempt) DO NOTHING",
                [job_id, row["attempts"], worker],
            )
        return StoredJob.from_row(row)

    async def renew_lease(self, job_id: str, lease_seconds: float) -> JobState | None:
        """Extends a running job's lease; the job's state (None when it is gone)."""
        async with self.db.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "UPDATE jobs SET lease_until = CASE WHEN state = 'RUNNING' "
                "THEN now() + make_interval(secs => %s) ELSE lease_until END "
                "WHERE id = %s RETURNING state",
                [lease_seconds, job_id],
            )
            row = await cur.fetchone()
        return JobState(row[0]) if row else None

    async def lease_left(self, job_id: str) -> float:
        """Seconds left on a running job's lease (0 when none)."""
        async with self.db.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT greatest(0, extract(epoch FROM lease_until - now())) FROM jobs WHERE id = %s",
                [job_id],
            )
            row = await cur.fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0

    async def defer(self, job_id: str, attempt: int) -> None:
        """The attempt never ran (no spare engine slot): it does not count, the job waits again."""
        async with self.db.connection() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM job_attempts WHERE job_id = %s AND attempt = %s", [job_id, attempt]
            )
            await conn.execute(
                "UPDATE jobs SET state = 'QUEUED', attempts = attempts - 1, lease_until = NULL, "
                "start_time = CASE WHEN attempts = 1 THEN NULL ELSE start_time END, update_time = now() "
                "WHERE id = %s AND state = 'RUNNING' AND attempts = %s",
                [job_id, attempt],
            )

    async def succeed(self, job_id: str, attempt: int, result: jobs_pb2.JobResult) -> StoredJob | None:
        """Stores the result and ends the job SUCCEEDED, in one transaction; None when the job had
        ended meanwhile (cancelled: the result is dropped)."""
        async with self.db.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"UPDATE jobs SET state = 'SUCCEEDED', end_time = now(), lease_until = NULL, "
                f"error_code = '', error_message = '', update_time = now() "
                f"WHERE id = %s AND state IN {NOT_ENDED} RETURNING id",
                [job_id],
            )
            if await cur.fetchone() is None:
                return None
            await cur.execute(
                "INSERT INTO job_results (job_id, result) VALUES (%s, %s) ON CONFLICT (job_id) DO NOTHING",
                [job_id, result.SerializeToString()],
            )
            await _end_attempt(cur, job_id, attempt, "", "")
        return await self.by_id(job_id)

    async def attempt_failed(self, job_id: str, attempt: int, code: str, message: str) -> None:
        """One attempt failed (another may follow): the job shows the error while it waits again."""
        async with self.db.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                f"UPDATE jobs SET state = 'QUEUED', lease_until = NULL, error_code = %s, error_message = %s, "
                f"update_time = now() WHERE id = %s AND state IN {NOT_ENDED}",
                [code, nul_free(message), job_id],
            )
            await _end_attempt(cur, job_id, attempt, code, message)

    async def fail(self, job_id: str, attempt: int | None, code: str, message: str) -> StoredJob | None:
        """Ends the job FAILED with the reason; None when it had ended already."""
        async with self.db.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"UPDATE jobs SET state = 'FAILED', end_time = now(), lease_until = NULL, error_code = %s, "
                f"error_message = %s, update_time = now() WHERE id = %s AND state IN {NOT_ENDED} RETURNING id",
                [code, nul_free(message), job_id],
            )
            if await cur.fetchone() is None:
                return None
            if attempt is not None:
                await _end_attempt(cur, job_id, attempt, code, message)
        return await self.by_id(job_id)

    async def cancel(self, job_id: str) -> StoredJob | None:
        """Ends a queued or running job CANCELLED; None when it had ended already."""
        async with self.db.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                f"UPDATE jobs SET state = 'CANCELLED', end_time = now(), lease_until = NULL, "
                f"update_time = now() WHERE id = %s AND state IN {NOT_ENDED} RETURNING attempts",
                [job_id],
            )
            row = await cur.fetchone()
            if row is None:
                return None
            if row[0]:
                await _end_attempt(cur, job_id, row[0], "CANCELLED", "cancelled by its owner")
        return await self.by_id(job_id)

    async def end_times(self, job_id: str) -> tuple[JobState, datetime | None] | None:
        async with self.db.connection() as conn, conn.cursor() as cur:
            await cur.execute("SELECT state, end_time FROM jobs WHERE id = %s", [job_id])
            row = await cur.fetchone()
        return (JobState(row[0]), row[1]) if row else None

    async def _one(self, sql: str, *params: Any) -> StoredJob | None:
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        return StoredJob.from_row(row) if row else None


async def _end_attempt(cur: Any, job_id: str, attempt: int, code: str, message: str) -> None:
    await cur.execute(
        "UPDATE job_attempts SET end_time = now(), error_code = %s, error_message = %s "
        "WHERE job_id = %s AND attempt = %s AND end_time IS NULL",
        [code, nul_free(message), job_id, attempt],
    )
