"""The real gateway process (auth on, a bootstrap admin key, a service token) against a private
embedded PostgreSQL, on free ports under a temporary FERRY_HOME."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from ferry.auth.v1 import auth_pb2_grpc
from ferry.keys.v1 import keys_pb2_grpc

from launcher.ports import free_ports
from services.common.config import REPO_ROOT
from services.common.tokens import new_key_secret
from tests.postgres import embedded_postgres
from tests.stack import wait_serving

ADMIN_KEY = new_key_secret()
SERVICE_TOKEN = "test-service-token-" + new_key_secret()


@dataclass
class Gateway:
    """One running gateway process."""

    address: str
    home: Path
    database_url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def gateway_env(home: Path, database_url: str, port: int, metrics_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "DATABASE_URL"}
    env.update(
        FERRY_HOME=str(home),
        DATABASE_URL=database_url,
        FERRY_LOG_FORMAT="text",
        FERRY_DRAIN_GRACE_SECONDS="1",
        FERRY_GATEWAY__PORT=str(port),
        FERRY_GATEWAY__METRICS_PORT=str(metrics_port),
        FERRY_AUTH__SERVICE_TOKEN=SERVICE_TOKEN,
        FERRY_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        # Nothing listens there: audit events wait in the gateway's spool (tests read it).
        FERRY_AUDIT__PORT=str(free_ports(1)[0]),
        FERRY_TRANSACTIONS__PORT=str(free_ports(1)[0]),
    )
    env.update(extra)
    return env


def start_gateway(home: Path, database_url: str, **extra: str) -> Gateway:
    home.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_ports(2)
    with open(home / "gateway.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            env=gateway_env(home, database_url, port, metrics_port, **extra),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=log,
        )
    gateway = Gateway(f"127.0.0.1:{port}", home, database_url, process)
    try:
        wait_serving(gateway.address, process)
    except BaseException:
        gateway.stop()
        print((home / "gateway.log").read_text()[-4000:])
        raise
    return gateway


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with embedded_postgres("ferry-gateway-pg-") as url:
        yield url


@pytest.fixture(scope="session")
def gateway(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    running = start_gateway(tmp_path_factory.mktemp("gateway-home"), postgres_url)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(gateway.address) as opened:
        yield opened


@pytest.fixture(scope="session")
def keys(channel: grpc.aio.Channel) -> keys_pb2_grpc.KeysServiceStub:
    return keys_pb2_grpc.KeysServiceStub(channel)


@pytest.fixture(scope="session")
def auth(channel: grpc.aio.Channel) -> auth_pb2_grpc.AuthServiceStub:
    return auth_pb2_grpc.AuthServiceStub(channel)
