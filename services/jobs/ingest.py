"""IngestWebhook: a signed webhook from a configured source becomes a job (docs/webhooks.md).

The call is self-authenticated (no API key): the edge and the interceptor let it through as the
`unverified` principal, and nothing happens here until the Standard Webhooks signature over the raw
body verifies with the source's secret (`webhooks.sources.<source>.secret`). Refused, and audited:
- an unknown source: 404 WEBHOOK_SOURCE_NOT_FOUND;
- missing webhook-id/-timestamp/-signature metadata, or no matching signature: 401
  WEBHOOK_SIGNATURE_INVALID;
- a timestamp further than the source's `tolerance_seconds` from now: 401 WEBHOOK_TIMESTAMP_STALE;
- a webhook-id this source already sent (kept for twice the longest tolerance, after which its
  timestamp is stale anyway): 409 WEBHOOK_REPLAYED;
- a body that is not JSON, or that the source's template cannot render: 400 naming `body`.
Then the source's sandboxed Jinja template renders the payload into the prompt of a chat or
completion request, and the job is created on behalf of `webhooks/{source}` with request id derived
from the webhook-id (so the create itself is idempotent too), metadata `webhook_source` and
`webhook_id`. Each ingestion is an audit event `webhook.ingest` (source, webhook id, job, outcome).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from ferry.auth.v1 import auth_pb2
from ferry.jobs.v1 import jobs_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.common.access import INFERENCE
from services.common.config import Settings, WebhookSource
from services.common.database import Database
from services.common.errors import Reason, RpcError, invalid_argument, not_found, rpc_error
from services.common.interceptor import current_call
from services.jobs.webhooks import metrics
from services.recording import Recorder

log = logging.getLogger(__name__)

ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = "webhook-id", "webhook-timestamp", "webhook-signature"
# Ids are remembered this long: a replay after it carries a timestamp outside any tolerance (<= 300 s
# either side of the time it was first received).
REPLAY_WINDOW_SECONDS = 2 * 300
PRUNE_EVERY_SECONDS = 60.0
MAX_WEBHOOK_ID = 256

# Creates a job on behalf of a principal: the Jobs service's own create path (validation, store, queue).
CreateJob = Callable[[jobs_pb2.CreateJobRequest, auth_pb2.Principal], Awaitable[jobs_pb2.Job]]


def source_principal(source: str) -> str:
    return f"webhooks/{source}"


class WebhookIngestion:
    def __init__(self, settings: Settings, db: Database, create_job: CreateJob, recorder: Recorder) -> None:
        self.sources = settings.webhooks.sources
        self.db = db
        self.create_job = create_job
        self.recorder = recorder
        self.templates = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        self._pruned = 0.0

    async def ingest(
        self, request: jobs_pb2.IngestWebhookRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        headers = _webhook_headers(context.invocation_metadata())
        webhook_id = headers.get(ID_HEADER, "")[:MAX_WEBHOOK_ID]
        try:
            job = await self._ingest(request, headers)
        except RpcError as err:
            self._audit(request.source, webhook_id, "", err.code, err.message, verified=False)
            self._count(request.source, err.reason)
            raise
        self._audit(request.source, webhook_id, job.name, grpc.StatusCode.OK, "", verified=True)
        self._count(request.source, "OK")
        return job

    def _count(self, source: str, outcome: str) -> None:
        # Unknown sources are one label value: a caller cannot grow the metric without bound.
        metrics.INGESTIONS.labels(source if source in self.sources else "(unknown)", outcome).inc()

    async def _ingest(self, request: jobs_pb2.IngestWebhookRequest, headers: dict[str, str]) -> jobs_pb2.Job:
        source = self.sources.get(request.source)
        if source is None:
            raise not_found("webhook_source", request.source)
        body = bytes(request.body.data)
        webhook_id = verify(source, body, headers)
        call = current_call.get()
        if call is not None:  # who the call was, now that it proved it (its RPC audit event says so)
            call.principal = source_principal(request.source)
        await self._claim(request.source, webhook_id)
        try:
            job = await self.create_job(
                self._job_request(request.source, source, body, webhook_id),
                auth_pb2.Principal(
                    name=source_principal(request.source),
                    display_name=f"webhook source {request.source}",
                    scopes=[INFERENCE],
                ),
            )
        except BaseException:
            await self._release(request.source, webhook_id)  # nothing was created: the sender may retry
            raise
        await self._created(request.source, webhook_id, job.name)
        return job

    # -- the job ---------------------------------------------------------------------------------

    def _job_request(
        self, name: str, source: WebhookSource, body: bytes, webhook_id: str
    ) -> jobs_pb2.CreateJobRequest:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise invalid_argument("body", f"is not JSON ({exc})") from None
        try:
            prompt = self.templates.from_string(source.template).render(
                payload=payload, source=name, webhook_id=webhook_id
            )
        except TemplateError as exc:
            raise invalid_argument(
                "body", f"source {name!r}: the template cannot render it ({exc})"
            ) from None
        job = jobs_pb2.Job()
        if source.api == "chat_completion":
            chat = job.request.chat_completion
            chat.model = source.model
            if source.system:
                chat.messages.append(
                    openai_pb2.ChatCompletionMessage(role="system", content=_text(source.system))
                )
            chat.messages.append(openai_pb2.ChatCompletionMessage(role="user", content=_text(prompt)))
            chat.max_tokens = source.max_tokens
            if source.temperature is not None:
                chat.temperature = source.temperature
        else:
            completion = job.request.completion
            completion.model = source.model
            completion.prompt.CopyFrom(_text(prompt))
            completion.max_tokens = source.max_tokens
            if source.temperature is not None:
                completion.temperature = source.temperature
        job.metadata.update({"webhook_source": name, "webhook_id": webhook_id})
        digest = hashlib.sha256(f"{name}\n{webhook_id}".encode()).hexdigest()[:40]
        return jobs_pb2.CreateJobRequest(job=job, request_id=f"webhook-{digest}")

    # -- replay protection -----------------------------------------------------------------------

    async def _claim(self, source: str, webhook_id: str) -> None:
        await self._prune()
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO webhook_ingestions (source, webhook_id) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING RETURNING job",
                (source, webhook_id),
            )
            claimed = await cur.fetchone()
            if claimed is not None:
                return
            cur = await conn.execute(
                "SELECT job FROM webhook_ingestions WHERE source = %s AND webhook_id = %s",
                (source, webhook_id),
            )
            row = await cur.fetchone()
        job = row[0] if row and row[0] else ""
        raise rpc_error(
            Reason.WEBHOOK_REPLAYED,
            f"webhook {webhook_id!r} of source {source!r} was received already"
            + (f" (it created {job})" if job else "")
            + "; a replay creates nothing",
            metadata={"source": source, "webhook_id": webhook_id},
        )

    async def _created(self, source: str, webhook_id: str, job: str) -> None:
        async with self.db.connection() as conn:
            await conn.execute(
                "UPDATE webhook_ingestions SET job = %s WHERE source = %s AND webhook_id = %s",
                (job, source, webhook_id),
            )

    async def _release(self, source: str, webhook_id: str) -> None:
        try:
            async with self.db.connection() as conn:
                await conn.execute(
                    "DELETE FROM webhook_ingestions WHERE source = %s AND webhook_id = %s AND job IS NULL",
                    (source, webhook_id),
                )
        except Exception:
            log.exception(
                "could not release webhook %s of %s (the sender's retry will be refused)", webhook_id, source
            )

    async def _prune(self) -> None:
        if time.monotonic() - self._pruned < PRUNE_EVERY_SECONDS:
            return
        self._pruned = time.monotonic()
        async with self.db.connection() as conn:
            await conn.execute(
                "DELETE FROM webhook_ingestions WHERE receive_time < now() - make_interval(secs => %s)",
                (REPLAY_WINDOW_SECONDS,),
            )

    # -- audit -----------------------------------------------------------------------------------

    def _audit(
        self, source: str, webhook_id: str, job: str, code: grpc.StatusCode, message: str, *, verified: bool
    ) -> None:
        call = current_call.get()
        self.recorder.operational(
            "webhook.ingest",
            principal=source_principal(source) if verified else (call.principal if call else "unverified"),
            resource=job or f"webhooks/{source}",
            code=getattr(code_pb2, code.name, code_pb2.UNKNOWN),
            message=message,
            request_id=call.request_id if call else "",
            attributes={
                "source": source,
                "webhook_id": webhook_id,
                "client_address": call.client_address if call else "",
            },
        )


def verify(source: WebhookSource, body: bytes, headers: dict[str, str]) -> str:
    """The webhook-id of a webhook whose timestamp is within the source's tolerance and whose
    signature matches its secret; RpcError otherwise."""
    webhook_id, timestamp, signature = (
        headers.get(h, "") for h in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    )
    if not (webhook_id and timestamp and signature):
        raise _bad_signature("the webhook-id, webhook-timestamp and webhook-signature headers are required")
    if len(webhook_id) > MAX_WEBHOOK_ID:
        raise _bad_signature(f"webhook-id is longer than {MAX_WEBHOOK_ID} characters")
    try:
        sent = int(timestamp)
    except ValueError:
        raise _bad_signature("webhook-timestamp is not whole seconds since the epoch") from None
    skew = time.time() - sent
    if abs(skew) > source.tolerance_seconds:
        raise rpc_error(
            Reason.WEBHOOK_TIMESTAMP_STALE,
            f"webhook-timestamp is {abs(skew):.0f} s in the {'past' if skew > 0 else 'future'}; the source"
            f" accepts {source.tolerance_seconds} s",
            metadata={"tolerance_seconds": str(source.tolerance_seconds)},
        )
    try:
        Webhook(source.secret.get_secret_value()).verify(
            body,
            {ID_HEADER: webhook_id, TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature},
            json_parse=False,
        )
    except (WebhookVerificationError, ValueError, binascii.Error):
        # UnicodeDecodeError (a body that is not UTF-8) is a ValueError: it cannot be what was signed.
        raise _bad_signature("no signature matches the source's secret") from None
    return webhook_id


def _bad_signature(message: str) -> RpcError:
    return rpc_error(Reason.WEBHOOK_SIGNATURE_INVALID, message)


def _webhook_headers(metadata: Any) -> dict[str, str]:
    wanted = (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if key in wanted and key not in found:
            found[key] = value.decode() if isinstance(value, bytes) else str(value)
    return found


def _text(value: str) -> struct_pb2.Value:
    return struct_pb2.Value(string_value=value)
