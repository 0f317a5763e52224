"""A jobs worker (`python -m services.jobs.worker`): pulls job ids from the work-queue stream, runs each
job's generation through the Inference service, stores the result, and only then acknowledges.

- Bounded: at most `jobs.worker_concurrency` jobs at once; a message is fetched only for a free place.
- Interactive first: the generation asks for background priority; when the engine has no spare slot
  the Inference service refuses it at once (BACKGROUND_DEFERRED), the attempt does not count, and the
  worker asks again after a growing pause, keeping the message (in-progress acks).
- Durable: a worker that dies leaves its message unacknowledged, so JetStream redelivers it after the
  ack wait; the job's lease in the database lapses at about the same time and another worker takes it.
  While a job runs, its worker renews both, so a long generation is not taken twice.
- Bounded retries: each start is an attempt (`jobs.max_attempts`); a retryable failure is retried
  after a backoff, a request error (or the last attempt) ends the job FAILED with its reason.
- Cancel: CancelJob ends the job in the database and announces it; the worker cancels the gRPC call,
  which stops the generation and frees its engine slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time

import grpc
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from services.common.config import Settings, get_settings
from services.common.database import Database
from services.common.errors import Reason, error_details
from services.common.logging import configure_logging
from services.common.metrics import start_metrics_server
from services.jobs import metrics, queue
from services.jobs.domain import JobState, StoredJob
from services.jobs.generation import Generation
from services.jobs.schema import MIGRATIONS
from services.jobs.store import JobStore
from services.jobs.webhooks import JobWebhooks

log = logging.getLogger(__name__)

FETCH_WAIT_SECONDS = 5.0
MAX_BUSY_BACKOFF_SECONDS = 5.0
# A failed attempt waits base * 2^(attempt-1) (with jitter) before the next.
RETRY_BACKOFF_SECONDS = 1.0
# Failures no other attempt can change: the job fails at once.
FINAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class Deferred(Exception):
    """The engine had no spare slot: the attempt never ran."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after


class Worker:
    def __init__(
        self, settings: Settings, store: JobStore, generation: Generation, webhooks: JobWebhooks, name: str
    ) -> None:
        self.settings = settings
        self.webhooks = webhooks
        self.jobs = settings.jobs
        self.store = store
        self.generation = generation
        self.name = name
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.stopping = asyncio.Event()
        # Running jobs' generation tasks, by job id (a cancel announcement stops them).
        self.running: dict[str, asyncio.Task[object]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        self.nc = await queue.connect(self.settings, self.name)
        self.js = self.nc.jetstream()
        sub = await self._subscribe()
        await self.nc.subscribe(f"{queue.CANCEL_PREFIX}.*", cb=self._on_cancel)
        places = asyncio.Semaphore(self.jobs.worker_concurrency)
        log.info(
            "worker %s pulling %s (%d at once)",
            self.name,
            self.settings.nats.run_subject,
            self.jobs.worker_concurrency,
        )
        while not self.stopping.is_set():
            await places.acquire()
            if self.stopping.is_set():
                places.release()
                break
            try:
                messages = await sub.fetch(1, timeout=FETCH_WAIT_SECONDS)
            except (NatsTimeout, TimeoutError):
                places.release()
                continue
            except Exception as exc:  # NATS restarting: wait and fetch again
                places.release()
                log.warning("fetch failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(queue.CONNECT_RETRY_SECONDS)
                continue
            for msg in messages:
                task = asyncio.create_task(self._handle(msg))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                task.add_done_callback(lambda _t: places.release())

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        assert self.js is not None
        nats_settings = self.settings.nats
        while True:
            try:
                await queue.ensure_stream(self.js, self.settings)
                config = queue.consumer_config(
                    queue.WORKERS_CONSUMER,
                    nats_settings.run_subject,
                    self.settings,
                    # Every worker's places, and room for the ones held while deferred.
                    max_ack_pending=max(64, 4 * self.jobs.workers * self.jobs.worker_concurrency),
                )
                return await self.js.pull_subscribe(
                    nats_settings.run_subject,
                    durable=queue.WORKERS_CONSUMER,
                    stream=nats_settings.stream,
                    config=config,
                )
            except Exception as exc:  # JetStream not ready yet
                log.warning("jobs consumer not ready (%s); retrying", exc)
                await asyncio.sleep(queue.CONNECT_RETRY_SECONDS)

    async def stop(self, grace: float) -> None:
        """Stops fetching; lets running jobs finish within `grace`, then interrupts the rest (their
        messages are redelivered to another worker)."""
        self.stopping.set()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=queue.STOP_SECONDS)
        await queue.disconnect(self.nc)
        await self.generation.close()

    async def _on_cancel(self, msg: Msg) -> None:
        job_id = msg.subject.rpartition(".")[2]
        task = self.running.get(job_id)
        if task is None:
            return
        # The announcement is only a hint: the database says whether the job really was cancelled.
        job = await self.store.by_id(job_id)
        if job is not None and job.state is JobState.CANCELLED:
            log.info("job %s cancelled by its owner: stopping its generation", job_id)
            task.cancel()

    # -- one message -------------------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        job_id = msg.data.decode(errors="replace")
        try:
            await self._take(msg, job_id)
        except Exception:
            # The database or NATS failed us: leave the message for redelivery.
            log.exception("job %s: handling failed; it will be redelivered", job_id)
            with contextlib.suppress(Exception):
                await msg.nak(delay=RETRY_BACKOFF_SECONDS)

    async def _take(self, msg: Msg, job_id: str) -> None:
        busy_pause = self.jobs.busy_backoff_seconds
        while True:
            if self.stopping.is_set():
                await msg.nak()  # not started here: the next worker takes it
                return
            job = await self.store.by_id(job_id)
            if job is None or job.state.ended:
                # Cancelled while queued, or a redelivery after its end was stored: its webhook event
                # is queued again (once per job: a no-op when it was) before the message goes.
                if job is not None:
                    await self._tell_webhook(job)
                await msg.ack()
                return
            if job.attempts >= self.jobs.max_attempts:
                if (left := await self.store.lease_left(job_id)) > 0:
                    # Its last attempt still runs elsewhere (this is a duplicate message).
                    await msg.nak(delay=left + 1.0)
                    return
                # Its last attempt ended without a verdict (its worker died in it).
                reason = f"gave up after {job.attempts} attempts; the last one did not finish"
                last = f"{reason}: {job.error_message}" if job.error_message else reason
                await self._ended(await self.store.fail(job_id, None, job.error_code or "ABORTED", last))
                await msg.term()
                return
            lease = self.jobs.ack_wait_seconds
            started = await self.store.start_attempt(job_id, self.name, lease)
            if started is None:
                # Another worker's lease on it still runs (a duplicate message, or a redelivery that
                # came early): ask again once that lease could have lapsed.
                await msg.nak(delay=await self.store.lease_left(job_id) + 1.0)
                return
            try:
                await self._attempt(msg, started)
                return
            except Deferred as deferred:
                await self.store.defer(job_id, started.attempts)
                metrics.DEFERRED.inc()
                pause = max(busy_pause, min(deferred.retry_after, MAX_BUSY_BACKOFF_SECONDS))
                await self._sleep_holding(msg, pause * random.uniform(0.8, 1.2))
                busy_pause = min(busy_pause * 2, MAX_BUSY_BACKOFF_SECONDS)

    async def _attempt(self, msg: Msg, job: StoredJob) -> None:
        attempt = job.attempts
        started = time.monotonic()
        run = asyncio.create_task(self.generation.run(job))
        self.running[job.id] = run  # type: ignore[assignment]
        keeper = asyncio.create_task(self._keep(msg, job.id, run))
        metrics.RUNNING.inc()
        try:
            result = await run
        except asyncio.CancelledError:
            state = await self.store.renew_lease(job.id, 0)
            if state is JobState.CANCELLED:
                metrics.ATTEMPTS.labels("cancelled").inc()
                cancelled = await self.store.by_id(job.id)
                if cancelled is not None:
                    await self._tell_webhook(cancelled)  # CancelJob did too; once per job
                await msg.ack()
                return
            # This worker is stopping: the attempt counts; the job goes to another worker.
            metrics.ATTEMPTS.labels("interrupted").inc()
            await self.store.attempt_failed(job.id, attempt, "ABORTED", "the worker running it stopped")
            await msg.nak()
            return
        except grpc.aio.AioRpcError as err:
            await self._failed(msg, job, attempt, err)
            return
        finally:
            metrics.RUNNING.dec()
            self.running.pop(job.id, None)
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        ended = await self.store.succeed(job.id, attempt, result)
        if ended is not None:
            metrics.ATTEMPTS.labels("succeeded").inc()
            metrics.JOBS_ENDED.labels("SUCCEEDED").inc()
            metrics.RUN_SECONDS.observe(time.monotonic() - started)
            await self._ended(ended)
        await msg.ack()  # only now: the result is stored (or the job was cancelled meanwhile)

    async def _failed(self, msg: Msg, job: StoredJob, attempt: int, err: grpc.aio.AioRpcError) -> None:
        info = error_details(err).get("ErrorInfo")
        reason = getattr(info, "reason", "")
        if reason == Reason.BACKGROUND_DEFERRED:
            retry = error_details(err).get("RetryInfo")
            delay = retry.retry_delay.ToTimedelta().total_seconds() if retry is not None else 1.0  # type: ignore[attr-defined]
            raise Deferred(delay)
        code, message = err.code().name, err.details() or err.code().name
        if err.code() in FINAL_CODES or attempt >= self.jobs.max_attempts:
            metrics.ATTEMPTS.labels("failed").inc()
            metrics.JOBS_ENDED.labels("FAILED").inc()
            log.info(
                "job %s failed (attempt %d of %d): %s %s",
                job.id,
                attempt,
                self.jobs.max_attempts,
                code,
                message,
            )
            await self._ended(await self.store.fail(job.id, attempt, code, message))
            await msg.term()  # no further delivery: the job has ended
            return
        metrics.ATTEMPTS.labels("retried").inc()
        await self.store.attempt_failed(job.id, attempt, code, message)
        delay = RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
        log.info("job %s attempt %d failed (%s); retrying in %.1f s", job.id, attempt, code, delay)
        await msg.nak(delay=delay)

    async def _keep(self, msg: Msg, job_id: str, run: asyncio.Task[object]) -> None:
        """While the job runs: renews its lease and its message's ack wait, and stops the generation
        when the job was cancelled (in case the announcement was missed)."""
        every = self.jobs.ack_wait_seconds / 3
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()
            try:
                state = await self.store.renew_lease(job_id, self.jobs.ack_wait_seconds)
            except Exception:  # the database away: the next renewal tries again
                continue
            if state is JobState.CANCELLED:
                run.cancel()
                return

    async def _sleep_holding(self, msg: Msg, seconds: float) -> None:
        """Waits while keeping the message (in-progress acks), so it is not redelivered meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.jobs.ack_wait_seconds / 3))
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _ended(self, job: StoredJob | None) -> None:
        if job is None:
            return
        metrics.QUEUE_SECONDS.observe(
            max(0.0, (job.end_time - job.create_time).total_seconds()) if job.end_time else 0.0
        )
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.publish(queue.ended_subject(job.id), b"")
        await self._tell_webhook(job)

    async def _tell_webhook(self, job: StoredJob) -> None:
        """Queues the ended job's webhook event (idempotent per job), durably, before its message is
        acknowledged; the jobs service delivers it."""
        if job.webhook_url:
            await self.webhooks.enqueue_job_event(job.to_proto())


async def main(index: int) -> None:
    settings = get_settings()
    name = f"worker-{index}"
    configure_logging(f"jobs-{name}", settings.log_level, settings.log_format)
    start_metrics_server(settings.jobs.host, settings.jobs.worker_metrics_port + index)
    # The jobs service migrates (and, in development, resets) the tables; a worker only waits for them.
    db_settings = settings.model_copy(
        update={"database": settings.database.model_copy(update={"migration_mode": "create_if_not_exists"})}
    )
    db = Database(db_settings, MIGRATIONS)
    await db.start()
    webhooks = JobWebhooks(db_settings)
    await webhooks.start(deliver=False)
    worker = Worker(
        settings, JobStore(db), Generation(settings), webhooks, f"{socket.gethostname()}/{name}/{os.getpid()}"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(worker.run())
    await stop.wait()
    log.info("worker %s stopping: %d jobs running", name, len(worker.running))
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await worker.stop(settings.drain_grace_seconds)
    await webhooks.stop()
    await db.stop()


if __name__ == "__main__":
    asyncio.run(main(int(os.environ.get("FERRY_JOBS_WORKER_INDEX", "0"))))
