"""Recorder: what a process calls to record transactions and audit events (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ferry.audit.v1 import audit_pb2
from ferry.transactions.v1 import transactions_pb2
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2

from services.common.config import Settings
from services.common.telemetry import traceparent, tracing_enabled
from services.common.timestamps import seconds_to_duration, to_timestamp
from services.common.tokens import service_credentials
from services.recording.delivery import Delivery
from services.recording.metrics import DEGRADED, DELIVERY_LAG, SPOOL_DEPTH, SPOOL_WRITE
from services.recording.spool import Spool

if TYPE_CHECKING:
    from services.common.server import Runtime

log = logging.getLogger(__name__)

Transaction = transactions_pb2.Transaction
AuditEvent = audit_pb2.AuditEvent
HEALTH_NAME = "ferry.recording"
_STATUS = {
    "succeeded": Transaction.Status.STATUS_SUCCEEDED,
    "failed": Transaction.Status.STATUS_FAILED,
    "cancelled": Transaction.Status.STATUS_CANCELLED,
    "incomplete": Transaction.Status.STATUS_INCOMPLETE,
}
INCOMPLETE_MESSAGE = "the process serving this request exited before the request finished"


class Recorder:
    def __init__(
        self,
        settings: Settings,
        process: str,
        *,
        transactions_address: str | None = None,
        audit_address: str | None = None,
        stop_flush_seconds: float = 2.0,
    ) -> None:
        self.settings = settings
        # How long stop() keeps delivering before it gives up (what is left goes out on the next start).
        self.stop_flush_seconds = stop_flush_seconds
        self.process = process
        self.transactions_address = transactions_address or settings.transactions.address
        self.audit_address = audit_address or settings.audit.address
        self.path = settings.spool_dir / f"{process}.db"
        self.spool: Spool | None = None
        self.degraded = False
        self._delivery: Delivery | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        # Event ids: a random prefix per Recorder and a counter (cheaper than a uuid4 per event).
        self._id_prefix = uuid.uuid4().hex[:16]
        self._events = 0
        self._runtime: Runtime | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, runtime: Runtime | None = None) -> None:
        """Opens the spool, turns requests a dead predecessor left open into `incomplete` records,
        and starts delivering. With a runtime: reports health `ferry.recording`, audits
        `service.start`, and stops itself (auditing `service.stop`) when the service drains."""
        config = self.settings.recording
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.spool = await asyncio.to_thread(Spool, self.path, config.synchronous)
        orphans = self.spool.open_requests()
        for request_id in orphans:
            self.transaction_finished(request_id, status="incomplete", error_message=INCOMPLETE_MESSAGE)
        if orphans:
            log.warning(
                "%d requests were cut off by the previous %s process: recorded as incomplete",
                len(orphans),
                self.process,
            )
        metadata = service_credentials(self.settings.auth)
        self._delivery = Delivery(
            self.spool,
            self.transactions_address,
            self.audit_address,
            batch_size=config.batch_size,
            max_backoff=config.max_backoff_seconds,
            metadata=metadata,
            merge_window=config.merge_window_seconds,
            batch_delay=config.batch_delay_seconds,
        )
        self._tasks = [
            asyncio.create_task(
                self._delivery.run("transaction"), name=f"{self.process}-deliver-transactions"
            ),
            asyncio.create_task(self._delivery.run("audit"), name=f"{self.process}-deliver-audit"),
            asyncio.create_task(self._monitor(), name=f"{self.process}-spool-monitor"),
        ]
        if runtime is not None:
            self._runtime = runtime
            await runtime.health.set(HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
            self.operational(
                "service.start", attributes={"pid": str(os.getpid()), "address": runtime.endpoint.address}
            )
            runtime.on_stop.append(self.stop)

    async def stop(self) -> None:
        """Tries to deliver what is left for up to `stop_flush_seconds`, then stops delivering. The spool
        stays open and writable until `close()` (or exit); what is left goes out on the next start."""
        if not self._tasks:
            return
        if self._runtime is not None:
            self.operational("service.stop", attributes={"pid": str(os.getpid())})
        await self.flush(self.stop_flush_seconds)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._delivery:
            await self._delivery.close()

    def close(self) -> None:
        """Releases the spool (and its lock) so another Recorder of the same name can open it."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    async def flush(self, timeout: float) -> bool:
        """Delivers everything spooled so far (held-back starts included, at once); False on timeout."""
        deadline = time.monotonic() + timeout
        delivery = self._delivery
        if delivery is not None:
            delivery.flushing += 1
            self._wake("transaction")
            self._wake("audit")
        try:
            while self.depth() != (0, 0):
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.02)
            return True
        finally:
            if delivery is not None:
                delivery.flushing -= 1

    def depth(self) -> tuple[int, int]:
        """(transaction, audit) records waiting in the spool."""
        return self._spool().depth()

    # -- recording (request path: synchronous, local, no network) -------------------------------

    def transaction_started(
        self,
        request_id: str,
        *,
        model: str,
        principal: str = "anonymous",
        operation: str = "",
        prompt: str = "",
        messages: Iterable[Any] = (),
        parameters: Mapping[str, Any] | None = None,
        trace_id: str = "",
        create_time: datetime | None = None,
        cache_hit: bool = False,
    ) -> None:
        t = Transaction(
            request_id=request_id,
            principal=principal,
            model=model,
            operation=operation,
            prompt=prompt,
            messages=[_message(m) for m in messages],
            status=Transaction.Status.STATUS_IN_PROGRESS,
            trace_id=trace_id,
            create_time=to_timestamp(create_time) if create_time else _now(),
            cache_hit=cache_hit,
        )
        if parameters:
            params = struct_pb2.Struct()
            params.update(parameters)
            t.parameters.CopyFrom(params)
        started = time.perf_counter()
        if not self._spool().put_started(request_id, t.SerializeToString(), _span_context()):
            log.warning("transaction %s started twice; the first start is kept", request_id)
        SPOOL_WRITE.observe(time.perf_counter() - started)
        if not self.settings.recording.merge_window_seconds:
            # Otherwise the start waits for its outcome; delivery knows when to send it alone.
            self._wake("transaction")

    def transaction_finished(
        self,
        request_id: str,
        *,
        status: str | int,
        output: str = "",
        finish_reason: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        ttft: float | None = None,
        latency: float | None = None,
        error_code: str = "",
        error_message: str = "",
        complete_time: datetime | None = None,
    ) -> None:
        finished = transactions_pb2.CompleteTransactionRequest(
            name=f"transactions/{request_id}",
            status=_STATUS[status] if isinstance(status, str) else status,  # type: ignore[arg-type]
            output=output,
            finish_reason=finish_reason,
            usage=Transaction.Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
            error_code=error_code,
            error_message=error_message,
            complete_time=to_timestamp(complete_time) if complete_time else _now(),
        )
        if ttft is not None:
            finished.time_to_first_token.CopyFrom(seconds_to_duration(ttft))
        if latency is not None:
            finished.latency.CopyFrom(seconds_to_duration(latency))
        started = time.perf_counter()
        if not self._spool().put_finished(request_id, finished.SerializeToString(), _span_context()):
            log.warning("transaction %s finished twice; the first outcome is kept", request_id)
        SPOOL_WRITE.observe(time.perf_counter() - started)
        self._wake("transaction")

    def audit(self, event: AuditEvent) -> str:
        """Spools one audit event; fills event_id, event_time and source when empty. Returns the id."""
        if not event.event_id:
            self._events += 1
            event.event_id = f"{self._id_prefix}-{self._events:x}"
        if not event.HasField("event_time"):
            event.event_time.CopyFrom(_now())
        if not event.source:
            event.source = self.process
        started = time.perf_counter()
        self._spool().put_audit(event.SerializeToString(), _span_context())
        SPOOL_WRITE.observe(time.perf_counter() - started)
        self._wake("audit")
        return event.event_id

    def operational(
        self,
        action: str,
        *,
        principal: str = "system",
        resource: str = "",
        code: int = code_pb2.OK,
        message: str = "",
        request_id: str = "",
        attributes: Mapping[str, str] | None = None,
    ) -> str:
        """Audits something the platform did: `service.start`, `model.load`, `key.create`..."""
        return self.audit(
            AuditEvent(
                kind=AuditEvent.Kind.KIND_OPERATIONAL,
                action=action,
                principal=principal,
                service=self.process,
                resource=resource,
                code=code,  # type: ignore[arg-type]
                message=message,
                request_id=request_id,
                attributes=dict(attributes or {}),
            )
        )

    # -- internals -------------------------------------------------------------------------------

    def _spool(self) -> Spool:
        if self.spool is None:
            raise RuntimeError(f"Recorder({self.process!r}) is not started (or already closed)")
        return self.spool

    def _wake(self, kind: str) -> None:
        if self._delivery is None or self._loop is None:
            return
        event = self._delivery.wakeup[kind]
        if threading.get_ident() == self._loop_thread:
            event.set()
        else:
            self._loop.call_soon_threadsafe(event.set)

    async def _monitor(self) -> None:
        """Publishes depth and lag, reports degraded health, and checkpoints the WAL off the loop."""
        config = self.settings.recording
        last_checkpoint = time.monotonic()
        while True:
            spool = self._spool()
            depths = spool.depth()
            oldest = spool.oldest()
            wall = time.time()
            lags = [wall - t if t is not None else 0.0 for t in oldest]
            for kind, depth, lag in zip(("transaction", "audit"), depths, lags, strict=True):
                SPOOL_DEPTH.labels(kind).set(depth)
                DELIVERY_LAG.labels(kind).set(lag)
            degraded = max(depths) > config.degraded_depth or max(lags) > config.degraded_lag_seconds
            if degraded != self.degraded:
                self.degraded = degraded
                DEGRADED.set(1 if degraded else 0)
                log.warning(
                    "recording %s: spool depth %s, lag %.1fs",
                    "degraded" if degraded else "recovered",
                    depths,
                    max(lags),
                )
                if self._runtime is not None:
                    status = (
                        health_pb2.HealthCheckResponse.NOT_SERVING
                        if degraded
                        else health_pb2.HealthCheckResponse.SERVING
                    )
                    await self._runtime.health.set(HEALTH_NAME, status)
            if time.monotonic() - last_checkpoint > 10:
                await asyncio.to_thread(spool.checkpoint)
                last_checkpoint = time.monotonic()
            await asyncio.sleep(1.0)


def _span_context() -> str:
    """The current span's context, kept with a record so that its delivery span links to it (only
    with tracing on: otherwise no span would be there to link to)."""
    return traceparent() if tracing_enabled() else ""


def _now() -> timestamp_pb2.Timestamp:
    ns = time.time_ns()
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _message(m: Any) -> Transaction.Message:
    if isinstance(m, Mapping):
        return Transaction.Message(role=str(m.get("role", "")), content=str(m.get("content", "")))
    if isinstance(m, tuple):
        return Transaction.Message(role=str(m[0]), content=str(m[1]))
    return Transaction.Message(role=m.role, content=m.content)
