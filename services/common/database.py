"""PostgreSQL access shared by the services that own tables: the pool, and forward-only migrations.

Each service owns a *component* (its tables) and migrates only that component at start-up:
`schema_version` holds one row per applied (component, version). Modes (`database.migration_mode`):
- `create_if_not_exists` (default): applies the versions not yet recorded; data is kept.
- `drop_recreate` (development): drops the component's tables, forgets its versions, applies all.
Migrations of one component run under a transaction-scoped advisory lock, so two processes starting
at once never apply the same step twice.

The database is `DATABASE_URL` when set (it always wins); otherwise an embedded PostgreSQL
(`pgserver`) under `<home>/pgdata`, the same one the launcher starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.common.config import DatabaseSettings, Settings
from services.common.errors import Reason, RpcError, rpc_error
from services.common.server import Runtime

log = logging.getLogger(__name__)

SCHEMA_VERSION_DDL = """
CREATE TABLE IF NOT EXISTS schema_version (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True)
class Migrations:
    """The ordered schema steps of one component; step i (from 1) brings it to version i."""

    component: str
    steps: Sequence[str]
    # Undoes everything the steps created (used by `drop_recreate`).
    drop: str

    @property
    def latest(self) -> int:
        return len(self.steps)


def embedded_data_dir(settings: Settings) -> Path:
    return settings.home / "pgdata"


def resolve_database_url(settings: Settings) -> str:
    """`DATABASE_URL` when given; else the embedded server (started here if nobody runs it yet)."""
    if settings.database_url:
        return settings.database_url
    import pgserver  # imported late: only the embedded default needs it

    return str(pgserver.get_server(embedded_data_dir(settings), cleanup_mode=None).get_uri())


def create_pool(url: str, config: DatabaseSettings, name: str) -> AsyncConnectionPool:
    """A pool that is not opened yet: `await pool.open(wait=False)` never blocks start-up on the DB."""
    return AsyncConnectionPool(
        url,
        min_size=config.pool_min_size,
        max_size=config.pool_max_size,
        name=name,
        open=False,
        timeout=config.connect_timeout_seconds,
        # A connection broken by a database restart is replaced instead of failing one RPC.
        check=AsyncConnectionPool.check_connection,
        # The pool's reconnect backoff doubles without bound until it gives up; giving up early lets
        # the next request start a fresh attempt, so recovery after an outage takes seconds, not minutes.
        reconnect_timeout=5.0,
        # Autocommit: single statements commit alone; multi-statement work opens `conn.transaction()`.
        kwargs={"connect_timeout": max(1, int(config.connect_timeout_seconds)), "autocommit": True},
    )


async def migrate(conn: psycopg.AsyncConnection, migrations: Migrations, mode: str) -> int:
    """Brings the component to its latest version in one transaction; returns the version reached."""
    lock_key = int.from_bytes(hashlib.sha256(migrations.component.encode()).digest()[:8], "big", signed=True)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
        await conn.execute(SCHEMA_VERSION_DDL)
        if mode == "drop_recreate":
            log.warning("drop_recreate: dropping the tables of %s", migrations.component)
            await conn.execute(migrations.drop)
            await conn.execute("DELETE FROM schema_version WHERE component = %s", (migrations.component,))
        elif mode != "create_if_not_exists":
            raise ValueError(f"unknown migration mode {mode!r}")
        cur = await conn.execute(
            "SELECT coalesce(max(version), 0) FROM schema_version WHERE component = %s",
            (migrations.component,),
        )
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current > migrations.latest:
            raise RuntimeError(
                f"database has {migrations.component} schema version {current}, newer than this code "
                f"({migrations.latest}); refusing to run against it"
            )
        for version in range(current + 1, migrations.latest + 1):
            await conn.execute(migrations.steps[version - 1])  # type: ignore[arg-type]
            await conn.execute(
                "INSERT INTO schema_version (component, version) VALUES (%s, %s)",
                (migrations.component, version),
            )
            log.info("migrated %s to version %d", migrations.component, version)
        return migrations.latest


def nul_free(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold NUL characters: U+FFFD takes their place (in strings,
    and in the keys and values of lists and dicts, for jsonb)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [nul_free(v) for v in value]
    if isinstance(value, dict):
        return {nul_free(k): nul_free(v) for k, v in value.items()}
    return value


def unavailable(exc: BaseException) -> RpcError:
    """What a servicer answers while PostgreSQL cannot be reached: retryable UNAVAILABLE."""
    return rpc_error(Reason.DATABASE_UNAVAILABLE, f"database unavailable: {type(exc).__name__}")


# Errors that mean "the database is not reachable right now", as opposed to a bug or bad data.
DATABASE_DOWN = (psycopg.OperationalError, PoolTimeout)
# A health check that has not finished after this long counts as an outage. A stopped or partitioned
# PostgreSQL answers nothing and raises nothing (a query on an open connection just waits), so the
# watch stops waiting for it: the check goes on in the background and its end says when it is back.
CHECK_TIMEOUT_SECONDS = 3.0


class Database:
    """A component's pool plus the background task that migrates it and watches reachability.

    Start-up never blocks on PostgreSQL: until the schema is in place, and whenever the database stops
    answering, `connection()` raises a retryable UNAVAILABLE and `on_health(False)` is called, so the
    service reports NOT_SERVING instead of failing.
    """

    def __init__(
        self,
        settings: Settings,
        migrations: Migrations,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        *,
        check_interval: float = 2.0,
    ) -> None:
        self.settings = settings
        self.migrations = migrations
        self.on_health = on_health
        self.check_interval = check_interval
        self.migrated = False
        self.healthy = False
        self.pool: AsyncConnectionPool | None = None
        self._task: asyncio.Task[None] | None = None
        self._check: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Became reachable (and migrated) at least once since start.
        self.was_ready = False

    async def start(self) -> None:
        url = await asyncio.to_thread(resolve_database_url, self.settings)
        self.pool = create_pool(url, self.settings.database, self.migrations.component)
        await self.pool.open(wait=False)
        self._task = asyncio.create_task(self._watch(), name=f"database-{self.migrations.component}")

    async def wait_ready(self, timeout: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._check:
            # A check stuck on an unanswering database: cancelled, waited for only briefly.
            self._check.cancel()
            await asyncio.wait({self._check}, timeout=1.0)
        if self.pool:
            await self.pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if not self.migrated or self.pool is None:
            raise rpc_error(Reason.DATABASE_UNAVAILABLE, "database not ready yet")
        try:
            async with self.pool.connection() as conn:
                yield conn
        except DATABASE_DOWN as exc:
            await self._set_health(False)
            raise unavailable(exc) from exc

    async def _check_once(self) -> None:
        assert self.pool is not None
        # A short wait: a database that cannot hand out a connection in 2 s counts as down.
        async with self.pool.connection(timeout=2.0) as conn:
            if not self.migrated:
                await migrate(conn, self.migrations, self.settings.database.migration_mode)
                self.migrated = True
            else:
                await conn.execute("SELECT 1")

    async def _watch(self) -> None:
        assert self.pool is not None
        delay = 0.2
        while True:
            try:
                if self._check is None:
                    self._check = asyncio.create_task(self._check_once())
                done, _ = await asyncio.wait({self._check}, timeout=CHECK_TIMEOUT_SECONDS)
                if not done:
                    # No answer at all (stopped, partitioned): down until this same check ends.
                    await self._set_health(False)
                    continue
                check, self._check = self._check, None
                check.result()
                await self._set_health(True)
                self.was_ready = True
                self._ready.set()
                delay = 0.2
                await asyncio.sleep(self.check_interval)
            except DATABASE_DOWN as exc:
                log.warning("database %s unreachable: %s", self.migrations.component, exc)
                await self._set_health(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.check_interval)
            except Exception:
                # A bug or a refused migration: stay NOT_SERVING and say why, rather than die silently.
                log.exception("database %s: migration or check failed", self.migrations.component)
                await self._set_health(False)
                await asyncio.sleep(self.check_interval)

    async def _set_health(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            log.warning(
                "database %s %s",
                self.migrations.component,
                "reachable" if healthy else "unreachable: NOT_SERVING",
            )
            if self.on_health:
                await self.on_health(healthy)


async def serve_from_database(
    runtime: Runtime,
    migrations: Migrations,
    on_ready: Callable[[Database], Awaitable[None]] | None = None,
    *,
    serving_while_down: bool = False,
    on_reachable: Callable[[bool], None] | None = None,
) -> Database:
    """Set-up shared by the services that own tables: migrate, then follow the database's health.

    The database is such a service's dependency: without it nothing there can answer, so health is
    NOT_SERVING until it is reachable and whenever it stops answering. `on_ready` runs each time it
    becomes reachable, before SERVING (a failure there keeps the service NOT_SERVING; the next health
    check tries again). `serving_while_down`: a service that still answers its main calls without
    the database (the gateway, from the keys it has seen) stays SERVING through an outage once it
    was ready; `on_reachable` hears of every change either way.
    """

    async def on_health(healthy: bool) -> None:
        if healthy and on_ready is not None:
            await on_ready(db)
        if on_reachable is not None:
            on_reachable(healthy)
        if not healthy and serving_while_down and db.was_ready:
            return
        await runtime.set_serving(healthy)

    db = Database(runtime.settings, migrations, on_health)
    await runtime.set_serving(False)
    await db.start()
    runtime.on_stop.insert(0, db.stop)
    return db
