"""Webhooks on the real stack (Envoy, gateway, jobs service and worker, NATS, Triton with Gemma,
PostgreSQL): jobs created over REST tell a real HTTP receiver when they end, signed with the creating
key's secret (verified with the `standardwebhooks` library), retried until it accepts, every try on
the job; a private destination is refused; a signed webhook POSTed to
/api/v1/webhooks/{source}:ingest without any API key becomes a job whose result can be read, and
bad signatures, stale timestamps and replays are refused (REST through Envoy and gRPC on the jobs
service's own port alike)."""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
import pytest
from ferry.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from google.api import httpbody_pb2
from standardwebhooks.webhooks import Webhook

from tests.stack import RunningStack, running_stack, scratch_home, stack_settings
from tests.webhooks.receiver import Receiver, running_receiver

pytestmark = pytest.mark.stack

MODEL = "gemma-3-270m"
SOURCE = "tickets"
SOURCE_SECRET = "whsec_" + base64.b64encode(b"stack-source-secret-0123456789ab").decode()
READY_TIMEOUT_SECONDS = 180.0
Job = dict[str, Any]


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


@pytest.fixture(scope="module")
def webhooks_stack(request: pytest.FixtureRequest) -> Iterator[RunningStack]:
    scratch, home = scratch_home("ferry-webhooks-")
    settings = stack_settings(
        home,
        webhooks={
            # The receiver runs on this machine: loopback is allowed explicitly (and plain http).
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "allow_http": True,
            "retry_initial_seconds": 0.5,
            "retry_multiplier": 2.0,
            "retry_for_seconds": 600.0,
            "poll_seconds": 0.2,
            "secret_cache_seconds": 0.0,
            "sources": {
                SOURCE: {
                    "secret": SOURCE_SECRET,
                    "api": "completion",
                    "model": MODEL,
                    "template": "Ticket {{ payload.id }}: {{ payload.title }}.",
                    "max_tokens": 4,
                    "tolerance_seconds": 60,
                }
            },
        },
    )
    settings.triton.load_models = [MODEL]
    with running_stack(settings, READY_TIMEOUT_SECONDS) as running:
        yield running
    if request.session.testsfailed:
        print(f"\nwebhooks stack logs kept in {settings.log_dir}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def create_job(http: httpx.Client, url: str, prompt: str = "Hello") -> Job:
    reply = http.post(
        "/api/v1/jobs",
        json={
            "request": {"completion": {"model": MODEL, "prompt": prompt, "max_tokens": 4}},
            "webhook": {"url": url},
        },
    )
    assert reply.status_code == 200, reply.text
    job: Job = reply.json()
    return job


def get_job(http: httpx.Client, name: str) -> Job:
    reply = http.get(f"/api/v1/{name}")
    assert reply.status_code == 200, reply.text
    job: Job = reply.json()
    return job


def wait_job(http: httpx.Client, name: str) -> Job:
    job: Job = {}
    for _ in range(20):  # WaitJob returns after its timeout even when the job has not ended
        reply = http.post(f"/api/v1/{name}:wait", json={"timeout_seconds": 30})
        assert reply.status_code == 200, reply.text
        job = reply.json()
        if job["state"] in ("STATE_SUCCEEDED", "STATE_FAILED", "STATE_CANCELLED"):
            return job
    raise AssertionError(f"{name} did not end: {job}")


def wait_until(check: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {what}")
        time.sleep(0.1)


def signed(
    body: bytes, *, secret: str = SOURCE_SECRET, webhook_id: str = "", at: float | None = None
) -> dict[str, str]:
    webhook_id = webhook_id or f"msg_{time.time_ns()}"
    when = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, when, body.decode()),
    }


def test_job_end_events_reach_a_real_receiver_signed_and_retried(
    webhooks_stack: RunningStack, receiver_server: Receiver
) -> None:
    key = webhooks_stack.new_key(["inference", "read"], display_name="webhook receiver")
    assert key.webhook_secret.startswith("whsec_")
    receiver_server.script["/flaky"] = [500, 500]
    with webhooks_stack.http(key.secret) as http:
        steady = create_job(http, receiver_server.url("/steady"))
        flaky = create_job(http, receiver_server.url("/flaky"))
        cancelled = create_job(http, receiver_server.url("/cancelled"), prompt="Once upon a time")
        assert http.post(f"/api/v1/{cancelled['name']}:cancel", json={}).status_code == 200
        ended = {job["name"]: wait_job(http, job["name"]) for job in (steady, flaky, cancelled)}

        wait_until(lambda: len(receiver_server.at("/steady")) == 1, "the steady receiver's event")
        wait_until(
            lambda: any(r.status == 200 for r in receiver_server.at("/flaky")), "the flaky receiver's event"
        )
        wait_until(lambda: len(receiver_server.at("/cancelled")) == 1, "the cancelled job's event")
        for path, job in (("/steady", steady), ("/flaky", flaky), ("/cancelled", cancelled)):
            arrived = receiver_server.at(path)
            payloads = [Webhook(key.webhook_secret).verify(r.body, r.headers) for r in arrived]
            state = ended[job["name"]]["state"]
            expected_type = {
                "STATE_SUCCEEDED": "job.succeeded",
                "STATE_FAILED": "job.failed",
                "STATE_CANCELLED": "job.cancelled",
            }[state]
            assert {p["type"] for p in payloads} == {expected_type}
            assert {p["data"]["name"] for p in payloads} == {job["name"]}
            assert len({r.headers["webhook-id"] for r in arrived}) == 1  # one id across retries
        assert [r.status for r in receiver_server.at("/flaky")] == [500, 500, 200]
        steady_payload = Webhook(key.webhook_secret).verify(
            receiver_server.at("/steady")[0].body, receiver_server.at("/steady")[0].headers
        )
        assert steady_payload["data"]["state"] == "STATE_SUCCEEDED"
        assert steady_payload["data"]["result"]["completion"]["choices"]

        # Every try is on the job (recorded just after the receiver answered).
        def statuses(name: str) -> list[int]:
            return [a["http_status"] for a in get_job(http, name)["webhook_attempts"]]

        wait_until(lambda: statuses(flaky["name"]) == [500, 500, 200], "the flaky job's three tries")
        wait_until(lambda: statuses(steady["name"]) == [200], "the steady job's try")
        attempts = get_job(http, flaky["name"])["webhook_attempts"]
        assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 500", ""]


def test_a_webhook_to_a_private_address_is_refused(webhooks_stack: RunningStack) -> None:
    key = webhooks_stack.new_key(["inference"], display_name="ssrf")
    with webhooks_stack.http(key.secret) as http:
        for url in (
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/hook",
            "http://[fe80::1]/hook",
        ):
            reply = http.post(
                "/api/v1/jobs",
                json={
                    "request": {"completion": {"model": MODEL, "prompt": "Hi", "max_tokens": 1}},
                    "webhook": {"url": url},
                },
            )
            assert reply.status_code == 400, reply.text
            body = reply.json()
            assert "WEBHOOK_URL_REFUSED" in json.dumps(body) and "job.webhook.url" in json.dumps(body)


def test_a_signed_webhook_becomes_a_job_without_an_api_key(webhooks_stack: RunningStack) -> None:
    path = f"/api/v1/webhooks/{SOURCE}:ingest"
    body = json.dumps({"id": 42, "title": "The printer is on fire"}).encode()
    with httpx.Client(base_url=webhooks_stack.rest, timeout=60) as anonymous:
        headers = signed(body)
        reply = anonymous.post(path, content=body, headers=headers)
        assert reply.status_code == 200, reply.text
        job = reply.json()
        assert job["creator"] == f"webhooks/{SOURCE}"
        assert job["request"]["completion"]["prompt"] == "Ticket 42: The printer is on fire."
        assert job["metadata"] == {"webhook_source": SOURCE, "webhook_id": headers["webhook-id"]}

        refusals = [
            (anonymous.post(path, content=body, headers=headers), 409),  # replayed id
            (anonymous.post(path, content=body, headers=signed(body, webhook_id=headers["webhook-id"])), 409),
            (
                anonymous.post(
                    path,
                    content=body,
                    headers=signed(body, secret="whsec_" + base64.b64encode(b"w" * 32).decode()),
                ),
                401,
            ),
            (anonymous.post(path, content=body + b" ", headers=signed(body)), 401),
            (anonymous.post(path, content=body, headers=signed(body, at=time.time() - 3600)), 401),
            (anonymous.post(path, content=body, headers={"content-type": "application/json"}), 401),
            (anonymous.post("/api/v1/webhooks/nope:ingest", content=body, headers=signed(body)), 404),
        ]
        for answer, status in refusals:
            assert answer.status_code == status, answer.text
        # A key does not replace the signature.
        with webhooks_stack.http() as admin_http:
            assert (
                admin_http.post(
                    path,
                    content=body,
                    headers=signed(body, secret="whsec_" + base64.b64encode(b"k" * 32).decode()),
                ).status_code
                == 401
            )

    with webhooks_stack.http() as admin_http:  # ingested jobs are the source's: an admin reads them
        ended = wait_job(admin_http, job["name"])
    assert ended["state"] == "STATE_SUCCEEDED", ended
    assert ended["result"]["completion"]["choices"][0]["text"] is not None
    assert ended["transaction"]


def test_direct_grpc_callers_need_the_signature_too(webhooks_stack: RunningStack) -> None:
    body = json.dumps({"id": 7, "title": "direct"}).encode()
    with grpc.insecure_channel(webhooks_stack.service_targets["jobs"]) as channel:
        jobs = jobs_pb2_grpc.JobsServiceStub(channel)
        request = jobs_pb2.IngestWebhookRequest(
            source=SOURCE, body=httpbody_pb2.HttpBody(content_type="application/json", data=body)
        )
        with pytest.raises(grpc.RpcError) as caught:
            jobs.IngestWebhook(
                request,
                metadata=tuple(signed(body, secret="whsec_" + base64.b64encode(b"z" * 32).decode()).items()),
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as caught:
            jobs.IngestWebhook(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        job = jobs.IngestWebhook(
            request,
            metadata=tuple((k, v) for k, v in signed(body).items() if k != "content-type"),
            timeout=30,
        )
        assert job.creator == f"webhooks/{SOURCE}" and job.name.startswith("jobs/")
