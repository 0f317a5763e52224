"""Test support for the real stack: settings on free ports, a handle on a running stack, leftovers.

The session fixture in tests/conftest.py uses the launcher's own `Stack`, so the tests exercise
exactly what `make run` starts.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ferry_client
import grpc
import httpx
import psutil
from ferry.auth.v1 import auth_pb2
from ferry.keys.v1 import keys_pb2, keys_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import InferenceServerClient as TritonClient

from launcher.ports import free_ports, is_free, needed_ports
from launcher.setup import ensure_backend, ensure_model
from launcher.stack import SERVICES, Stack
from launcher.supervisor import SupervisorClient
from launcher.triton import SHM_DIR, shm_prefix
from services.common.config import Settings
from services.common.tokens import new_key_secret
from services.common.triton_client import with_access

# Every process with a port of its own: the launcher's services plus the gateway (keys, ext_authz).
PROCESSES = tuple(dict.fromkeys((*SERVICES, "gateway")))

# Polling and a loaded machine, on top of the documented revocation bound (auth.cache_seconds).
REVOCATION_SLACK_SECONDS = 1.0


def stack_settings(home: Path, **overrides: Any) -> Settings:
    """Settings for a stack under `home` on ports nobody uses. FERRY_* variables still apply to the
    fields not set here (the children receive the result as their environment)."""
    ports = iter(free_ports(9 + 2 * len(PROCESSES)))
    values: dict[str, Any] = {
        "home": home,
        "envoy": {"port": next(ports), "admin_port": next(ports)},
        "triton": {"grpc_port": next(ports), "http_port": next(ports), "metrics_port": next(ports)},
        # Authentication stays on (the default); the tests hold the admin key from the start.
        "bootstrap_admin_key": new_key_secret(),
    }
    for name in PROCESSES:
        values[name] = {"port": next(ports), "metrics_port": next(ports)}
    # The embedded NATS server and the (one) jobs worker's metrics.
    values["nats"] = {"url": "", "port": next(ports), "monitor_port": next(ports)}
    values["jobs"] |= {"worker_metrics_port": next(ports)}
    values["conversations"] |= {"web_port": next(ports)}
    # A section given as a dict is merged into the one above (the free ports stay), e.g. the trivial
    # model's `bench_model_overrides()`; anything else replaces it.
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = values[key] | value
        else:
            values[key] = value
    return Settings(**values)


def share_model_files(home: Path, source: Path) -> None:
    """The assembled model (253 MB) is shared with the repository's home instead of copied."""
    home.mkdir(parents=True, exist_ok=True)
    link = home / "models"
    if not link.exists():
        link.symlink_to(source, target_is_directory=True)


def scratch_home(prefix: str) -> tuple[Path, Path]:
    """(scratch folder, home inside it) for a stack of a test's own; the home shares the repository's
    model files (assembled once by `make setup`).

    Not under pytest's tmp dir: pytest keeps its root 0700 (and resets it when other sessions start),
    but PostgreSQL runs as the `pgserver` user when we are root and must reach its data.
    """
    repository_home = Settings()
    ensure_model(repository_home)
    ensure_backend()
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    home = scratch / "home"
    share_model_files(home, repository_home.model_dir)
    return scratch, home


@contextmanager
def running_stack(settings: Settings, ready_timeout: float) -> Iterator[RunningStack]:
    """Starts the launcher's own `Stack` for `settings`, yields it once ready, stops it, and checks
    what `make run` promises too: stopping leaves no process, port or shm file behind."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    footprint: Footprint | None = None
    with (settings.log_dir / "supervisord.out").open("w") as output:
        stack = Stack(settings, supervisor_output=output)
        stack.start()
        running: RunningStack | None = None
        try:
            running = RunningStack(stack, settings, stack.wait_ready(ready_timeout))
            yield running
        finally:
            if running is not None:
                running.close_channels()
                footprint = Footprint.of(running)
            stack.stop()
    if footprint is not None:
        leftovers = footprint.leftovers()
        assert not leftovers, f"the stopped stack left behind: {leftovers}"


def bearer(key: str) -> dict[str, str]:
    """The header every ferry API takes a key in (what the OpenAI SDK sends for `api_key`)."""
    return {"authorization": f"Bearer {key}"}


def keyed_aio_channel(target: str, key: str) -> grpc.aio.Channel:
    """A grpc.aio channel (ferry-client's AsyncClient's) whose calls carry `key` and raise
    ferry_client.errors.FerryError (a grpc.RpcError); no retries and no default deadline: the tests
    look at each answer. Use it as an async context manager."""
    return ferry_client.AsyncClient(target, api_key=key, retry=False, timeout=None).channel


def keyed_channel(target: str, key: str) -> grpc.Channel:
    """An insecure channel (ferry-client's Client's) whose calls carry `key` and raise
    ferry_client.errors.FerryError (a grpc.RpcError); no retries and no default deadline: the tests
    look at each answer. Close it when done."""
    return ferry_client.Client(target, api_key=key, retry=False, timeout=None).channel


def wait_serving(address: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Until the gRPC server at `address` answers SERVING (fails early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"service on {address} exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"service on {address} not SERVING after {timeout}s")


@dataclass
class RunningStack:
    """What tests get from the `stack` fixture: addresses, credentials, and control over the processes.

    Authentication is on, as users run ferry: `channel()` and `http()` carry the bootstrap admin key;
    `raw_channel()` carries none; `create_key()` makes keys with other scopes and limits.
    """

    stack: Stack
    settings: Settings
    ready_seconds: float
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    raw_channels: dict[str, grpc.Channel] = field(default_factory=dict)
    # Every secret handed to tests, so that tests can look for them where they must not be.
    issued_secrets: list[str] = field(default_factory=list)
    _admin_principal: str = ""

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
        """Each process's own gRPC address, by name (inference, models, transactions, audit, gateway)."""
        return {**self.stack.endpoints.services, "gateway": self.settings.gateway.address}

    @property
    def metrics_urls(self) -> dict[str, str]:
        return self.stack.endpoints.metrics

    @property
    def triton_grpc(self) -> str:
        return self.stack.endpoints.triton_grpc

    def triton(self) -> TritonClient:
        """A gRPC client of the stack's Triton that shows its access secret, as ferry's processes do
        (Triton refuses everything but health without it). Close it when done."""
        client: TritonClient = with_access(TritonClient(self.triton_grpc), self.stack.settings.triton)
        return client

    @property
    def envoy_admin(self) -> str:
        return self.stack.endpoints.envoy_admin

    def envoy_stat(self, name: str) -> int:
        """An Envoy counter by its full name; one Envoy does not have fails the test (a check of a
        misspelt or renamed stat could not fail otherwise)."""
        text = httpx.get(f"{self.envoy_admin}/stats", params={"filter": f"^{name}$"}, timeout=5).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"Envoy has no stat {name}")

    @property
    def database_url(self) -> str:
        assert self.stack.database_url is not None
        return self.stack.database_url

    # -- credentials -----------------------------------------------------------------------------

    @property
    def admin_key(self) -> str:
        """The bootstrap admin key the stack was started with (FERRY_BOOTSTRAP_ADMIN_KEY)."""
        assert self.settings.bootstrap_admin_key is not None
        return self.settings.bootstrap_admin_key.get_secret_value()

    @property
    def admin_principal(self) -> str:
        """`keys/{id}` of the admin key, as transactions and audit events name it."""
        if not self._admin_principal:
            # A key's creator is the principal that created it: ours.
            self._admin_principal = self.new_key(["read"], display_name="whoami").creator
        return self._admin_principal

    def channel(self, target: str | None = None) -> grpc.Channel:
        """A cached channel to `target` (default: Envoy) whose calls carry the admin key."""
        target = target or self.grpc_target
        if target not in self.channels:
            self.channels[target] = keyed_channel(target, self.admin_key)
        return self.channels[target]

    def raw_channel(self, target: str | None = None) -> grpc.Channel:
        """A cached channel to `target` (default: Envoy) without any credentials."""
        target = target or self.grpc_target
        if target not in self.raw_channels:
            self.raw_channels[target] = grpc.insecure_channel(target)
        return self.raw_channels[target]

    def http(self, key: str | None = None, **options: Any) -> httpx.Client:
        """An httpx client on Envoy's REST base URL sending `key` (default: the admin key)."""
        options.setdefault("timeout", 60)
        return httpx.Client(base_url=self.rest, headers=bearer(key or self.admin_key), **options)

    def async_http(self, key: str | None = None, **options: Any) -> httpx.AsyncClient:
        options.setdefault("timeout", 60)
        return httpx.AsyncClient(base_url=self.rest, headers=bearer(key or self.admin_key), **options)

    def aio_channel(self, target: str | None = None, key: str | None = None) -> grpc.aio.Channel:
        """A new grpc.aio channel to `target` (default: Envoy) carrying `key` (default: admin)."""
        return keyed_aio_channel(target or self.grpc_target, key or self.admin_key)

    def keys(self) -> keys_pb2_grpc.KeysServiceStub:
        """KeysService on the gateway's own port, as the admin."""
        return keys_pb2_grpc.KeysServiceStub(self.channel(self.service_targets["gateway"]))

    def new_key(
        self,
        scopes: list[str],
        *,
        display_name: str = "test",
        ttl_seconds: float | None = None,
        **limits: int,
    ) -> keys_pb2.Key:
        """Creates a key (through KeysService, as the admin) and returns it, secret included."""
        key = keys_pb2.Key(display_name=display_name, scopes=scopes, limits=auth_pb2.Limits(**limits))
        if ttl_seconds is not None:
            key.ttl.FromNanoseconds(int(ttl_seconds * 1e9))
        created: keys_pb2.Key = self.keys().CreateKey(keys_pb2.CreateKeyRequest(key=key), timeout=10)
        assert created.secret, "CreateKey must return the secret"
        self.issued_secrets.append(created.secret)
        return created

    def create_key(self, scopes: list[str], **limits: Any) -> str:
        """A new key's secret; `limits`: requests_per_minute, tokens_per_minute, max_tokens, ..."""
        return self.new_key(scopes, **limits).secret

    def revoke_key(self, name: str) -> keys_pb2.Key:
        revoked: keys_pb2.Key = self.keys().RevokeKey(keys_pb2.RevokeKeyRequest(name=name), timeout=10)
        return revoked

    def within_revocation_bound(self, refused: Callable[[], bool]) -> float:
        """Seconds until `refused()` holds after a revocation; fails past the documented bound,
        `auth.cache_seconds` (Envoy's edge leases and the gateways' key caches), plus polling slack."""
        started = time.monotonic()
        while not refused():
            waited = time.monotonic() - started
            assert waited < self.settings.auth.cache_seconds + REVOCATION_SLACK_SECONDS, (
                f"still accepted {waited:.1f} s after the revocation"
            )
            time.sleep(0.05)
        return time.monotonic() - started

    # -- processes -------------------------------------------------------------------------------

    def supervisor(self) -> SupervisorClient:
        return self.stack.supervisor()

    def wait_ready(self, timeout: float = 60.0) -> float:
        return self.stack.wait_ready(timeout)

    def wait_serving(self, name: str, timeout: float = 30.0) -> None:
        """Until service `name` answers SERVING on its own port, then until the stack is ready.

        After a restart Envoy may not have noticed yet, so /readyz alone can still be the old 200.
        """
        deadline = time.monotonic() + timeout
        wait_serving(self.service_targets[name], timeout=timeout)
        self.wait_ready(max(1.0, deadline - time.monotonic()))

    def close_channels(self) -> None:
        for channel in [*self.channels.values(), *self.raw_channels.values()]:
            channel.close()
        self.channels.clear()
        self.raw_channels.clear()


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
