"""supervisord runs ferry's processes: its configuration, rendered from Programs, and a client for it.

supervisord restarts a process that dies (`autorestart`), backs off on one that keeps failing to
start (waits of 1, 2, 3 ... s, then gives up: FATAL), logs every exit and spawn in
`<log_dir>/supervisord.log`, and on SIGTERM stops the programs in reverse priority order.
"""

from __future__ import annotations

import hashlib
import shlex
import tempfile
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from supervisor.xmlrpc import SupervisorTransport

from launcher.files import write_private
from launcher.programs import Program
from services.common.config import Settings

CONFIG_NAME = "supervisord.conf"
# A process must stay up this long to count as started; failures before it are retried with backoff.
START_SECONDS = 3
# Failed starts in a row before supervisord gives up on a program (about 3.5 min of backoff).
START_RETRIES = 20
# Unix socket paths are limited to 108 bytes; deep folders fall back to the temp dir.
MAX_SOCKET_PATH = 100


def socket_path(settings: Settings) -> Path:
    preferred = settings.run_dir / "supervisor.sock"
    if len(str(preferred)) <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(str(settings.run_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ferry-supervisor-{digest}.sock"


def _quote(value: str) -> str:
    # supervisord expands %(name)s in values, so a literal percent sign is doubled.
    return value.replace("%", "%%")


def _environment(env: dict[str, str]) -> str:
    pairs = []
    for key, value in env.items():
        escaped = _quote(value).replace("\\", "\\\\").replace('"', '\\"')
        pairs.append(f'{key}="{escaped}"')
    return ",".join(pairs)


def _program_section(program: Program, settings: Settings) -> str:
    lines = [
        f"[program:{program.name}]",
        f"command={_quote(shlex.join(program.argv))}",
        f"priority={program.priority}",
        "autostart=true",
        "autorestart=true",
        f"startsecs={START_SECONDS}",
        f"startretries={START_RETRIES}",
        f"stopsignal={program.stop_signal}",
        f"stopwaitsecs={program.stop_wait_seconds}",
        # Signals go to the whole process group (Triton's backend stubs stop with Triton) unless the
        # program stops its children itself; SIGKILL after stopwaitsecs always does.
        f"stopasgroup={str(program.stop_as_group).lower()}",
        "killasgroup=true",
        # Owner-only by default, whatever ferry's processes create (spools, unix sockets, files in
        # the home). Per program: supervisord's own `umask` applies only when it daemonizes.
        "umask=077",
        "redirect_stderr=true",
        f"stdout_logfile={settings.log_dir / f'{program.name}.log'}",
        "stdout_logfile_maxbytes=20MB",
        "stdout_logfile_backups=3",
    ]
    if program.cwd is not None:
        lines.append(f"directory={program.cwd}")
    if program.env:
        lines.append(f"environment={_environment(program.env)}")
    return "\n".join(lines)


def _group_sections(programs: Sequence[Program]) -> list[str]:
    groups: dict[str, list[Program]] = {}
    for program in programs:
        if program.group:
            groups.setdefault(program.group, []).append(program)
    return [
        f"[group:{name}]\nprograms={','.join(p.name for p in members)}\n"
        f"priority={min(p.priority for p in members)}"
        for name, members in groups.items()
    ]


def render_supervisor_config(settings: Settings, programs: Sequence[Program]) -> Path:
    """Writes supervisord.conf into the run directory; the environment comes from supervisord's own."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    sock = socket_path(settings)
    sections = [
        "\n".join(
            [
                "[supervisord]",
                "nodaemon=true",
                f"logfile={settings.log_dir / 'supervisord.log'}",
                "logfile_maxbytes=10MB",
                "logfile_backups=3",
                "loglevel=info",
                f"pidfile={settings.run_dir / 'supervisord.pid'}",
                f"childlogdir={settings.log_dir}",
                f"directory={settings.home}",
                # Several stacks may run on one machine (tests); this names the one in the logs.
                f"identifier=ferry:{settings.home}",
            ]
        ),
        "\n".join(["[unix_http_server]", f"file={sock}", "chmod=0700"]),
        "\n".join(
            [
                "[rpcinterface:supervisor]",
                "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            ]
        ),
        "\n".join(["[supervisorctl]", f"serverurl=unix://{sock}"]),
        *(_program_section(p, settings) for p in programs),
        *_group_sections(programs),
    ]
    path = settings.run_dir / CONFIG_NAME
    # Owner-only: a program's environment may hold a secret (the gateway's bootstrap admin key).
    write_private(path, "\n\n".join(sections) + "\n")
    return path


class SupervisorClient:
    """supervisord's XML-RPC interface over its Unix socket (what supervisorctl uses)."""

    def __init__(self, settings: Settings) -> None:
        url = f"unix://{socket_path(settings)}"
        self._proxy = xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=SupervisorTransport(serverurl=url)
        )

    @property
    def _supervisor(self) -> Any:
        return self._proxy.supervisor

    def state(self) -> str:
        return cast(str, self._supervisor.getState()["statename"])

    def processes(self) -> dict[str, dict[str, Any]]:
        """Process info by program name (without its group prefix)."""
        return {info["name"]: info for info in self._supervisor.getAllProcessInfo()}

    def process(self, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._supervisor.getProcessInfo(self._qualified(name)))

    def pid(self, name: str) -> int:
        return int(self.process(name)["pid"])

    def stop(self, name: str, wait: bool = True) -> None:
        self._supervisor.stopProcess(self._qualified(name), wait)

    def start(self, name: str, wait: bool = True) -> None:
        self._supervisor.startProcess(self._qualified(name), wait)

    def signal(self, name: str, signal: str) -> None:
        self._supervisor.signalProcess(self._qualified(name), signal)

    def _qualified(self, name: str) -> str:
        # supervisord names a grouped process `group:name`.
        info = self.processes().get(name)
        if info is None or info["group"] == name:
            return name
        return f"{info['group']}:{name}"
