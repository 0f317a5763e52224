"""The jobs service's side of the queue: it puts each stored job on the work-queue stream, publishes
later what it could not publish at create (an outbox: the `jobs.published` flag), tells a running
job's worker that it was cancelled, and lets WaitJob hear that a job ended.

A job is stored before it is published, and published again until its flag is set; the job id as
`Nats-Msg-Id` makes the repeats one message, and a worker takes a job only through the database's
conditional start (store.start_attempt), so a job is never run twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from nats.aio.client import Client
from nats.js import JetStreamContext

from services.common.config import Settings
from services.jobs import queue
from services.jobs.store import JobStore

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 2.0
# The outbox sweep: how often, and how old an unpublished job must be (its create may still be
# publishing it).
SWEEP_SECONDS = 2.0
SWEEP_AGE_SECONDS = 2.0


class Dispatch:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        """Connects in the background: the service answers (and stores jobs) while NATS is away."""
        self._sweeper = asyncio.create_task(self._run(), name="jobs-dispatch")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait({self._sweeper}, timeout=queue.STOP_SECONDS)
        await queue.disconnect(self.nc)

    async def publish(self, job_id: str) -> bool:
        """Puts the job on the queue and marks it published; False when NATS did not take it (the
        sweep publishes it later)."""
        if self.js is None:
            return False
        try:
            await self.js.publish(
                self.settings.nats.run_subject,
                job_id.encode(),
                headers=queue.job_headers(job_id),
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except Exception as exc:  # NATS away or slow: the outbox keeps the job
            log.warning("job %s not published yet (%s); the outbox retries", job_id, type(exc).__name__)
            return False
        await self.store.mark_published(job_id)
        return True

    async def cancelled(self, job_id: str) -> None:
        """Tells the worker running the job (if any) to stop it; a worker also sees it in the database."""
        await self._announce(queue.cancel_subject(job_id))

    async def ended(self, job_id: str) -> None:
        await self._announce(queue.ended_subject(job_id))

    @contextlib.asynccontextmanager
    async def watch_end(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set when the job's end is announced (never set while NATS is away: the caller
        reads the store as well)."""
        heard = asyncio.Event()
        sub = None
        if self.nc is not None and self.nc.is_connected:

            async def on_message(_msg: object) -> None:
                heard.set()

            with contextlib.suppress(Exception):
                sub = await self.nc.subscribe(queue.ended_subject(job_id), cb=on_message)
        try:
            yield heard
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _announce(self, subject: str) -> None:
        if self.nc is None or not self.nc.is_connected:
            return
        with contextlib.suppress(Exception):
            await self.nc.publish(subject, b"")

    async def _run(self) -> None:
        self.nc = await queue.connect(self.settings, "ferry-jobs")
        js = self.nc.jetstream()
        while True:
            try:
                await queue.ensure_stream(js, self.settings)
                break
            except Exception as exc:  # JetStream not ready yet (a cluster electing)
                log.warning("jobs stream not ready (%s); retrying", exc)
                await asyncio.sleep(queue.CONNECT_RETRY_SECONDS)
        self.js = js
        self._ready.set()
        while True:
            try:
                for job_id in await self.store.unpublished(SWEEP_AGE_SECONDS):
                    if not await self.publish(job_id):
                        break
            except Exception as exc:  # the database away: next sweep
                log.warning("outbox sweep failed: %s", exc)
            await asyncio.sleep(SWEEP_SECONDS)
