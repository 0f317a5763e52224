"""Fixtures for the records tests: real PostgreSQL (embedded, and an external server when reachable)
and the real Transactions and Audit services as subprocesses on free ports.

`database` is parametrized: `embedded` (pgserver in a fresh temporary directory) always; `external` uses
$DATABASE_URL, else the machine's PostgreSQL at postgresql://postgres@127.0.0.1:5432/test, in a fresh
database created for the session (skipped, with the reason, when the server cannot be reached).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from services.common.config import REPO_ROOT, Settings
from tests.stack import wait_serving

SYSTEM_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Database:
    kind: str
    url: str
    # Superuser connection to the same database (for tampering as an attacker with full rights).
    admin_url: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_dbname(url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=name)


@pytest.fixture(scope="session", params=["embedded", "external"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    if request.param == "embedded":
        import pgserver

        # Not under pytest's basetemp: every pytest run resets /tmp/pytest-of-<user> to mode 0700, which
        # locks the `pgserver` system user (PostgreSQL runs as it under root) out of its own data dir.
        top = Path(tempfile.mkdtemp(prefix="ferry-records-pg-"))
        top.chmod(0o755)
        server = pgserver.get_server(top / "data", cleanup_mode="stop")
        try:
            url = str(server.get_uri())
            yield Database("embedded", url, url)
        finally:
            server.cleanup()
            shutil.rmtree(top, ignore_errors=True)
        return
    base = os.environ.get("DATABASE_URL") or SYSTEM_POSTGRES
    try:
        admin = psycopg.connect(base, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        reason = f"external PostgreSQL {base} not reachable: {str(exc).strip()[:200]}"
        print(reason)
        pytest.skip(reason)
    name = f"ferry_records_{uuid.uuid4().hex[:10]}"
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error:
        # No CREATEDB right: the given database is the test database.
        yield Database("external", base, base)
        admin.close()
        return
    try:
        url = _with_dbname(base, name)
        yield Database("external", url, url)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@dataclass
class Services:
    """The Transactions and Audit services of one test session, stoppable and restartable."""

    home: Path
    database: Database
    ports: dict[str, tuple[int, int]]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name][0]}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
        env.update(
            FERRY_HOME=str(self.home),
            DATABASE_URL=self.database.url,
            FERRY_LOG_FORMAT="text",
            FERRY_DRAIN_GRACE_SECONDS="2",
            # These component tests run Transactions and Audit without a gateway, so nothing could
            # answer their Authorize calls. Authentication is tested against the full stack
            # (tests/auth); here it is off, and deliveries need no service token.
            FERRY_AUTH="off",
        )
        for name, (port, metrics) in self.ports.items():
            env[f"FERRY_{name.upper()}__PORT"] = str(port)
            env[f"FERRY_{name.upper()}__METRICS_PORT"] = str(metrics)
        return env

    def settings(self, **overrides: Any) -> Settings:
        """Settings of a process that records into these services (spools under `home`)."""
        values: dict[str, Any] = {
            "home": self.home,
            "database_url": self.database.url,
            "transactions": {"port": self.ports["transactions"][0]},
            "audit": {"port": self.ports["audit"][0]},
        }
        values.update(overrides)
        return Settings(**values)

    def start(self, *names: str) -> None:
        """Starts the named services (all in parallel) and waits until each reports SERVING."""
        for name in names or tuple(self.ports):
            with open(self.home / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", f"services.{name}"],
                    env=self.env(),
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=log,
                )
        for name in names or tuple(self.ports):
            wait_serving(self.address(name), self.procs[name])

    def stop(self, *names: str) -> None:
        """SIGTERM (graceful drain), SIGKILL after 15 s."""
        procs = [self.procs.pop(n) for n in names or tuple(self.procs) if n in self.procs]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def services(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    home = tmp_path_factory.mktemp(f"home-{database.kind}")
    svc = Services(home, database, {n: (free_port(), free_port()) for n in ("transactions", "audit")})
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
async def transactions(services: Services) -> Any:
    from ferry.transactions.v1 import transactions_pb2_grpc

    async with grpc.aio.insecure_channel(services.address("transactions")) as channel:
        yield transactions_pb2_grpc.TransactionsServiceStub(channel)


@pytest.fixture(scope="session")
async def audit(services: Services) -> Any:
    from ferry.audit.v1 import audit_pb2_grpc

    async with grpc.aio.insecure_channel(services.address("audit")) as channel:
        yield audit_pb2_grpc.AuditServiceStub(channel)
