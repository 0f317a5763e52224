"""Webhooks in (services/jobs/ingest.py) on a real PostgreSQL: what is refused (wrong signature, stale
or future timestamp, replayed id, unknown source, unrenderable payload) and, for a valid webhook,
the job request handed to the Jobs service's create path (recorded here: the Jobs service itself is
test_ingest_stack.py's), plus the audit events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from ferry.auth.v1 import auth_pb2
from ferry.jobs.v1 import jobs_pb2
from google.api import httpbody_pb2
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

from services.common.config import Settings, WebhookSettings, WebhookSource
from services.common.errors import Reason, RpcError, rpc_error
from services.jobs.ingest import WebhookIngestion
from services.jobs.webhooks import JobWebhooks
from services.recording import Recorder

SECRET = "whsec_" + base64.b64encode(b"ingest-test-secret-0123456789abc").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"not-the-source-secret-0123456789").decode()
SOURCES = {
    "github": WebhookSource(
        secret=SecretStr(SECRET),
        model="gemma-3-270m",
        template="Summarise the issue {{ payload.issue.title }} ({{ source }}, {{ webhook_id }})",
        system="You are terse.",
        max_tokens=32,
        tolerance_seconds=120,
    ),
    "plain": WebhookSource(
        secret=SecretStr(SECRET), api="completion", model="gemma-3-270m", template="{{ payload.text }}"
    ),
}


class Context:
    """What the servicer's context offers ingestion: the request's metadata."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.headers.items())


class JobsDouble:
    """The Jobs service's create path as ingestion calls it; can be told to fail once."""

    def __init__(self) -> None:
        self.created: list[tuple[jobs_pb2.CreateJobRequest, auth_pb2.Principal]] = []
        self.fail_next: RpcError | None = None

    async def create(self, request: jobs_pb2.CreateJobRequest, principal: auth_pb2.Principal) -> jobs_pb2.Job:
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        self.created.append((request, principal))
        job = jobs_pb2.Job(name=f"jobs/j{len(self.created)}", creator=principal.name)
        job.request.CopyFrom(request.job.request)
        return job


def signed(
    body: bytes, *, secret: str = SECRET, webhook_id: str = "", at: float | None = None
) -> dict[str, str]:
    webhook_id = webhook_id or f"msg_{time.time_ns()}"
    when = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, when, body.decode()),
    }


def request(source: str, body: bytes) -> jobs_pb2.IngestWebhookRequest:
    return jobs_pb2.IngestWebhookRequest(
        source=source, body=httpbody_pb2.HttpBody(content_type="application/json", data=body)
    )


@pytest.fixture
async def ingestion(
    webhooks_postgres_url: str, tmp_path: Path
) -> AsyncIterator[tuple[WebhookIngestion, JobsDouble, Path]]:
    settings = Settings(
        home=tmp_path, database_url=webhooks_postgres_url, webhooks=WebhookSettings(sources=SOURCES)
    )
    webhooks = JobWebhooks(settings)
    await webhooks.start(deliver=False, ready_timeout=60)
    # Nothing listens at the audit address: events stay in the spool, where the test reads them.
    recorder = Recorder(settings, "jobs", audit_address="127.0.0.1:1", transactions_address="127.0.0.1:1")
    await recorder.start()
    jobs = JobsDouble()
    try:
        yield WebhookIngestion(settings, webhooks.db, jobs.create, recorder), jobs, settings.spool_dir
    finally:
        await recorder.stop()
        await webhooks.stop()


async def refused(ingestion: WebhookIngestion, source: str, body: bytes, headers: dict[str, str]) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await ingestion.ingest(request(source, body), Context(headers))  # type: ignore[arg-type]
    return caught.value


async def test_a_valid_webhook_becomes_a_job_once(
    ingestion: tuple[WebhookIngestion, JobsDouble, Path],
) -> None:
    ingest, jobs, spool = ingestion
    body = json.dumps({"issue": {"title": "Crash on start"}}).encode()
    headers = signed(body, webhook_id="msg_valid_1")
    job = await ingest.ingest(request("github", body), Context(headers))  # type: ignore[arg-type]
    assert job.name == "jobs/j1" and job.creator == "webhooks/github"
    [(create, principal)] = jobs.created
    chat = create.job.request.chat_completion
    assert chat.model == "gemma-3-270m" and chat.max_tokens == 32
    assert [(m.role, m.content.string_value) for m in chat.messages] == [
        ("system", "You are terse."),
        ("user", "Summarise the issue Crash on start (github, msg_valid_1)"),
    ]
    assert dict(create.job.metadata) == {"webhook_source": "github", "webhook_id": "msg_valid_1"}
    assert create.request_id.startswith("webhook-")  # the create is idempotent on the webhook too
    assert principal.name == "webhooks/github" and list(principal.scopes) == ["inference"]

    # The same webhook again (a replay, or a sender's retry of one that was answered): refused.
    err = await refused(ingest, "github", body, headers)
    assert (err.code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, Reason.WEBHOOK_REPLAYED)
    assert "jobs/j1" in err.message
    # Re-signed with a fresh timestamp but the same id: still the same event, still refused.
    err = await refused(ingest, "github", body, signed(body, webhook_id="msg_valid_1"))
    assert err.reason == Reason.WEBHOOK_REPLAYED
    assert len(jobs.created) == 1

    completion = await ingest.ingest(
        request("plain", b'{"text": "Once upon a time"}'),
        Context(signed(b'{"text": "Once upon a time"}')),  # type: ignore[arg-type]
    )
    assert completion.request.completion.prompt.string_value == "Once upon a time"

    await asyncio.sleep(0.2)
    spooled = b"".join(p.read_bytes() for p in spool.glob("jobs.db*"))
    assert spooled.count(b"webhook.ingest") >= 4 and b"msg_valid_1" in spooled
    assert SECRET.encode() not in spooled


async def test_bad_signatures_and_timestamps_are_refused(
    ingestion: tuple[WebhookIngestion, JobsDouble, Path],
) -> None:
    ingest, jobs, _ = ingestion
    body = b'{"issue": {"title": "x"}}'
    cases = [
        (signed(body, secret=OTHER_SECRET), Reason.WEBHOOK_SIGNATURE_INVALID),
        ({**signed(body), "webhook-signature": "v1,AAAA"}, Reason.WEBHOOK_SIGNATURE_INVALID),
        ({**signed(body), "webhook-signature": "garbage"}, Reason.WEBHOOK_SIGNATURE_INVALID),
        (
            {k: v for k, v in signed(body).items() if k != "webhook-signature"},
            Reason.WEBHOOK_SIGNATURE_INVALID,
        ),
        ({**signed(body), "webhook-timestamp": "yesterday"}, Reason.WEBHOOK_SIGNATURE_INVALID),
        (signed(body, at=time.time() - 121), Reason.WEBHOOK_TIMESTAMP_STALE),  # tolerance 120 s
        (signed(body, at=time.time() + 121), Reason.WEBHOOK_TIMESTAMP_STALE),
        ({}, Reason.WEBHOOK_SIGNATURE_INVALID),
    ]
    for headers, reason in cases:
        err = await refused(ingest, "github", body, headers)
        assert (err.code, err.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), headers
    # The body signed is the body verified: one changed byte fails.
    headers = signed(body)
    err = await refused(ingest, "github", body.replace(b"x", b"y"), headers)
    assert err.reason == Reason.WEBHOOK_SIGNATURE_INVALID
    # A source's secret does not open another source's webhooks, and unknown sources are 404.
    err = await refused(ingest, "nope", body, signed(body))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, Reason.WEBHOOK_SOURCE_NOT_FOUND)
    assert jobs.created == []
    # A refused webhook leaves its id unused: signed correctly, it is then accepted.
    await ingest.ingest(request("github", body), Context(signed(body, webhook_id=headers["webhook-id"])))  # type: ignore[arg-type]
    assert len(jobs.created) == 1


async def test_a_payload_the_template_cannot_render_is_refused_and_frees_its_id(
    ingestion: tuple[WebhookIngestion, JobsDouble, Path],
) -> None:
    ingest, jobs, _ = ingestion
    for body in (b'{"no_issue": 1}', b"not json"):
        err = await refused(ingest, "github", body, signed(body, webhook_id=f"msg_bad_{len(body)}"))
        assert (err.code, err.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "body")
    escape = WebhookSource(secret=SecretStr(SECRET), model="m", template="{{ payload.__class__.__mro__ }}")
    ingest.sources = {**ingest.sources, "escape": escape}
    err = await refused(ingest, "escape", b"{}", signed(b"{}"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT  # the sandbox refuses it
    assert jobs.created == []


async def test_a_job_that_could_not_be_created_leaves_the_id_for_the_senders_retry(
    ingestion: tuple[WebhookIngestion, JobsDouble, Path],
) -> None:
    ingest, jobs, _ = ingestion
    body = b'{"issue": {"title": "retry me"}}'
    jobs.fail_next = rpc_error(Reason.DATABASE_UNAVAILABLE, "database unavailable")
    err = await refused(ingest, "github", body, signed(body, webhook_id="msg_retry"))
    assert err.code == grpc.StatusCode.UNAVAILABLE
    job = await ingest.ingest(request("github", body), Context(signed(body, webhook_id="msg_retry")))  # type: ignore[arg-type]
    assert job.name == "jobs/j1"
