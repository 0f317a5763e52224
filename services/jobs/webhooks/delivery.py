"""The delivery loop: POSTs due job-end events to their webhooks, at least once, and records each try.

Due events are claimed from the outbox (PostgreSQL, `FOR UPDATE SKIP LOCKED` under a lease, so any
number of loops in any number of processes share the work and a crashed loop's claim is retaken
when its lease ends), signed with the creator key's secret, sent to the address the SSRF guard
checked just before, and recorded: a 2xx answer delivers the event; anything else (another status, a
refused or unreachable destination, no signing secret) is retried per services/jobs/webhooks/retry.py.
Redirects are not followed and answers' bodies are not read. The loop looks for due events every
`poll_seconds`, and at once when any process enqueues one (PostgreSQL LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import Protocol

import httpx
import psycopg

from services.common.config import Settings
from services.common.errors import RpcError
from services.common.timestamps import now
from services.jobs.webhooks import metrics
from services.jobs.webhooks.destinations import DestinationRefused, resolve
from services.jobs.webhooks.outbox import DELIVERED, NOTIFY_CHANNEL, PENDING, Event, Outbox
from services.jobs.webhooks.retry import next_attempt_time
from services.jobs.webhooks.signing import signed_headers

log = logging.getLogger(__name__)

# Kept on a try's error: enough to say what happened, bounded for the job's answer.
MAX_ERROR_CHARS = 500
# Beyond one try's timeout, the time a claim stays ours (secret look-up, resolution, recording).
LEASE_MARGIN_SECONDS = 30.0
MAX_LISTEN_BACKOFF_SECONDS = 30.0


class SecretSource(Protocol):
    async def secret_for(self, creator: str) -> str: ...


class Delivery:
    def __init__(self, settings: Settings, outbox: Outbox, secrets: SecretSource) -> None:
        self.settings = settings.webhooks
        self.outbox = outbox
        self.secrets = secrets
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[str]] = set()
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        # trust_env off: an HTTP(S)_PROXY in the environment would bypass the address check.
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self._task = asyncio.create_task(self._run(), name="webhook-delivery")
        self._listener = asyncio.create_task(self._listen(), name="webhook-delivery-listen")

    async def stop(self, grace_seconds: float = 5.0) -> None:
        for loop in (self._listener, self._task):
            if loop is not None:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
        if self._in_flight:
            # Unfinished tries are retaken by a loop after their lease; none is lost.
            _, pending = await asyncio.wait(self._in_flight, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def wake(self) -> None:
        """Look for due events now (an event was just enqueued in this process)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                room = self.settings.max_in_flight - len(self._in_flight)
                events = await self.outbox.claim_due(room, self._lease_seconds()) if room > 0 else []
                for event in events:
                    task = asyncio.create_task(self._deliver_logged(event), name=f"webhook-{event.id}")
                    self._in_flight.add(task)
                    task.add_done_callback(self._done)
                if len(events) == room and room > 0:
                    continue  # more may be due
            except RpcError as err:  # the database is away: try again at the next poll
                log.warning("webhook delivery: outbox unavailable: %s", err.message)
            except Exception:
                log.exception("webhook delivery: claiming due events failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
            self._wake.clear()

    async def _listen(self) -> None:
        """Wakes the loop whenever an event is enqueued anywhere; polling covers any gap."""
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.outbox.conninfo(), autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._wake.set()  # whatever came while nobody listened
                    delay = 0.5
                    async for _ in conn.notifies():
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook delivery: not listening for new events (%s); polling", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_LISTEN_BACKOFF_SECONDS)

    def _done(self, task: asyncio.Task[str]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # room for another

    def _lease_seconds(self) -> float:
        return self.settings.timeout_seconds + LEASE_MARGIN_SECONDS

    async def _deliver_logged(self, event: Event) -> str:
        try:
            return await self.deliver(event)
        except Exception:
            # Not recorded (the database is away?): the claim's lease ends and the try is made again.
            log.exception("webhook %s for %s: the try could not be recorded", event.id, event.job)
            return "pending"

    async def deliver(self, event: Event) -> str:
        """One try of `event`, recorded; returns the event's state after it."""
        attempt_time, started = now(), time.monotonic()
        status, error = await self._try(event, attempt_time)
        metrics.DELIVERY_SECONDS.observe(time.monotonic() - started)
        retry_at = None
        if error:
            retry_at = next_attempt_time(event.create_time, event.attempts + 1, now(), self.settings)
            log.info(
                "webhook %s for %s: try %d failed (%s); %s",
                event.id,
                event.job,
                event.attempts + 1,
                error,
                f"next at {retry_at.isoformat()}" if retry_at else "giving up",
            )
        state = await self.outbox.record(
            event,
            attempt_time=attempt_time,
            http_status=status,
            error=error[:MAX_ERROR_CHARS],
            next_attempt_time=retry_at,
        )
        metrics.DELIVERY_TRIES.labels({DELIVERED: "delivered", PENDING: "retry"}.get(state, "failed")).inc()
        if state == DELIVERED:
            metrics.DELIVERY_LAG_SECONDS.observe((now() - event.create_time).total_seconds())
        return state

    async def _try(self, event: Event, attempt_time: datetime) -> tuple[int, str]:
        """(HTTP status or 0, error or '')."""
        assert self._client is not None, "Delivery.start() first"
        try:
            secret = await self.secrets.secret_for(event.creator)
        except RpcError as err:
            return 0, f"no signing secret: {err.message}"
        try:
            destination = await resolve(event.url, self.settings)
        except DestinationRefused as exc:
            return 0, f"destination refused: the URL {exc}"
        headers = signed_headers(secret, event.id, attempt_time, event.payload)
        headers["host"] = destination.host_header
        # TLS is checked against the URL's host although the connection goes to the checked address.
        extensions = {"sni_hostname": destination.host} if event.url.startswith("https:") else {}
        try:
            async with self._client.stream(
                "POST",
                destination.pinned_url,
                content=event.payload.encode(),
                headers=headers,
                extensions=extensions,
                timeout=self.settings.timeout_seconds,
            ) as response:
                status = response.status_code
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= status < 300:
            return status, ""
        return status, f"HTTP {status}"
