"""The embedded NATS server's logins (launcher/nats.py): no anonymous access; the client user may
submit jobs and request generations and nothing else (not read others' requests, not take or cancel
queued work); ferry's internal user runs the queue. A real nats-server, no rest of the stack."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from launcher.nats import nats_argv, nats_config_path, nats_program, with_nats_credentials
from launcher.ports import free_ports
from services.common.config import NatsSettings, Settings
from services.jobs import queue


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Settings]:
    port, monitor = free_ports(2)
    settings = Settings(home=tmp_path / "home", nats=NatsSettings(port=port, monitor_port=monitor))
    settings = with_nats_credentials(settings)
    nats_program(settings)  # writes the config
    process = subprocess.Popen(nats_argv(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield settings
    finally:
        process.terminate()
        process.wait(timeout=30)


async def _connect(settings: Settings, errors: list[Exception] | None = None, **login: Any) -> Client:
    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(exc)

    for _ in range(100):  # the server is starting
        try:
            return await nats.connect(
                settings.nats.servers[0], allow_reconnect=False, error_cb=on_error, **login
            )
        except OSError:
            await asyncio.sleep(0.1)
        except nats.errors.NoServersError:
            await asyncio.sleep(0.1)
    raise AssertionError("nats-server did not start")


def _client(settings: Settings) -> dict[str, str]:
    assert settings.nats.client_password is not None
    return {"user": settings.nats.client_user, "password": settings.nats.client_password.get_secret_value()}


@pytest.fixture
async def internal(server: Settings) -> AsyncIterator[Client]:
    """Ferry's own login, with the jobs stream and the workers' consumer in place."""
    nc = await queue.connect(server, "test-internal")
    js = nc.jetstream()
    await queue.ensure_stream(js, server)
    run = server.nats.run_subject
    await js.add_consumer(server.nats.stream, queue.consumer_config(queue.WORKERS_CONSUMER, run, server, 8))
    yield nc
    await nc.close()


def test_the_config_file_is_owner_only(server: Settings) -> None:
    assert nats_config_path(server).stat().st_mode & 0o077 == 0


async def test_without_credentials_a_client_cannot_connect(server: Settings, internal: Client) -> None:
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(server.nats.servers[0], allow_reconnect=False, max_reconnect_attempts=0)


async def test_the_client_user_submits_but_cannot_read_take_or_cancel_others_work(
    server: Settings, internal: Client
) -> None:
    errors: list[Exception] = []
    client = await _connect(server, errors, **_client(server))
    try:
        # Allowed: a job submission (JetStream acknowledges it).
        ack = await client.jetstream().publish(server.nats.submit_subject, b"{}")
        assert ack.stream == server.nats.stream
        # Denied: reading everyone's generation requests (keys, prompts) ...
        await client.subscribe(f"{server.nats.generate_prefix}.>")
        # ... announcing a cancellation ...
        await client.publish(queue.cancel_subject("job-1"), b"")
        # ... and taking queued work from the workers' consumer.
        await internal.jetstream().publish(server.nats.run_subject, b"job-2")
        next_message = f"$JS.API.CONSUMER.MSG.NEXT.{server.nats.stream}.{queue.WORKERS_CONSUMER}"
        with pytest.raises(Exception):  # noqa: B017 - denied: no answer comes
            await client.request(next_message, b'{"batch": 1}', timeout=2)
        await client.flush()
    finally:
        await client.close()
    denied = " ".join(str(e) for e in errors)
    assert f'subscription to "{server.nats.generate_prefix}.>"' in denied, denied
    assert f'publish to "{queue.cancel_subject("job-1")}"' in denied, denied
    assert f'publish to "{next_message.lower()}"' in denied.lower(), denied
    # The queued job is still there for the workers.
    sub = await internal.jetstream().pull_subscribe_bind(queue.WORKERS_CONSUMER, stream=server.nats.stream)
    (taken,) = await sub.fetch(1, timeout=10)
    assert taken.data == b"job-2"
