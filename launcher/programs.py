"""A process the launcher runs under supervisord: one definition, used by `make run` and the tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Program:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # supervisord starts lower priorities first; services retry their dependencies anyway.
    priority: int = 500
    # Seconds a process gets between SIGTERM and SIGKILL.
    stop_wait_seconds: int = 15
    # Programs of one group stop together (supervisord stops groups one after another).
    group: str | None = None
    # The signal that asks it to stop, and whether it goes to its whole process group (Triton's
    # backend stubs) or to the process alone (PostgreSQL's postmaster stops its children itself).
    stop_signal: str = "TERM"
    stop_as_group: bool = True
