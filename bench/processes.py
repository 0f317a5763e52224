"""Every process of a running ferry stack, by role, and its memory as read now.

supervisord and each program it runs (Triton, the services, the gateway, Envoy) with their child
processes (Triton's Python backend stubs, one per model instance, run llama.cpp), plus the embedded
PostgreSQL, which is a daemon of its own (launcher/postgres.py): its postmaster and, summed, the
processes it forks (connection backends and background workers, which come and go).
"""

from __future__ import annotations

import re
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

import psutil

from launcher.postgres import data_dir
from launcher.stack import Stack

STUB = "triton_python_backend_stub"
# A stub's argv names its model instance: <model>_<group>_<index> (e.g. gemma-3-270m_0_0).
_INSTANCE = re.compile(r"^[^/]+_\d+_\d+$")


@dataclass(frozen=True)
class Role:
    """What one table row watches: one process, or a group summed (`group`: its members may come and
    go by design, so a changed pid set is no restart)."""

    processes: list[psutil.Process]
    group: bool = False


@dataclass(frozen=True)
class Reading:
    """One role's memory now: the pids it covers, RSS and anonymous bytes (summed over a group)."""

    pids: tuple[int, ...]
    rss: int
    anon: int


def _pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _process(pid: int | None) -> psutil.Process | None:
    if not pid:
        return None
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return list(process.children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def stub_instance(argv: list[str]) -> str | None:
    """The model instance a Triton Python backend stub runs (None for any other program)."""
    if not argv or Path(argv[0]).name != STUB:
        return None
    return next((a for a in argv[1:] if _INSTANCE.match(a)), "?")


def discover(stack: Stack) -> dict[str, Role]:
    """Role -> processes, found now (so a restarted process shows up under its new pid).

    Each supervisord program is a row; so is each Triton backend stub (`triton stub <instance>`).
    Anything else a program forks (the watchdog shell each stub starts, the stub's child, and its
    `sleep`) is summed into `<program> helpers`.
    """
    found: dict[str, Role] = {}
    supervisord = _process(_pid_file(stack.settings.run_dir / "supervisord.pid"))
    if supervisord is not None:
        found["supervisord"] = Role([supervisord])
    try:
        programs = stack.supervisor().processes()
    except (OSError, xmlrpc.client.Error):
        programs = {}
    for name, info in sorted(programs.items()):
        main = _process(info["pid"])
        if main is None:
            continue
        found[name] = Role([main])
        helpers: list[psutil.Process] = []
        for child in _descendants(main):
            try:
                instance = stub_instance(child.cmdline())
            except psutil.Error:
                continue
            if instance is None:
                helpers.append(child)
            else:
                found[f"{name} stub {instance}"] = Role([child])
        if helpers:
            found[f"{name} helpers"] = Role(helpers, group=True)
    if stack.settings.database_url is None:
        postmaster = _process(_pid_file(data_dir(stack.settings) / "postmaster.pid"))
        if postmaster is not None:
            found["postgres"] = Role([postmaster])
            # Connection backends and background workers: summed, they come and go.
            forks = _descendants(postmaster)
            if forks:
                found["postgres children"] = Role(forks, group=True)
    return found


def read(processes: list[psutil.Process]) -> Reading | None:
    """Summed RSS and anonymous RSS of `processes`; None when none of them is alive any more.

    Anonymous = RSS - (file-backed + shared memory), both from /proc/<pid>/statm (cheap). Not USS:
    a process's unique pages change when another process maps the same binary (another engineer's
    Envoy or PostgreSQL on the machine), which moved Envoy's USS by 46 MB in a run where nothing grew.
    """
    pids: list[int] = []
    rss = 0
    anon = 0
    for process in processes:
        try:
            memory = process.memory_info()
        except psutil.NoSuchProcess:
            continue
        pids.append(process.pid)
        rss += memory.rss
        anon += memory.rss - memory.shared
    return Reading(tuple(pids), rss, anon) if pids else None
