"""JobsService: create (idempotent by request_id, AIP-155), get, list, cancel and wait for jobs.

A key sees only its own jobs unless it has `admin`: another key's job is NOT_FOUND, as one that does
not exist, so job names leak nothing. The servicer translates; the store keeps the jobs, Dispatch puts
them on the queue, the workers (worker.py) run them.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from ferry.auth.v1 import auth_pb2
from ferry.jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.common import listing
from services.common.access import ADMIN
from services.common.auth import principal_var
from services.common.errors import Reason, invalid_argument, rpc_error
from services.common.interceptor import current_call
from services.common.names import JOB_ID, JOBS, REQUEST_ID_RULE, is_request_id, resource_id
from services.jobs.dispatch import Dispatch
from services.jobs.domain import JobSpec, JobState, StoredJob
from services.jobs.ingest import WebhookIngestion
from services.jobs.store import JobStore
from services.jobs.webhooks import JobWebhooks
from services.recording import Recorder

Job = jobs_pb2.Job
DEFAULT_WAIT_SECONDS = 30.0
MAX_WAIT_SECONDS = 300.0
# WaitJob reads the store at least this often (a missed end announcement costs at most this).
WAIT_POLL_SECONDS = 1.0
# Who creates jobs while authentication is off.
ANONYMOUS = auth_pb2.Principal(name="anonymous", scopes=[ADMIN])


class JobsServicer(jobs_pb2_grpc.JobsServiceServicer):
    def __init__(
        self, store: JobStore, dispatch: Dispatch, recorder: Recorder, webhooks: JobWebhooks | None = None
    ) -> None:
        self.store = store
        self.dispatch = dispatch
        self.recorder = recorder
        # Job webhooks (services/jobs/webhooks) and ingestion (services/jobs/ingest.py); set by the
        # process (ingestion creates jobs through `create_for`).
        self.webhooks = webhooks
        self.ingestion: WebhookIngestion | None = None

    async def CreateJob(self, request: jobs_pb2.CreateJobRequest, context: grpc.aio.ServicerContext) -> Job:
        return await self.create_for(request, _principal())

    async def create_for(self, request: jobs_pb2.CreateJobRequest, principal: auth_pb2.Principal) -> Job:
        """Creates a job on `principal`'s behalf (the caller's, or an ingested webhook's source):
        checked, stored, queued, audited; idempotent by `request_id`."""
        if not request.HasField("job"):
            raise invalid_argument("job", "is required")
        if request.request_id and not is_request_id(request.request_id):
            raise invalid_argument("request_id", f"must be {REQUEST_ID_RULE}")
        request_id = request.request_id or None
        if request_id and (first := await self._retried(request_id, principal)) is not None:
            return await self._shown(first)  # a retry: the first answer (AIP-155)
        spec = JobSpec.from_proto(request.job)
        if spec.webhook_url:
            if self.webhooks is None:
                raise invalid_argument("job.webhook", "webhooks are not available on this server")
            await self.webhooks.check_webhook(
                spec.webhook_url, creator=principal.name, field="job.webhook.url"
            )
        created = await self.store.insert(spec, principal, request_id=request_id)
        if created is None:  # lost a race to the same request's retry
            first = await self._retried(request_id or "", principal)
            if first is None:
                raise rpc_error(Reason.INTERNAL, "the job's request id is taken, yet no job has it")
            return await self._shown(first)
        await self.dispatch.publish(created.id)
        self._audit("job.create", created, kind=spec.kind, model=spec.model)
        return created.to_proto()

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> Job:
        return await self._shown(await self._visible(request.name, "name"))

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        state = JobState.from_proto(request.state, "state") if request.state else None
        creator = _owner_filter(_principal())
        page = listing.page(
            request.page_size,
            request.page_token,
            query=(JOBS, creator or "*", state or ""),
            key=("time", "text"),
        )
        jobs = await self.store.page(creator, state, page.after, page.limit)
        shown, token = page.split(jobs, lambda j: (j.create_time, j.id))
        return jobs_pb2.ListJobsResponse(jobs=[j.to_proto() for j in shown], next_page_token=token)

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> Job:
        job = await self._visible(request.name, "name")
        if job.state.ended:
            return await self._shown(job)  # ended already: unchanged
        cancelled = await self.store.cancel(job.id)
        if cancelled is None:  # it ended meanwhile
            return await self._shown(await self._visible(request.name, "name"))
        await self.dispatch.cancelled(job.id)
        await self.dispatch.ended(job.id)
        self._audit("job.cancel", cancelled, previous_state=job.state.value)
        if self.webhooks is not None:
            await self.webhooks.enqueue_job_event(cancelled.to_proto())
        return await self._shown(cancelled)

    async def WaitJob(self, request: jobs_pb2.WaitJobRequest, context: grpc.aio.ServicerContext) -> Job:
        if request.timeout_seconds < 0 or request.timeout_seconds != request.timeout_seconds:
            raise invalid_argument("timeout_seconds", "must be a number of seconds, 0 or more")
        wait = min(request.timeout_seconds or DEFAULT_WAIT_SECONDS, MAX_WAIT_SECONDS)
        remaining = context.time_remaining()
        if remaining is not None:
            # Answer before the caller's own deadline, with the job as it stands.
            wait = min(wait, max(0.0, remaining - 0.5))
        deadline = time.monotonic() + wait
        job = await self._visible(request.name, "name")
        async with self.dispatch.watch_end(job.id) as ended:
            while not job.state.ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(ended.wait(), min(left, WAIT_POLL_SECONDS))
                except TimeoutError:
                    pass
                job = await self._visible(request.name, "name")
        return await self._shown(job)

    async def IngestWebhook(
        self, request: jobs_pb2.IngestWebhookRequest, context: grpc.aio.ServicerContext
    ) -> Job:
        if self.ingestion is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "webhook ingestion is not available")
        assert self.ingestion is not None
        return await self.ingestion.ingest(request, context)

    async def _shown(self, job: StoredJob) -> Job:
        """The job as callers see it, with its webhook's delivery tries."""
        proto = job.to_proto()
        if self.webhooks is not None and job.webhook_url:
            proto.webhook_attempts.extend(await self.webhooks.attempts_for(job.name))
        return proto

    async def _retried(self, request_id: str, principal: auth_pb2.Principal) -> StoredJob | None:
        """The job this caller's create with this request id made (request ids are per creator)."""
        return await self.store.by_request_id(principal.name, request_id)

    async def _visible(self, name: str, field: str) -> StoredJob:
        job = await self.store.by_id(resource_id(name, JOBS, JOB_ID, field))
        if job is None or not _may_see(_principal(), job):
            raise rpc_error(Reason.JOB_NOT_FOUND, f"job '{name}' not found", metadata={"name": name})
        return job

    def _audit(self, action: str, job: StoredJob, **attributes: str) -> None:
        call = current_call.get()
        self.recorder.operational(
            action,
            principal=call.principal if call else job.creator,
            resource=job.name,
            request_id=call.request_id if call else "",
            attributes={"state": job.state.value, **attributes},
        )


def _principal() -> auth_pb2.Principal:
    return principal_var.get() or ANONYMOUS


def _owner_filter(principal: auth_pb2.Principal) -> str | None:
    """The creator a caller's lists are limited to; None (every job) for admin keys."""
    return None if ADMIN in principal.scopes else principal.name


def _may_see(principal: auth_pb2.Principal, job: StoredJob) -> bool:
    return ADMIN in principal.scopes or job.creator == principal.name
