"""The whole platform on one machine: supervisord running PostgreSQL, Triton, the services, Envoy.

`make run` (launcher/__main__.py) and the test session fixture both drive this class, so the tests
exercise exactly what users run:

    stack = Stack(settings)
    stack.start()            # lock, port check, supervisord (returns at once)
    stack.wait_ready(60)     # until Envoy's /readyz answers 200; returns the seconds it took
    ...
    stack.stop()             # supervisord stops everything (PostgreSQL last), shm leftovers, lock

Only one stack may use a home directory at a time (a lock in its run directory), and all of its
ports must be free before anything starts, so a second launch fails fast instead of half-starting.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from launcher.credentials import AdminKey, with_credentials, with_triton_secret
from launcher.environment import settings_env
from launcher.envoy import envoy_program
from launcher.nats import nats_config_path, nats_program, with_nats_credentials
from launcher.ports import taken_ports
from launcher.postgres import embedded_uri, postgres_program
from launcher.programs import Program
from launcher.supervisor import SupervisorClient, render_supervisor_config, socket_path
from launcher.triton import cleanup_shm, triton_program
from services.common.config import REPO_ROOT, Settings

LOCK_NAME = "ferry.lock"
# Start order (supervisord priority): Triton, then the services that call it, then the edge.
SERVICES = ("models", "inference", "transactions", "audit", "grammars", "jobs", "conversations", "gateway")
# The Python module each one runs as (`python -m ...`).
MODULES = {name: f"services.{name}" for name in SERVICES} | {"gateway": "gateway"}
# Only the gateway needs the bootstrap admin key; the other children do not get it.
ADMIN_KEY_ENV = "FERRY_BOOTSTRAP_ADMIN_KEY"
SERVICES_PRIORITY = 500
# The services that keep records start before and stop after those that send them records, audit
# last (the transactions service audits too): a stopping service's last records (its service.stop
# event among them) are delivered at once instead of waiting out the recorder's stop flush (2 s) for
# a receiver already gone and staying in its spool until its next start.
RECORD_KEEPERS = {
    "transactions": ("records", SERVICES_PRIORITY - 100),
    "audit": ("audit", SERVICES_PRIORITY - 200),
}
READY_POLL_SECONDS = 0.25
# supervisord stops programs one after another; beyond their summed waits something is stuck.
STOP_MARGIN_SECONDS = 10.0

_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """The stack cannot start or become ready; the message says why and where to look."""


@dataclass(frozen=True)
class Endpoints:
    rest: str
    grpc: str
    envoy_admin: str
    services: dict[str, str]
    metrics: dict[str, str]
    triton_grpc: str
    triton_http: str
    triton_metrics: str
    nats: str = ""
    # Services with more than one replica (`<service>.replicas`): every replica's gRPC address.
    replicas: dict[str, list[str]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"REST (OpenAI + /api/v1)   {self.rest}",
            f"gRPC (all services)       {self.grpc}",
        ]
        for name, target in self.services.items():
            out.append(f"  {name:<23} {target}  metrics {self.metrics[name]}")
            for index, address in enumerate(self.replicas.get(name, [])[1:], start=1):
                out.append(f"  {replica_name(name, index):<23} {address}  (replica, behind Envoy)")
        out += [
            f"Envoy admin               {self.envoy_admin}",
            f"Triton gRPC / HTTP        {self.triton_grpc} / {self.triton_http}"
            " (ferry's processes only: all but health needs triton.access_secret)",
            f"Triton metrics            {self.triton_metrics}",
            f"NATS (jobs queue)         {self.nats}",
        ]
        return out


def endpoints(settings: Settings) -> Endpoints:
    envoy = settings.envoy
    services = {name: getattr(settings, name) for name in SERVICES}
    triton = settings.triton
    return Endpoints(
        rest=f"http://{envoy.host}:{envoy.port}",
        grpc=f"{envoy.host}:{envoy.port}",
        envoy_admin=f"http://127.0.0.1:{envoy.admin_port}",
        services={name: s.address for name, s in services.items()},
        metrics={name: f"http://{s.host}:{s.metrics_port}/metrics" for name, s in services.items()},
        triton_grpc=triton.grpc_address,
        triton_http=f"http://{triton.host}:{triton.http_port}",
        triton_metrics=f"http://{triton.host}:{triton.metrics_port}/metrics",
        replicas={
            name: [f"{s.host}:{port}" for port, _ in s.replica_ports()]
            for name, s in services.items()
            if s.replicas > 1
        },
        nats=",".join(settings.nats.shown_servers)
        + (
            # Clients log in as ferry-client; its per-start password is in the owner-only config file.
            f" (embedded; clients: user ferry-client, password in {nats_config_path(settings)})"
            if settings.nats.embedded
            else ""
        ),
    )


def replica_name(name: str, index: int) -> str:
    """The supervisord program of replica `index` of a service: `models`, then `models-1`, ..."""
    return name if index == 0 else f"{name}-{index}"


def service_program(name: str, settings: Settings, replica: int = 0) -> Program:
    env = {"PYTHONUNBUFFERED": "1"}
    if name == "gateway" and settings.bootstrap_admin_key is not None:
        # It inserts the key when absent (a revoked one stays revoked).
        env[ADMIN_KEY_ENV] = settings.bootstrap_admin_key.get_secret_value()
    if replica:
        # Its own ports, and a spool of its own: a spool belongs to one process (a new process turns
        # the requests its predecessor left open into `incomplete` records).
        port, metrics_port = getattr(settings, name).replica_ports()[replica]
        prefix = f"FERRY_{name.upper()}__"
        env[f"{prefix}PORT"] = str(port)
        env[f"{prefix}METRICS_PORT"] = str(metrics_port)
        env["FERRY_RECORDING__SPOOL_DIR"] = str(settings.spool_dir / "replicas" / replica_name(name, replica))
    group, priority = RECORD_KEEPERS.get(name, ("services", SERVICES_PRIORITY))
    return Program(
        name=replica_name(name, replica),
        argv=[sys.executable, "-m", MODULES[name]],
        env=env,
        cwd=REPO_ROOT,
        # After Triton, before Envoy. They find each other through retries and health, so they start
        # and drain together (one supervisord group, but the record keepers: RECORD_KEEPERS), which
        # keeps `make run` and Ctrl-C quick.
        priority=priority,
        group=group,
        # The drain lets in-flight RPCs finish first; a little more for the stop hooks.
        stop_wait_seconds=int(settings.drain_grace_seconds) + 5,
    )


def worker_program(index: int, settings: Settings) -> Program:
    """A jobs worker (services/jobs/worker.py): no port of its own but metrics."""
    return Program(
        name=f"jobs-worker-{index}",
        argv=[sys.executable, "-m", "services.jobs.worker"],
        env={"PYTHONUNBUFFERED": "1", "FERRY_JOBS_WORKER_INDEX": str(index)},
        cwd=REPO_ROOT,
        priority=SERVICES_PRIORITY,
        group="services",
        # Running jobs get the drain grace to finish; the rest are redelivered to the next worker.
        stop_wait_seconds=int(settings.drain_grace_seconds) + 10,
    )


def chat_web_program(settings: Settings) -> Program:
    """The web chat process (services/conversations/web.py): the page and WebSocket behind Envoy."""
    return Program(
        name="conversations-web",
        argv=[sys.executable, "-m", "services.conversations.web"],
        env={"PYTHONUNBUFFERED": "1"},
        cwd=REPO_ROOT,
        priority=SERVICES_PRIORITY,
        group="services",
        stop_wait_seconds=10,
    )


def default_programs(settings: Settings) -> list[Program]:
    """PostgreSQL (embedded unless `database_url` is set), NATS (embedded unless `nats.url` is set) and
    Triton, the services and the gateway with the jobs' workers, Envoy: started in this order, stopped
    in reverse."""
    services = [
        service_program(name, settings, replica)
        for name in SERVICES
        for replica in range(getattr(settings, name).replicas)
    ]
    workers = [worker_program(i, settings) for i in range(settings.jobs.workers)]
    nats = [nats_program(settings)] if settings.nats.embedded else []
    web = [chat_web_program(settings)]
    postgres = [postgres_program(settings)] if settings.database_url is None else []
    return [*postgres, *nats, triton_program(settings), *services, *workers, *web, envoy_program(settings)]


def _die_with_parent() -> None:
    # Runs in the child before exec: if the launcher is killed outright, supervisord gets SIGTERM
    # and stops its programs instead of living on as an orphan.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Stack:
    def __init__(
        self,
        settings: Settings,
        *,
        programs: Sequence[Program] | None = None,
        supervisor_output: IO[Any] | None = None,
    ) -> None:
        """`supervisor_output`: where supervisord's own log lines go (default: this process's stdout)."""
        self.settings = settings
        self._programs = programs
        self._supervisor_output = supervisor_output
        self._lock: IO[str] | None = None
        self._supervisord: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self.database_url: str | None = settings.database_url
        self.endpoints = endpoints(settings)
        # The admin key this start bootstraps (None with auth off); set by `start`.
        self.admin_key: AdminKey | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts everything and returns without waiting for readiness (see `wait_ready`)."""
        self._started_at = time.monotonic()
        self._acquire_lock()
        try:
            self._check_ports()
            # A fresh service token per start (unless configured) and the admin key, after the lock:
            # a second launcher refused by it must not touch <home>/admin.key.
            self.settings, self.admin_key = with_credentials(self.settings)
            self.settings = with_nats_credentials(self.settings)
            self.settings = with_triton_secret(self.settings)
            if self.settings.database_url is None:
                # The embedded PostgreSQL is a supervisord program (launcher/postgres.py): restarted
                # when it dies; its unix socket's URI is known before it starts.
                self.database_url = embedded_uri(self.settings)
            self._start_supervisord()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 60.0, progress: Callable[[str], None] | None = None) -> float:
        """Blocks until Envoy's /readyz is 200; returns seconds since `start`. Raises StackError."""
        deadline = time.monotonic() + timeout
        url = f"{self.endpoints.rest}/readyz"
        last_report = ""
        with httpx.Client(timeout=1.0) as client:
            while True:
                self._check_alive()
                try:
                    if client.get(url).status_code == 200:
                        return time.monotonic() - self._started_at
                except httpx.HTTPError:
                    pass
                if progress is not None:
                    report = self._pending_report(client)
                    if report != last_report:
                        progress(f"{time.monotonic() - self._started_at:5.1f} s  waiting for: {report}")
                        last_report = report
                if time.monotonic() > deadline:
                    raise StackError(
                        f"not ready after {timeout:.0f} s; still waiting for: "
                        f"{self._pending_report(client)}. Logs: {self.settings.log_dir}"
                    )
                time.sleep(READY_POLL_SECONDS)

    def stop(self) -> None:
        """Stops whatever this stack started; safe to call more than once or after a failed start."""
        launched = self._supervisord is not None
        try:
            self._stop_supervisord()
        finally:
            if launched:
                # A Triton that had to be killed leaves its shared memory behind.
                cleanup_shm(self.settings)
            self._release_lock()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection and control (tests, `make run`) ------------------------------------------------

    @property
    def running(self) -> bool:
        return self._supervisord is not None and self._supervisord.poll() is None

    def supervisor(self) -> SupervisorClient:
        return SupervisorClient(self.settings)

    @property
    def supervisor_config(self) -> Path:
        return self.settings.run_dir / "supervisord.conf"

    def programs(self) -> list[Program]:
        if self._programs is None:
            self._programs = default_programs(self.settings)
        return list(self._programs)

    # -- internals ---------------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        run_dir = self.settings.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StackError(
                f"another ferry is already running from {self.settings.home} (pid {holder}); "
                "stop it first (Ctrl-C in its terminal), or point FERRY_HOME elsewhere"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _check_ports(self) -> None:
        taken = taken_ports(self.settings)
        if taken:
            listed = ", ".join(f"{u.host}:{u.port} ({u.setting}, {u.env_var})" for u in taken)
            raise StackError(
                f"port(s) already in use: {listed}. Is another ferry or another program using them? "
                "Free them or choose other ports with the FERRY_* variables named."
            )

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        settings = self.settings
        if self.database_url is not None:
            settings = settings.model_copy(update={"database_url": self.database_url})
        env.update(settings_env(settings))
        # The gateway gets it through its own program environment (service_program).
        env.pop(ADMIN_KEY_ENV, None)
        return env

    def _start_supervisord(self) -> None:
        programs = self.programs()
        config = render_supervisor_config(self.settings, programs)
        socket_path(self.settings).unlink(missing_ok=True)
        self._supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(config)],
            env=self._child_env(),
            cwd=self.settings.home,
            stdout=self._supervisor_output,
            stderr=subprocess.STDOUT if self._supervisor_output is not None else None,
            # Its own session: a Ctrl-C in the terminal reaches the launcher only, which then stops
            # the programs in order instead of all of them getting SIGINT at once.
            start_new_session=True,
            preexec_fn=_die_with_parent,
            # supervisord holds the lock too, so it stays taken while any of the stack runs.
            pass_fds=(self._lock.fileno(),) if self._lock is not None else (),
            # Its logs and run files owner-only (its programs get `umask=077` of their own).
            umask=0o077,
        )

    def _stop_supervisord(self) -> None:
        proc = self._supervisord
        if proc is None:
            return
        if proc.poll() is None:
            pids = self._program_pids()
            proc.send_signal(signal.SIGTERM)
            budget = sum(p.stop_wait_seconds for p in self.programs()) + STOP_MARGIN_SECONDS
            try:
                proc.wait(budget)
            except subprocess.TimeoutExpired:
                # supervisord itself is stuck: end its programs' process groups, then it.
                for pid in pids:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.kill()
                proc.wait()
        self._supervisord = None

    def _program_pids(self) -> list[int]:
        try:
            return [info["pid"] for info in self.supervisor().processes().values() if info["pid"]]
        except (OSError, xmlrpc.client.Error):  # supervisord not answering: nothing more to learn
            return []

    def _check_alive(self) -> None:
        proc = self._supervisord
        if proc is None:
            raise StackError("the stack is not started")
        if proc.poll() is not None:
            raise StackError(
                f"supervisord exited with status {proc.returncode}; see "
                f"{self.settings.log_dir / 'supervisord.log'}"
            )
        try:
            processes = self.supervisor().processes()
        except (OSError, xmlrpc.client.Error):
            return  # its socket is not up yet
        for name, info in processes.items():
            if info["statename"] == "FATAL":
                log = self.settings.log_dir / f"{name}.log"
                raise StackError(f"{name} keeps failing to start; last lines of {log}:\n{_tail(log)}")

    def _pending_report(self, client: httpx.Client) -> str:
        pending: list[str] = []
        try:
            processes = self.supervisor().processes()
        except (OSError, xmlrpc.client.Error):
            return "supervisord"
        pending += [
            f"{n} ({i['statename'].lower()})" for n, i in processes.items() if i["statename"] != "RUNNING"
        ]
        try:
            text = client.get(f"{self.endpoints.envoy_admin}/clusters").text
        except httpx.HTTPError:
            if not any(p.startswith("envoy") for p in pending):
                pending.append("envoy")
            return ", ".join(pending)
        unhealthy = set()
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[2] == "health_flags" and parts[3] != "healthy":
                unhealthy.add(f"{parts[0]} health")
        return ", ".join(sorted(pending) + sorted(unhealthy)) or "envoy /readyz"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
