"""Test support for the real stack: settings on free ports, a handle on a running stack, leftovers.

The session fixture in tests/conftest.py uses the launcher's own `Stack`, so the tests exercise
exactly what `make run` starts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.ports import free_ports, is_free, needed_ports
from launcher.stack import SERVICES, Stack
from launcher.supervisor import SupervisorClient
from launcher.triton import SHM_DIR, shm_prefix
from services.common.config import Settings


def stack_settings(home: Path, **overrides: Any) -> Settings:
    """Settings for a stack under `home` on ports nobody uses. FERRY_* variables still apply to the
    fields not set here (the children receive the result as their environment)."""
    ports = iter(free_ports(15))
    values: dict[str, Any] = {
        "home": home,
        "envoy": {"port": next(ports), "admin_port": next(ports)},
        "triton": {"grpc_port": next(ports), "http_port": next(ports), "metrics_port": next(ports)},
    }
    for name in SERVICES:
        values[name] = {"port": next(ports), "metrics_port": next(ports)}
    values.update(overrides)
    return Settings(**values)


def share_model_files(home: Path, source: Path) -> None:
    """The assembled model (253 MB) is shared with the repository's home instead of copied."""
    home.mkdir(parents=True, exist_ok=True)
    link = home / "models"
    if not link.exists():
        link.symlink_to(source, target_is_directory=True)


@dataclass
class RunningStack:
    """What tests get from the `stack` fixture: addresses, and control over the processes."""

    stack: Stack
    settings: Settings
    ready_seconds: float
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    @property
    def rest(self) -> str:
        """Envoy's REST base URL, e.g. http://127.0.0.1:21234."""
        return self.stack.endpoints.rest

    @property
    def grpc_target(self) -> str:
        """Envoy's listener as a gRPC target (native gRPC for every service)."""
        return self.stack.endpoints.grpc

    @property
    def service_targets(self) -> dict[str, str]:
        """Each service's own gRPC address, by name (inference, models, transactions, audit)."""
        return self.stack.endpoints.services

    @property
    def metrics_urls(self) -> dict[str, str]:
        return self.stack.endpoints.metrics

    @property
    def triton_grpc(self) -> str:
        return self.stack.endpoints.triton_grpc

    @property
    def envoy_admin(self) -> str:
        return self.stack.endpoints.envoy_admin

    @property
    def database_url(self) -> str:
        assert self.stack.database_url is not None
        return self.stack.database_url

    def channel(self, target: str | None = None) -> grpc.Channel:
        """A cached insecure channel to `target` (default: Envoy)."""
        target = target or self.grpc_target
        if target not in self.channels:
            self.channels[target] = grpc.insecure_channel(target)
        return self.channels[target]

    def supervisor(self) -> SupervisorClient:
        return self.stack.supervisor()

    def wait_ready(self, timeout: float = 60.0) -> float:
        return self.stack.wait_ready(timeout)

    def wait_serving(self, name: str, timeout: float = 30.0) -> None:
        """Until service `name` answers SERVING on its own port, then until the stack is ready.

        After a restart Envoy may not have noticed yet, so /readyz alone can still be the old 200.
        """
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.service_targets[name]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    response = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} is not SERVING after {timeout:.0f} s")
                time.sleep(0.2)
        self.wait_ready(max(1.0, deadline - time.monotonic()))

    def close_channels(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()


@dataclass
class Footprint:
    """Everything a running stack holds, noted before it stops, to check that nothing outlives it."""

    pids: list[int]
    settings: Settings
    pgdata: Path | None

    @classmethod
    def of(cls, running: RunningStack) -> Footprint:
        pids: list[int] = []
        for info in running.supervisor().processes().values():
            if info["pid"]:
                pids.append(info["pid"])
                try:
                    pids += [c.pid for c in psutil.Process(info["pid"]).children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
        supervisord = running.settings.run_dir / "supervisord.pid"
        if supervisord.exists():
            pids.append(int(supervisord.read_text().split()[0]))
        pgdata = None if running.settings.database_url else running.settings.home / "pgdata"
        if pgdata is not None and (pgdata / "postmaster.pid").exists():
            pids.append(int((pgdata / "postmaster.pid").read_text().split()[0]))
        return cls(pids, running.settings, pgdata)

    def leftovers(self, settle_seconds: float = 5.0) -> list[str]:
        """Processes, listening ports and shared-memory files still there (after a short settle)."""
        deadline = time.monotonic() + settle_seconds
        while True:
            found = [f"process {pid} ({_name(pid)})" for pid in self.pids if _alive(pid)]
            found += [
                f"port {u.port} ({u.setting})"
                for u in needed_ports(self.settings)
                if not is_free(u.host, u.port)
            ]
            found += [f"shm {p}" for p in SHM_DIR.glob(f"{shm_prefix(self.settings)}*")]
            if self.pgdata is not None and (self.pgdata / "postmaster.pid").exists():
                found.append(f"PostgreSQL pid file {self.pgdata / 'postmaster.pid'}")
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()[:3])
    except psutil.Error:
        return "?"


def python_env(settings: Settings) -> dict[str, str]:
    """Environment for a `python -m launcher` child that should see `settings` (for CLI tests)."""
    from launcher.environment import settings_env

    env = dict(os.environ)
    env.update(settings_env(settings))
    return env
