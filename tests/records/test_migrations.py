"""Schema migrations on real PostgreSQL: both modes, forward steps, concurrent starts, newer schemas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from services.audit.schema import MIGRATIONS as AUDIT
from services.common.database import Migrations, migrate
from services.transactions.schema import MIGRATIONS as TRANSACTIONS
from tests.records.conftest import Database


@pytest.fixture
async def fresh_url(database: Database) -> AsyncIterator[str]:
    """A new, empty database on the same server, dropped afterwards."""
    name = f"ferry_migrations_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(database.admin_url, autocommit=True) as admin:
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip(f"{database.kind} server: no right to create a scratch database")
        try:
            yield psycopg.conninfo.make_conninfo(database.admin_url, dbname=name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


async def _versions(conn: psycopg.AsyncConnection[Any], component: str) -> list[int]:
    cur = await conn.execute(
        "SELECT version FROM schema_version WHERE component = %s ORDER BY version", (component,)
    )
    return [r[0] for r in await cur.fetchall()]


async def test_real_schemas_both_modes(fresh_url: str) -> None:
    async with await _connect(fresh_url) as conn:
        for migrations in (TRANSACTIONS, AUDIT):
            assert await migrate(conn, migrations, "create_if_not_exists") == migrations.latest
        await conn.execute(
            "INSERT INTO transactions (request_id, status, create_time) VALUES ('keep-me', 'SUCCEEDED', now())"
        )
        # A restart in the default mode keeps the data and applies nothing twice.
        for migrations in (TRANSACTIONS, AUDIT):
            await migrate(conn, migrations, "create_if_not_exists")
            assert await _versions(conn, migrations.component) == list(range(1, migrations.latest + 1))
        cur = await conn.execute("SELECT count(*) FROM transactions")
        assert (await cur.fetchone()) == (1,)
        # drop_recreate deletes the component's data (development mode) and leaves the other alone.
        await conn.execute(
            "INSERT INTO audit_events (sequence, event_id, kind, event_time, record_time, previous_hash, hash) "
            "VALUES (1, 'e1', 'RPC', now(), now(), '', '')"
        )
        await migrate(conn, TRANSACTIONS, "drop_recreate")
        cur = await conn.execute("SELECT count(*) FROM transactions")
        assert (await cur.fetchone()) == (0,)
        cur = await conn.execute("SELECT count(*) FROM audit_events")
        assert (await cur.fetchone()) == (1,)
        await migrate(conn, AUDIT, "drop_recreate")
        cur = await conn.execute("SELECT count(*), (SELECT last_sequence FROM audit_chain) FROM audit_events")
        assert (await cur.fetchone()) == (0, 0)
        assert await _versions(conn, "audit") == list(range(1, AUDIT.latest + 1))


async def test_forward_steps_concurrency_and_newer_schema(fresh_url: str) -> None:
    v1 = Migrations("widgets", ["CREATE TABLE widgets (id int PRIMARY KEY)"], "DROP TABLE IF EXISTS widgets")
    v2 = Migrations("widgets", [*v1.steps, "ALTER TABLE widgets ADD COLUMN label text DEFAULT 'x'"], v1.drop)
    conns = [await _connect(fresh_url) for _ in range(4)]
    try:
        # Four processes starting at once: one applies the step, the others find it applied.
        assert await asyncio.gather(*(migrate(c, v1, "create_if_not_exists") for c in conns)) == [1] * 4
        conn = conns[0]
        await conn.execute("INSERT INTO widgets (id) VALUES (1)")
        assert await migrate(conn, v2, "create_if_not_exists") == 2
        cur = await conn.execute("SELECT id, label FROM widgets")
        assert await cur.fetchall() == [(1, "x")]
        assert await _versions(conn, "widgets") == [1, 2]
        # Old code against a newer schema refuses to run rather than misread it.
        with pytest.raises(RuntimeError, match="newer than this code"):
            await migrate(conn, v1, "create_if_not_exists")
        with pytest.raises(ValueError, match="unknown migration mode"):
            await migrate(conn, v2, "yolo")
        # A failed step leaves nothing half-applied.
        broken = Migrations(
            "widgets", [*v2.steps, "ALTER TABLE widgets ADD COLUMN n int", "SELECT nonsense"], v1.drop
        )
        with pytest.raises(psycopg.errors.UndefinedColumn):
            await migrate(conn, broken, "create_if_not_exists")
        assert await _versions(conn, "widgets") == [1, 2]
        cur = await conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'widgets'"
        )
        assert sorted(r[0] for r in await cur.fetchall()) == ["id", "label"]
    finally:
        for c in conns:
            await c.close()
