"""Background delivery from the spool to the Transactions and Audit services, at least once.

Each kind has its own loop, so an Audit outage never holds transactions back (and the reverse).
A record leaves the spool only after its service acknowledged it; a failed call is retried with
exponential backoff (tenacity) for as long as it takes. The services' writes are idempotent (request
id, event id), which turns at-least-once delivery into exactly-once effect.

Fewer calls: a started transaction is held back for `merge_window` seconds, so that a request that
finishes within it goes out as one CreateTransaction with its outcome (instead of CreateTransaction
then CompleteTransaction); and a loop woken by a new record waits `batch_delay` seconds, so that the
records arriving meanwhile go out together (one AppendEvents for many audit events; one
BatchCreateTransactions for the records and starts, one BatchCompleteTransactions for the outcomes of
starts sent earlier: a process under load makes a call per batch, not one per request). Neither
delays what is on disk: the spool has every record from the moment it is written.

A batch is all or none: refused as invalid (or by a Transactions service without the batch calls),
its records go again one call each, which finds the invalid one. Refusals that retrying cannot fix
(INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION) move the record to the spool's `dead` table instead of blocking everything behind it; all other errors
(UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED while keys are being set up, ...) are retried. A
merged CreateTransaction that is refused falls back to the start on its own, so that an invalid
outcome never takes the request's start (prompt, messages, principal) with it: the start is delivered
and only the outcome is set aside, or, when the start is refused too, the whole merged record is.

With tracing on, each delivery call is a PRODUCER span `deliver transactions` / `deliver audit`,
the root of a trace of its own and LINKED to the request span(s) whose records it carries (the span
context spooled with each record); the Transactions/Audit server span of the call is its child.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

import grpc
from ferry.audit.v1 import audit_pb2, audit_pb2_grpc
from ferry.transactions.v1 import transactions_pb2, transactions_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from services.common.telemetry import link_to, trace_headers, tracer, tracing_enabled
from services.recording.metrics import DEAD_LETTERS, DELIVERED, DELIVERY_FAILURES
from services.recording.spool import Spool, TxnRow

log = logging.getLogger(__name__)

Transaction = transactions_pb2.Transaction
CALL_TIMEOUT_SECONDS = 10.0
# An idle loop looks at the spool at least this often (records written by another thread, due starts).
IDLE_POLL_SECONDS = 1.0
PERMANENT = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION}
)


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in PERMANENT


def _batch_refused(exc: grpc.aio.AioRpcError) -> bool:
    """A batch call that records one by one may still get through: one of them is invalid, or the
    service predates the batch calls (UNIMPLEMENTED)."""
    return is_permanent(exc) or exc.code() == grpc.StatusCode.UNIMPLEMENTED


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError | OSError) and not is_permanent(exc)


def merge(
    started: bytes | None, request_id: str, finished: transactions_pb2.CompleteTransactionRequest
) -> Transaction:
    """The whole record from its start and its outcome, for a single CreateTransaction call."""
    t = Transaction.FromString(started) if started else Transaction(request_id=request_id)
    t.status = finished.status
    t.output = finished.output
    t.finish_reason = finished.finish_reason
    t.usage.CopyFrom(finished.usage)
    for field in ("time_to_first_token", "latency", "complete_time"):
        if finished.HasField(field):
            getattr(t, field).CopyFrom(getattr(finished, field))
    t.error_code = finished.error_code
    t.error_message = finished.error_message
    return t


@contextlib.contextmanager
def delivery_span(
    destination: str, contexts: Iterable[str], count: int, request_id: str = ""
) -> Iterator[Span | None]:
    """The current span of one delivery call, linked to the spans of the records it carries (None, and
    no span, with tracing off). A root span: delivery runs apart from any request."""
    if not tracing_enabled():
        yield None
        return
    links = [link for link in map(link_to, dict.fromkeys(contexts)) if link is not None]
    attributes: dict[str, str | int] = {
        "messaging.system": "ferry.spool",
        "messaging.operation.type": "send",
        "messaging.operation.name": "deliver",
        "messaging.destination.name": destination,
        "messaging.batch.message_count": count,
    }
    if request_id:
        attributes["ferry.request_id"] = request_id
    with tracer().start_as_current_span(
        f"deliver {destination}",
        context=otel_context.Context(),
        kind=SpanKind.PRODUCER,
        links=links,
        attributes=attributes,
    ) as span:
        yield span


class Refused(Exception):
    """The service refused a record as invalid; `payload` is what the dead table keeps of it."""

    def __init__(self, payload: bytes, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.payload = payload
        self.details = str(error.details())


class Delivery:
    def __init__(
        self,
        spool: Spool,
        transactions_address: str,
        audit_address: str,
        *,
        batch_size: int,
        max_backoff: float,
        metadata: tuple[tuple[str, str], ...] = (),
        merge_window: float = 0.0,
        batch_delay: float = 0.0,
    ) -> None:
        self.spool = spool
        self.batch_size = batch_size
        self.max_backoff = max_backoff
        self.metadata = metadata
        self.merge_window = merge_window
        self.batch_delay = batch_delay
        # While > 0 (someone is flushing), nothing is held back or delayed.
        self.flushing = 0
        self.wakeup = {"transaction": asyncio.Event(), "audit": asyncio.Event()}
        self._channels = [
            grpc.aio.insecure_channel(transactions_address),
            grpc.aio.insecure_channel(audit_address),
        ]
        self.transactions = transactions_pb2_grpc.TransactionsServiceStub(self._channels[0])
        self.audit = audit_pb2_grpc.AuditServiceStub(self._channels[1])

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def run(self, kind: str) -> None:
        """Delivers `kind` records until cancelled."""
        step: Callable[[], Awaitable[int]] = (
            self._transactions_step if kind == "transaction" else self._audit_step
        )
        wakeup = self.wakeup[kind]

        def failed(state: RetryCallState) -> None:
            DELIVERY_FAILURES.labels(kind).inc()
            exc = state.outcome.exception() if state.outcome else None
            detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
            level = (
                logging.WARNING
                if state.attempt_number in (1, 10) or state.attempt_number % 100 == 0
                else logging.DEBUG
            )
            log.log(
                level, "%s delivery failed (%s), attempt %d; retrying", kind, detail, state.attempt_number
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential_jitter(multiplier=0.1, max=self.max_backoff, jitter=0.2),
            before_sleep=failed,
            reraise=True,
        )
        while True:
            wakeup.clear()
            try:
                delivered: int = await retrying(step)
            except Exception:
                # Not a gRPC failure: a bug or a corrupt record. Keep the loop alive; say so loudly.
                log.exception("%s delivery step failed unexpectedly", kind)
                DELIVERY_FAILURES.labels(kind).inc()
                await asyncio.sleep(self.max_backoff)
                continue
            if delivered >= self.batch_size:
                continue  # a full batch: more is probably waiting
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set (stop() writes `service.stop`, then cancels us).
            try:
                async with asyncio.timeout(self._idle_seconds(kind)):
                    await wakeup.wait()
            except TimeoutError:
                continue
            if self.batch_delay > 0 and not self.flushing:
                # Woken by a new record: let the next few join it in the same batch.
                await asyncio.sleep(self.batch_delay)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The service credentials, and with tracing on the current (delivery) span's trace context."""
        if not tracing_enabled():
            return self.metadata
        return (*self.metadata, *trace_headers().items())

    def _holding_starts(self) -> bool:
        return self.merge_window > 0 and not self.flushing

    def _idle_seconds(self, kind: str) -> float:
        """How long an idle loop may sleep: until the first held start is due, at most IDLE_POLL_SECONDS."""
        if kind != "transaction" or not self._holding_starts():
            return IDLE_POLL_SECONDS
        first = self.spool.first_waiting_start()
        if first is None:
            return IDLE_POLL_SECONDS
        # A small floor, so that a start due now never makes the loop spin.
        return min(IDLE_POLL_SECONDS, max(0.01, first + self.merge_window - time.time()))

    async def _transactions_step(self) -> int:
        held = time.time() - self.merge_window if self._holding_starts() else None
        rows = self.spool.pending_txn(self.batch_size, started_before=held)
        # Records not yet in the database (a start, or start and outcome merged) go in one
        # BatchCreateTransactions; outcomes of starts already sent in one BatchCompleteTransactions.
        creates = [row for row in rows if row.finished is None or not row.start_sent]
        completes = [row for row in rows if row.finished is not None and row.start_sent]
        if creates:
            await self._create_batch(creates)
        if completes:
            await self._complete_batch(completes)
        return len(rows)

    async def _create_batch(self, rows: list[TxnRow]) -> None:
        records = [
            Transaction.FromString(row.started or b"")
            if row.finished is None
            else merge(
                row.started,
                row.request_id,
                transactions_pb2.CompleteTransactionRequest.FromString(row.finished),
            )
            for row in rows
        ]
        request = transactions_pb2.BatchCreateTransactionsRequest(
            requests=[transactions_pb2.CreateTransactionRequest(transaction=t) for t in records]
        )
        try:
            single = rows[0].request_id if len(rows) == 1 else ""
            with delivery_span("transactions", [row.context for row in rows], len(rows), single):
                reply = await self.transactions.BatchCreateTransactions(
                    request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata()
                )
        except grpc.aio.AioRpcError as exc:
            if not _batch_refused(exc):
                raise
            # A record refused as invalid (the batch is all or none), or a Transactions service without
            # the batch call: each record on its own finds the invalid one.
            await self._deliver_each(rows)
            return
        # Marked in the spool a batch at a time (one commit each), before any record goes on its own.
        started: list[int] = []
        delivered: list[int] = []
        alone: list[TxnRow] = []
        for row, record in zip(rows, reply.transactions, strict=True):
            if row.finished is None:
                started.append(row.seq)
            elif record.status == Transaction.Status.STATUS_IN_PROGRESS:
                # A start sent earlier got in first (its reply was lost): the outcome goes alone.
                alone.append(dataclasses.replace(row, start_sent=True))
            else:
                delivered.append(row.seq)
        self.spool.starts_delivered(started)
        self.spool.txns_delivered(delivered)
        DELIVERED.labels("transaction").inc(len(started) + len(delivered))
        if alone:
            await self._deliver_each(alone)

    async def _complete_batch(self, rows: list[TxnRow]) -> None:
        request = transactions_pb2.BatchCompleteTransactionsRequest(
            requests=[
                transactions_pb2.CompleteTransactionRequest.FromString(row.finished or b"") for row in rows
            ]
        )
        try:
            single = rows[0].request_id if len(rows) == 1 else ""
            with delivery_span("transactions", [row.context for row in rows], len(rows), single):
                await self.transactions.BatchCompleteTransactions(
                    request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata()
                )
        except grpc.aio.AioRpcError as exc:
            # NOT_FOUND too: a start gone from the database; on its own, that record is sent whole again.
            if not (_batch_refused(exc) or exc.code() == grpc.StatusCode.NOT_FOUND):
                raise
            await self._deliver_each(rows)
            return
        self.spool.txns_delivered([row.seq for row in rows])
        DELIVERED.labels("transaction").inc(len(rows))

    async def _deliver_each(self, rows: list[TxnRow]) -> None:
        """One call per record (CreateTransaction / CompleteTransaction), setting invalid ones aside."""
        for row in rows:
            try:
                with delivery_span("transactions", [row.context], 1, row.request_id):
                    await self._deliver_txn(row)
            except Refused as refused:
                self._bury_txn(row, refused.payload, refused.details)
            except grpc.aio.AioRpcError as exc:
                if not is_permanent(exc):
                    raise
                self._bury_txn(row, row.finished or row.started or b"", str(exc.details()))
            else:
                DELIVERED.labels("transaction").inc()

    def _bury_txn(self, row: TxnRow, payload: bytes, details: str) -> None:
        log.error("transaction %s refused as invalid, kept aside: %s", row.request_id, details)
        DEAD_LETTERS.labels("transaction").inc()
        self.spool.bury("transaction", row.seq, payload, details)

    async def _deliver_txn(self, row: TxnRow) -> None:
        kw = {"timeout": CALL_TIMEOUT_SECONDS, "metadata": self._metadata()}
        if row.finished is None:
            assert row.started is not None
            await self.transactions.CreateTransaction(
                transactions_pb2.CreateTransactionRequest(transaction=Transaction.FromString(row.started)),
                **kw,
            )
            self.spool.start_delivered(row.seq)
            return
        finished = transactions_pb2.CompleteTransactionRequest.FromString(row.finished)
        if row.start_sent:
            try:
                await self.transactions.CompleteTransaction(finished, **kw)
            except grpc.aio.AioRpcError as exc:
                # NOT_FOUND: the start is gone from the database (recreated); send it all again below.
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                self.spool.txn_delivered(row.seq)
                return
        # One call for start and outcome together; if a start sent earlier got in first (its reply was
        # lost), the record comes back in progress and the outcome goes as a completion.
        merged = merge(row.started, row.request_id, finished)
        try:
            record = await self.transactions.CreateTransaction(
                transactions_pb2.CreateTransactionRequest(transaction=merged), **kw
            )
        except grpc.aio.AioRpcError as exc:
            if not is_permanent(exc) or row.started is None:
                raise
            # Refused as a whole, maybe for the outcome alone: deliver the start on its own first.
            record = await self._deliver_start_alone(row, merged)
        if record.status == Transaction.Status.STATUS_IN_PROGRESS:
            # Refused here (permanently), only the outcome goes to the dead table: the start is in.
            await self.transactions.CompleteTransaction(finished, **kw)
        self.spool.txn_delivered(row.seq)

    async def _deliver_start_alone(self, row: TxnRow, merged: Transaction) -> Transaction:
        """After a merged create was refused. If the start is refused too, raises `Refused` with the
        whole merged record, so that the dead table keeps the start and its outcome together."""
        assert row.started is not None
        try:
            record = await self.transactions.CreateTransaction(
                transactions_pb2.CreateTransactionRequest(transaction=Transaction.FromString(row.started)),
                timeout=CALL_TIMEOUT_SECONDS,
                metadata=self._metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            if not is_permanent(exc):
                raise
            raise Refused(merged.SerializeToString(), exc) from exc
        self.spool.start_delivered(row.seq)
        return record

    async def _audit_step(self) -> int:
        batch = self.spool.pending_audit(self.batch_size)
        if not batch:
            return 0
        events = [audit_pb2.AuditEvent.FromString(payload) for _, payload in batch]
        contexts = self.spool.audit_contexts([seq for seq, _ in batch]) if tracing_enabled() else []
        try:
            with delivery_span("audit", contexts, len(events)):
                await self.audit.AppendEvents(
                    audit_pb2.AppendEventsRequest(events=events),
                    timeout=CALL_TIMEOUT_SECONDS,
                    metadata=self._metadata(),
                )
        except grpc.aio.AioRpcError as exc:
            if not is_permanent(exc):
                raise
            await self._audit_one_by_one(batch, events)
            return len(batch)
        self.spool.audit_delivered(batch[-1][0])
        DELIVERED.labels("audit").inc(len(batch))
        return len(batch)

    async def _audit_one_by_one(
        self, batch: list[tuple[int, bytes]], events: list[audit_pb2.AuditEvent]
    ) -> None:
        """A batch was refused: find the invalid events, set them aside, deliver the rest."""
        for (seq, payload), event in zip(batch, events, strict=True):
            try:
                await self.audit.AppendEvents(
                    audit_pb2.AppendEventsRequest(events=[event]),
                    timeout=CALL_TIMEOUT_SECONDS,
                    metadata=self.metadata,
                )  # set-aside search: not traced
            except grpc.aio.AioRpcError as exc:
                if not is_permanent(exc):
                    raise
                log.error("audit event %s refused as invalid, kept aside: %s", event.event_id, exc.details())
                DEAD_LETTERS.labels("audit").inc()
                self.spool.bury("audit", seq, payload, str(exc.details()))
                continue
            self.spool.audit_delivered(seq, [seq])
            DELIVERED.labels("audit").inc()
