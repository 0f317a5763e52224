"""The jobs queue on NATS JetStream: the connection, the work-queue stream, and its subjects.

One stream (`nats.stream`, work-queue retention, file storage) holds two subjects, each read by one
durable pull consumer: `nats.run_subject` (a job id per message, published by the jobs service, taken
by the workers) and `nats.submit_subject` (CreateJobRequests published by NATS clients, taken by the
jobs service's bridge, see bridge.py). The job id is the message's `Nats-Msg-Id`, so JetStream drops a
second publish of the same job within its duplicate window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from services.common.config import Settings

log = logging.getLogger(__name__)

WORKERS_CONSUMER = "ferry-workers"
SUBMIT_CONSUMER = "ferry-submit"
# Core NATS subjects (not stored): a cancelled job's worker is told at once; a job's end wakes waiters.
CANCEL_PREFIX = "ferry.jobs.cancelled"
ENDED_PREFIX = "ferry.jobs.ended"
# JetStream drops a message whose Nats-Msg-Id it saw within this window.
DUPLICATE_WINDOW_SECONDS = 600.0
CONNECT_RETRY_SECONDS = 0.5
# How long a stopping process waits for its NATS connection to drain, and for a loop to end.
STOP_SECONDS = 3.0


async def connect(settings: Settings, name: str) -> Client:
    """A connection to the configured servers, retried until one answers; it reconnects on its own
    afterwards (a NATS restart only pauses the queue)."""
    nats_settings = settings.nats
    login: dict[str, str] = {}
    if nats_settings.internal_password is not None:
        login = {
            "user": nats_settings.internal_user,
            "password": nats_settings.internal_password.get_secret_value(),
        }
    while True:
        try:
            return await nats.connect(
                servers=nats_settings.servers,
                name=name,
                **login,
                max_reconnect_attempts=-1,
                reconnect_time_wait=CONNECT_RETRY_SECONDS,
                connect_timeout=2,
            )
        except Exception as exc:  # any failure to connect is retried, logged
            # Only the servers' hosts: a URL's user:password stays out of the log.
            log.warning("NATS %s not reachable (%s); retrying", nats_settings.shown_servers, exc)
            await asyncio.sleep(CONNECT_RETRY_SECONDS)


async def disconnect(nc: Client | None) -> None:
    """Flushes what was published to the server (within STOP_SECONDS), then closes the connection.

    Not nats-py's drain(): with a JetStream pull subscription it stalls until its own 30 s timeout,
    longer than a supervisor waits for a stopping process (it was killed, and every stack's shutdown
    took 15 s longer). Nothing needs it: messages fetched and not acknowledged are redelivered."""
    if nc is None or nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.flush(), STOP_SECONDS)
    except Exception as exc:  # NATS already gone: nothing more can reach it
        log.debug("NATS flush before closing failed: %r", exc)
    with contextlib.suppress(Exception):
        await nc.close()


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    """Creates the jobs stream, or brings an existing one to this configuration."""
    nats_settings = settings.nats
    config = StreamConfig(
        name=nats_settings.stream,
        subjects=[nats_settings.run_subject, nats_settings.submit_subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=nats_settings.replicas,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )
    try:
        await js.stream_info(nats_settings.stream)
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)


def consumer_config(name: str, subject: str, settings: Settings, max_ack_pending: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=name,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.jobs.ack_wait_seconds,
        # Attempts are counted in the database (a deferral is no attempt); JetStream never gives up.
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        num_replicas=settings.nats.replicas,
    )


def job_headers(job_id: str) -> dict[str, str]:
    return {"Nats-Msg-Id": job_id}


def cancel_subject(job_id: str) -> str:
    return f"{CANCEL_PREFIX}.{job_id}"


def ended_subject(job_id: str) -> str:
    return f"{ENDED_PREFIX}.{job_id}"
