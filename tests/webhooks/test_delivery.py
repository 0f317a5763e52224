"""Webhooks out, end to end below the Jobs service: a real gateway issues each key's signing secret
(shown once, sealed in PostgreSQL), the outbox and delivery loop run on the same real PostgreSQL, and
a real HTTP receiver gets every job-end event, verified with the `standardwebhooks` library.

The Jobs service calls exactly these entry points (services/jobs/webhooks/__init__.py): check_webhook
at create, enqueue_job_event when a job ends, attempts_for in GetJob.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from ferry.jobs.v1 import jobs_pb2
from ferry.keys.v1 import keys_pb2, keys_pb2_grpc
from google.rpc import code_pb2
from prometheus_client import REGISTRY
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.common.access import UNVERIFIED_PRINCIPAL
from services.common.config import AuthSettings, GatewaySettings, Settings, WebhookSettings
from services.common.errors import RpcError
from services.jobs.webhooks import JobWebhooks
from tests.gateway.conftest import ADMIN_KEY, SERVICE_TOKEN, Gateway
from tests.gateway.test_gateway import check_request
from tests.webhooks.receiver import Receiver, eventually

ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
SERVICE = (("authorization", f"Bearer {SERVICE_TOKEN}"),)
LOOPBACK = ["127.0.0.0/8", "::1/128"]
State = jobs_pb2.Job.State


def settings_for(gateway: Gateway, home: Path, **webhooks: Any) -> Settings:
    # Fast retries for the test; the defaults are hours long (docs/webhooks.md).
    options: dict[str, Any] = {
        "allowed_networks": LOOPBACK,
        "allow_http": True,
        "retry_initial_seconds": 0.2,
        "retry_multiplier": 2.0,
        "retry_jitter": 0.1,
        "retry_for_seconds": 600.0,
        "poll_seconds": 0.2,
        "secret_cache_seconds": 0.0,
        "timeout_seconds": 5.0,
    }
    options.update(webhooks)
    return Settings(
        home=home,
        database_url=gateway.database_url,
        gateway=GatewaySettings(port=int(gateway.address.rsplit(":", 1)[1])),
        auth=AuthSettings(service_token=SecretStr(SERVICE_TOKEN)),
        webhooks=WebhookSettings(**options),
    )


@asynccontextmanager
async def job_webhooks(settings: Settings) -> AsyncIterator[JobWebhooks]:
    webhooks = JobWebhooks(settings)
    await webhooks.start(deliver=True, ready_timeout=60)
    try:
        yield webhooks
    finally:
        await webhooks.stop()


@asynccontextmanager
async def keys_stub(gateway: Gateway) -> AsyncIterator[keys_pb2_grpc.KeysServiceStub]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield keys_pb2_grpc.KeysServiceStub(channel)


async def new_key(gateway: Gateway, name: str) -> keys_pb2.Key:
    async with keys_stub(gateway) as keys:
        created: keys_pb2.Key = await keys.CreateKey(
            keys_pb2.CreateKeyRequest(key=keys_pb2.Key(display_name=name, scopes=["inference"])),
            metadata=ADMIN,
        )
    return created


def ended_job(job_id: str, state: jobs_pb2.Job.State.ValueType, url: str, creator: str) -> jobs_pb2.Job:
    job = jobs_pb2.Job(
        name=f"jobs/{job_id}", state=state, creator=creator, webhook=jobs_pb2.Webhook(url=url), attempts=1
    )
    job.request.completion.model = "gemma-3-270m"
    job.request.completion.prompt.string_value = "Once upon a time"
    if state == State.STATE_SUCCEEDED:
        job.result.completion.id = f"cmpl-{job_id}"
    elif state == State.STATE_FAILED:
        job.error_code, job.error_message = "INTERNAL", "the engine failed a generation"
    return job


def _tries(outcome: str) -> float:
    return REGISTRY.get_sample_value("ferry_webhook_delivery_tries_total", {"outcome": outcome}) or 0.0


async def _attempted(webhooks: JobWebhooks, job: str) -> bool:
    return bool(await webhooks.attempts_for(job))


async def _ended(webhooks: JobWebhooks, job: str) -> bool:
    """The job's event was delivered, or given up."""
    event = await webhooks.outbox.event_for(job)
    return event is not None and event.state != "pending"


def verified(secret: str, received: Any) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    return payload


async def test_every_job_end_event_arrives_signed(
    webhooks_gateway: Gateway, receiver: Receiver, tmp_path: Path
) -> None:
    key = await new_key(webhooks_gateway, "events")
    assert key.webhook_secret.startswith("whsec_")
    async with job_webhooks(settings_for(webhooks_gateway, tmp_path)) as webhooks:
        await webhooks.check_webhook(receiver.url("/every"), creator=key.name)
        sent: dict[str, tuple[str, str, float]] = {}  # job -> (webhook id, event type, enqueued at)
        suffix = str(time.time_ns())
        for state, kind in [
            (State.STATE_SUCCEEDED, "job.succeeded"),
            (State.STATE_FAILED, "job.failed"),
            (State.STATE_CANCELLED, "job.cancelled"),
        ]:
            job = ended_job(f"{kind.split('.')[1]}-{suffix}", state, receiver.url("/every"), key.name)
            started = time.monotonic()
            webhook_id = await webhooks.enqueue_job_event(job)
            assert webhook_id is not None and webhook_id.startswith("msg_")
            sent[job.name] = (webhook_id, kind, started)
            # A job's end is enqueued again when its worker is redelivered: still one event.
            assert await webhooks.enqueue_job_event(job) == webhook_id
        # A job that has not ended, or has no webhook, sends nothing.
        assert (
            await webhooks.enqueue_job_event(
                ended_job("x", State.STATE_RUNNING, receiver.url("/every"), key.name)
            )
            is None
        )
        assert await webhooks.enqueue_job_event(ended_job("y", State.STATE_SUCCEEDED, "", key.name)) is None

        await receiver.wait_for(lambda: len(receiver.at("/every")) >= 3)
        latencies = []
        for received in receiver.at("/every"):
            payload = verified(key.webhook_secret, received)
            name = payload["data"]["name"]
            webhook_id, kind, started = sent[name]
            assert received.headers["webhook-id"] == webhook_id
            assert received.headers["webhook-signature"].startswith("v1,")
            assert payload["type"] == kind
            assert payload["data"]["creator"] == key.name
            assert "webhook_attempts" not in payload["data"]
            latencies.append(received.monotonic - started)
            with pytest.raises(WebhookVerificationError):  # another key's secret does not verify it
                Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
                    received.body, received.headers
                )
        assert {verified(key.webhook_secret, r)["data"]["name"] for r in receiver.at("/every")} == set(sent)
        print(f"webhook delivery latency (enqueue -> received): {[round(s * 1000) for s in latencies]} ms")

        for name in sent:
            await eventually(partial(_attempted, webhooks, name))
            attempts = await webhooks.attempts_for(name)
            assert [(a.http_status, a.error) for a in attempts] == [(200, "")]
            assert attempts[0].attempt_time.seconds > 0
        assert len(receiver.at("/every")) == 3  # nothing was sent twice


async def test_a_failing_receiver_gets_the_event_on_retry_once_per_id(
    webhooks_gateway: Gateway, receiver: Receiver, tmp_path: Path
) -> None:
    key = await new_key(webhooks_gateway, "flaky")
    receiver.script["/flaky"] = [500, 500]
    retries_before = _tries("retry")
    async with job_webhooks(settings_for(webhooks_gateway, tmp_path)) as webhooks:
        job = ended_job(f"flaky-{time.time_ns()}", State.STATE_SUCCEEDED, receiver.url("/flaky"), key.name)
        webhook_id = await webhooks.enqueue_job_event(job)
        await receiver.wait_for(lambda: any(r.status == 200 for r in receiver.at("/flaky")))
        tries = receiver.at("/flaky")
        assert [r.status for r in tries] == [500, 500, 200]
        # One webhook-id across the retries (the receiver dedupes on it), each try signed anew.
        assert {r.headers["webhook-id"] for r in tries} == {webhook_id}
        for received in tries:
            assert verified(key.webhook_secret, received)["data"]["name"] == job.name
        accepted_ids = [r.headers["webhook-id"] for r in tries if r.status == 200]
        assert accepted_ids == [webhook_id]
        # Every try is visible on the job, oldest first.
        await eventually(lambda: _ended(webhooks, job.name))
        attempts = await webhooks.attempts_for(job.name)
        assert [(a.http_status, a.error) for a in attempts] == [
            (500, "HTTP 500"),
            (500, "HTTP 500"),
            (200, ""),
        ]
        assert attempts[0].attempt_time.ToDatetime() <= attempts[1].attempt_time.ToDatetime()
        event = await webhooks.outbox.event_for(job.name)
        assert event is not None and (event.state, event.attempts) == ("delivered", 3)
        assert _tries("retry") - retries_before == 2


async def test_a_receiver_that_keeps_failing_is_retried_then_given_up(
    webhooks_gateway: Gateway, receiver: Receiver, tmp_path: Path
) -> None:
    key = await new_key(webhooks_gateway, "gone")
    url = receiver.url("/gone")
    receiver.script["/gone"] = [503] * 100
    settings = settings_for(webhooks_gateway, tmp_path, retry_for_seconds=1.0)
    async with job_webhooks(settings) as webhooks:
        job = ended_job(f"gone-{time.time_ns()}", State.STATE_FAILED, url, key.name)
        await webhooks.enqueue_job_event(job)
        await eventually(lambda: _ended(webhooks, job.name))
        event = await webhooks.outbox.event_for(job.name)
        assert event is not None and event.state == "failed"
        attempts = await webhooks.attempts_for(job.name)
        assert len(attempts) == event.attempts >= 2
        assert all((a.http_status, a.error) == (503, "HTTP 503") for a in attempts)


async def test_a_private_destination_is_refused_unless_allowed(
    webhooks_gateway: Gateway, receiver: Receiver, tmp_path: Path
) -> None:
    key = await new_key(webhooks_gateway, "ssrf")
    strict = settings_for(webhooks_gateway, tmp_path, allowed_networks=[], retry_for_seconds=0.0)
    allowed = settings_for(webhooks_gateway, tmp_path)
    for url in (
        receiver.url("/private"),
        receiver.url("/private", host="localhost"),
        "http://169.254.169.254/",
    ):
        async with job_webhooks(strict) as webhooks:
            with pytest.raises(RpcError) as caught:
                await webhooks.check_webhook(url, creator=key.name)
            assert caught.value.reason == "WEBHOOK_URL_REFUSED"
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    async with job_webhooks(allowed) as webhooks:
        await webhooks.check_webhook(receiver.url("/private"), creator=key.name)

    # Checked again at delivery (a name may resolve elsewhere by then): nothing reaches the address.
    async with job_webhooks(strict) as webhooks:
        job = ended_job(
            f"rebind-{time.time_ns()}", State.STATE_SUCCEEDED, receiver.url("/private", "localhost"), key.name
        )
        await webhooks.enqueue_job_event(job)
        await eventually(lambda: _ended(webhooks, job.name))
        event = await webhooks.outbox.event_for(job.name)
        assert event is not None and event.state == "failed"
        attempts = await webhooks.attempts_for(job.name)
        assert [a.http_status for a in attempts] == [0]
        assert "destination refused" in attempts[0].error and "loopback" in attempts[0].error
    assert receiver.at("/private") == []


async def test_signing_secrets_are_shown_once_sealed_at_rest_and_rotated(
    webhooks_gateway: Gateway, receiver: Receiver, tmp_path: Path
) -> None:
    key = await new_key(webhooks_gateway, "rotate")
    async with keys_stub(webhooks_gateway) as keys:
        fetched = await keys.GetKey(keys_pb2.GetKeyRequest(name=key.name), metadata=ADMIN)
        assert not fetched.HasField("webhook_secret")  # shown once
        listed = await keys.ListKeys(keys_pb2.ListKeysRequest(page_size=1000), metadata=ADMIN)
        assert all(not k.HasField("webhook_secret") for k in listed.keys)
        # Only ferry's own processes read a secret back, and only the gateway can open it.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await keys.GetWebhookSecret(keys_pb2.GetWebhookSecretRequest(name=key.name), metadata=ADMIN)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        got = await keys.GetWebhookSecret(keys_pb2.GetWebhookSecretRequest(name=key.name), metadata=SERVICE)
        assert got.secret == key.webhook_secret
        rotated = await keys.RotateWebhookSecret(
            keys_pb2.RotateWebhookSecretRequest(name=key.name), metadata=ADMIN
        )
        assert rotated.webhook_secret.startswith("whsec_") and rotated.webhook_secret != key.webhook_secret
        assert not rotated.HasField("secret")

    key_id = key.name.split("/", 1)[1]
    with psycopg.connect(webhooks_gateway.database_url) as conn:
        row = conn.execute("SELECT webhook_secret_sealed FROM api_keys WHERE id = %s", (key_id,)).fetchone()
    assert row is not None and row[0].startswith("v1.")
    for secret in (key.webhook_secret, rotated.webhook_secret):
        assert secret not in row[0] and secret.removeprefix("whsec_") not in row[0]

    async with job_webhooks(settings_for(webhooks_gateway, tmp_path)) as webhooks:
        job = ended_job(
            f"rotated-{time.time_ns()}", State.STATE_SUCCEEDED, receiver.url("/rotated"), key.name
        )
        await webhooks.enqueue_job_event(job)
        await receiver.wait_for(lambda: len(receiver.at("/rotated")) == 1)
        received = receiver.at("/rotated")[0]
        assert verified(rotated.webhook_secret, received)["data"]["name"] == job.name
        with pytest.raises(WebhookVerificationError):
            verified(key.webhook_secret, received)


async def test_a_key_without_a_signing_secret_cannot_ask_for_webhooks(
    webhooks_gateway: Gateway, receiver: Receiver, tmp_path: Path
) -> None:
    # The bootstrap admin key was made from the settings, so no secret was ever shown for it.
    async with keys_stub(webhooks_gateway) as keys:
        listed = await keys.ListKeys(keys_pb2.ListKeysRequest(page_size=1000), metadata=ADMIN)
        bootstrap = next(k for k in listed.keys if k.creator == "bootstrap")
    async with job_webhooks(settings_for(webhooks_gateway, tmp_path)) as webhooks:
        for creator in (bootstrap.name, "webhooks/github", ""):
            with pytest.raises(RpcError) as caught:
                await webhooks.check_webhook(receiver.url("/none"), creator=creator)
            assert caught.value.reason == "WEBHOOK_SECRET_MISSING"
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_edge_lets_a_signed_webhook_in_without_a_key(webhooks_gateway: Gateway) -> None:
    ingest = "/ferry.jobs.v1.JobsService/IngestWebhook"
    async with grpc.aio.insecure_channel(webhooks_gateway.address) as channel:
        check = external_auth_pb2_grpc.AuthorizationStub(channel)
        allowed = await check.Check(check_request(ingest), metadata=SERVICE)
        assert allowed.status.code == code_pb2.OK
        # No principal is forwarded: the Jobs service sees the call as unverified until the signature
        # checks out (services/jobs/ingest.py), and refuses it otherwise.
        assert [h.header.key for h in allowed.ok_response.headers] == []
        with_key = await check.Check(check_request(ingest, "fry_not_a_key"), metadata=SERVICE)
        assert with_key.status.code == code_pb2.OK  # a key is not looked at (it grants nothing here)
        denied = await check.Check(check_request("/ferry.jobs.v1.JobsService/CreateJob"), metadata=SERVICE)
        assert denied.status.code == code_pb2.UNAUTHENTICATED
        assert json.loads(denied.denied_response.body)["error"]["message"]
    assert UNVERIFIED_PRINCIPAL == "unverified"


async def test_an_event_queued_by_another_process_wakes_the_delivery_loop(
    webhooks_gateway: Gateway, receiver: Receiver, tmp_path: Path
) -> None:
    # A worker queues the event (deliver=False); the jobs service's loop, polling only hourly here,
    # hears of it through PostgreSQL NOTIFY.
    key = await new_key(webhooks_gateway, "notify")
    async with job_webhooks(settings_for(webhooks_gateway, tmp_path, poll_seconds=3600.0)) as delivering:
        await eventually(lambda: _listening(delivering))
        worker = JobWebhooks(settings_for(webhooks_gateway, tmp_path))
        await worker.start(deliver=False, ready_timeout=60)
        try:
            latencies = []
            for n in range(3):
                job = ended_job(
                    f"notify-{n}-{time.time_ns()}", State.STATE_SUCCEEDED, receiver.url("/notify"), key.name
                )
                started = time.monotonic()
                await worker.enqueue_job_event(job)
                await receiver.wait_for(partial(_arrived, receiver, "/notify", n + 1), timeout=30)
                latencies.append(receiver.at("/notify")[-1].monotonic - started)
                assert verified(key.webhook_secret, receiver.at("/notify")[-1])["data"]["name"] == job.name
            print(f"webhook delivery latency from another process: {[round(s * 1000) for s in latencies]} ms")
        finally:
            await worker.stop()


def _arrived(receiver: Receiver, path: str, count: int) -> bool:
    return len(receiver.at(path)) == count


async def _listening(webhooks: JobWebhooks) -> bool:
    """The delivery loop has its LISTEN connection (a first NOTIFY would otherwise go unheard until
    the next poll)."""
    async with webhooks.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%'")
        row = await cur.fetchone()
    return bool(row and row[0])
