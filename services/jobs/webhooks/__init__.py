"""Job webhooks: signed job-end events out (Standard Webhooks), delivered at least once with retries
for hours, every try visible on the job, destinations checked against SSRF. docs/webhooks.md.

What the Jobs processes call (one `JobWebhooks` per process):

    webhooks = JobWebhooks(settings)            # its own tables (component `job_webhooks`)
    await webhooks.start(deliver=True)          # deliver: run the delivery loop in this process
    runtime.on_stop.append(webhooks.stop)

    # CreateJob, when the job has a webhook (before storing it): WEBHOOK_URL_REFUSED (400, naming
    # `field`) for a URL that may not be called, WEBHOOK_SECRET_MISSING (400) when the creator key has
    # no signing secret, AUTH_UNAVAILABLE (503) when the gateway cannot say.
    await webhooks.check_webhook(job.webhook.url, creator="keys/3f9a0c12b7e4", field="job.webhook.url")

    # When a job has ended (SUCCEEDED, FAILED, CANCELLED), after its end is stored and before its
    # queue message is acknowledged. Idempotent per job: a redelivered job's second call returns the
    # first event's webhook-id. Pass `conn` to store the event in the same transaction as the job's
    # end. Returns None when the job has no webhook or has not ended.
    webhook_id = await webhooks.enqueue_job_event(job)   # job: ferry.jobs.v1.Job (name, state,
                                                         # creator, webhook.url, result/error...)

    # GetJob: every delivery try, oldest first.
    job.webhook_attempts.extend(await webhooks.attempts_for(job.name))

The event is POSTed to `job.webhook.url` with `webhook-id` (one per event, the same on every try),
`webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256>` signed with the creator key's
secret, and a body `{"type": "job.succeeded"|"job.failed"|"job.cancelled", "timestamp", "data": job}`.
"""

from __future__ import annotations

from typing import Any

import psycopg
from ferry.jobs.v1 import jobs_pb2

from services.common.config import Settings
from services.common.database import Database
from services.common.timestamps import now
from services.jobs.webhooks.delivery import Delivery, SecretSource
from services.jobs.webhooks.destinations import check_webhook_url
from services.jobs.webhooks.events import event_payload, event_type
from services.jobs.webhooks.outbox import Outbox
from services.jobs.webhooks.schema import MIGRATIONS
from services.jobs.webhooks.secrets import SigningSecrets
from services.jobs.webhooks.signing import new_webhook_id

__all__ = ["MIGRATIONS", "JobWebhooks"]


class JobWebhooks:
    def __init__(self, settings: Settings, secrets: SecretSource | None = None) -> None:
        self.settings = settings
        self.db = Database(settings, MIGRATIONS)
        self.outbox = Outbox(self.db)
        self.secrets: SecretSource = secrets or SigningSecrets(settings)
        self.delivery: Delivery | None = None

    async def start(self, *, deliver: bool = True, ready_timeout: float | None = None) -> None:
        """Opens the tables (migrated in the background; calls answer UNAVAILABLE until then) and,
        with `deliver`, starts the delivery loop. `ready_timeout`: wait that long for the tables."""
        await self.db.start()
        if ready_timeout is not None:
            await self.db.wait_ready(ready_timeout)
        if deliver:
            self.delivery = Delivery(self.settings, self.outbox, self.secrets)
            await self.delivery.start()

    async def stop(self) -> None:
        if self.delivery is not None:
            await self.delivery.stop()
        await self.db.stop()

    async def check_webhook(self, url: str, *, creator: str, field: str = "job.webhook.url") -> None:
        """Refuses, at job create, a webhook that could never be delivered (see the module's doc)."""
        await check_webhook_url(url, self.settings.webhooks, field)
        await self.secrets.secret_for(creator)

    async def enqueue_job_event(
        self, job: jobs_pb2.Job, *, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> str | None:
        """Queues the ended job's event for its webhook; its webhook-id (None: nothing to send)."""
        kind = event_type(job)
        if kind is None or not job.webhook.url:
            return None
        webhook_id = await self.outbox.add(
            webhook_id=new_webhook_id(),
            job=job.name,
            event_type=kind,
            url=job.webhook.url,
            creator=job.creator,
            payload=event_payload(job, kind, now()),
            conn=conn,
        )
        if self.delivery is not None and conn is None:
            self.delivery.wake()  # (other processes' loops hear of it through NOTIFY)
        return webhook_id

    async def attempts_for(self, job_name: str) -> list[jobs_pb2.WebhookAttempt]:
        return await self.outbox.attempts_for(job_name)
