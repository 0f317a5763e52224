"""Bounded admission: at most N generations in flight, at most M waiting, and a fast refusal beyond.

Letting every request through to the engine only moves the queue somewhere nobody can see it and
latency grows without bound; refusing past a bound lets clients retry elsewhere or later
(TGI answers 429 past --max-concurrent-requests, Triton rejects past max_queue_size).
Waiters are served first come, first served. A refusal carries a retry delay estimated from how
long requests have recently held a slot.

Background requests (`x-ferry-priority: background`: the jobs' workers, docs/jobs.md) come last: one is
admitted only when a slot is free beyond `inference.background_reserve` and no interactive request
waits; otherwise it is refused at once with BACKGROUND_DEFERRED (before the record stage, so nothing
is recorded) and its worker asks again later. It never waits in the queue, so it can neither take a
waiter's place nor fill the queue that makes interactive requests 429.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common.config import InferenceSettings
from services.common.errors import Reason, rpc_error
from services.common.interceptor import Call, current_call
from services.common.triton_client import ModelInfo
from services.inference import metrics

# A request's priority (metadata); `background` marks a job's generation.
PRIORITY_HEADER = "x-ferry-priority"
BACKGROUND = "background"
# Bounds of the Retry-After estimate, in seconds.
MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 30.0


class Admission:
    def __init__(self, name: str, max_in_flight: int, max_queued: int) -> None:
        self.name = name
        self.max_in_flight = max(1, max_in_flight)
        self.max_queued = max(0, max_queued)
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Moving average of how long a request holds a slot; seeds the Retry-After estimate.
        self._hold_seconds = 2.0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def resize(self, max_in_flight: int, max_queued: int) -> None:
        """New limits (the model was reloaded with another slot count); wakes waiters that now fit."""
        self.max_in_flight = max(1, max_in_flight)
        self.max_queued = max(0, max_queued)
        while self._waiters and self.in_flight < self.max_in_flight:
            self.in_flight += 1
            self._wake_next()

    def retry_after(self) -> float:
        waves = (self.queued + 1) / self.max_in_flight
        return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, math.ceil(waves * self._hold_seconds)))

    async def acquire(self, timeout: float | None = None) -> None:
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise rpc_error(
                Reason.OVERLOADED,
                f"model '{self.name}' is overloaded: {self.in_flight} requests running and "
                f"{self.queued} waiting; retry later",
                metadata={
                    "model": self.name,
                    "max_in_flight": str(self.max_in_flight),
                    "max_queued": str(self.max_queued),
                },
                retry_after_seconds=self.retry_after(),
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (asyncio.CancelledError, TimeoutError) as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we gave up: pass it on.
                self.release()
            else:
                waiter.cancel()
                self._discard(waiter)
            if isinstance(exc, TimeoutError):
                raise rpc_error(
                    Reason.QUEUE_TIMEOUT,
                    f"deadline exceeded while waiting for a free slot of model '{self.name}'",
                    metadata={"model": self.name},
                ) from exc
            raise

    def acquire_spare(self, reserve: int) -> None:
        """A slot for a background request, only from spare capacity: beyond `reserve` free slots
        (at most all but one, so a one-slot model still runs background work when idle) and with
        nobody waiting; else BACKGROUND_DEFERRED at once."""
        kept = min(max(0, reserve), self.max_in_flight - 1)
        if self.in_flight + kept < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        raise rpc_error(
            Reason.BACKGROUND_DEFERRED,
            f"model '{self.name}' has no spare slot for background work ({self.in_flight} running, "
            f"{self.queued} waiting, {kept} kept for interactive requests)",
            metadata={"model": self.name},
            retry_after_seconds=self.retry_after(),
        )

    def release(self) -> None:
        if self.in_flight <= self.max_in_flight and self._wake_next():
            return  # the slot passes straight to the next waiter
        self.in_flight -= 1

    def _wake_next(self) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    @asynccontextmanager
    async def slot(
        self, timeout: float | None = None, *, background_reserve: int | None = None
    ) -> AsyncIterator[float]:
        """Holds a slot for the body; yields the seconds spent waiting for it. With a
        `background_reserve`, a background request's slot (see `acquire_spare`)."""
        asked = time.monotonic()
        if background_reserve is None:
            await self.acquire(timeout)
        else:
            self.acquire_spare(background_reserve)
        admitted = time.monotonic()
        try:
            yield admitted - asked
        finally:
            held = time.monotonic() - admitted
            self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * held
            self.release()


class Admissions:
    """The admission stage: one gate per model, sized from the settings or the model's engine slots,
    with its gauges."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self._gates: dict[str, Admission] = {}

    def limits(self, model: ModelInfo) -> tuple[int, int]:
        """(in flight, queued): configured values, else the engine's slot count and 8 x that."""
        in_flight = self.settings.max_in_flight or model.engine_slots or 1
        queued = self.settings.max_queued if self.settings.max_queued >= 0 else 8 * in_flight
        return in_flight, queued

    def gate(self, model: ModelInfo) -> Admission:
        """The model's gate; created (with its gauges) on first use, resized when the model's slot count
        changed (a reload)."""
        in_flight, queued = self.limits(model)
        gate = self._gates.get(model.name)
        if gate is None:
            gate = self._gates[model.name] = Admission(model.name, in_flight, queued)
            metrics.IN_FLIGHT.labels(model.name).set_function(lambda: gate.in_flight)
            metrics.QUEUED.labels(model.name).set_function(lambda: gate.queued)
        elif (gate.max_in_flight, gate.max_queued) != (in_flight, queued):
            gate.resize(in_flight, queued)
        else:
            return gate  # limits unchanged: the gauges already say them
        metrics.ADMISSION_LIMIT.labels(model.name, "in_flight").set(gate.max_in_flight)
        metrics.ADMISSION_LIMIT.labels(model.name, "queued").set(gate.max_queued)
        return gate


def is_background(call: Call | None = None) -> bool:
    """Whether the RPC being handled asked for background priority. Anyone may: it only lowers the
    caller's own priority."""
    call = call or current_call.get()
    return call is not None and call.metadata.get(PRIORITY_HEADER) == BACKGROUND
