"""The webhook tables (component `job_webhooks`): the outbox of job-end events, every delivery try, and
the ids of ingested webhooks (replay protection)."""

from services.common.database import Migrations

MIGRATIONS = Migrations(
    component="job_webhooks",
    steps=[
        """
        CREATE TABLE job_webhook_events (
            -- The webhook-id: one per event, the same on every try (receivers dedupe on it).
            id                text        PRIMARY KEY,
            -- `jobs/{id}`: a job ends once, so it has at most one event.
            job               text        NOT NULL UNIQUE,
            event_type        text        NOT NULL,
            url               text        NOT NULL,
            -- `keys/{id}`: whose signing secret signs it.
            creator           text        NOT NULL,
            -- The exact JSON body, signed anew (fresh timestamp) on each try.
            payload           text        NOT NULL,
            state             text        NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts          integer     NOT NULL DEFAULT 0,
            create_time       timestamptz NOT NULL DEFAULT now(),
            next_attempt_time timestamptz NOT NULL DEFAULT now(),
            -- A try in progress belongs to one delivery loop until then (a crashed one's is retaken).
            lease_until       timestamptz
        );
        CREATE INDEX job_webhook_events_due ON job_webhook_events (next_attempt_time)
            WHERE state = 'pending';

        CREATE TABLE job_webhook_attempts (
            event_id     text        NOT NULL REFERENCES job_webhook_events (id) ON DELETE CASCADE,
            attempt      integer     NOT NULL,
            job          text        NOT NULL,
            attempt_time timestamptz NOT NULL,
            -- The receiver's HTTP status; 0 when it could not be reached.
            http_status  integer     NOT NULL,
            error        text        NOT NULL DEFAULT '',
            PRIMARY KEY (event_id, attempt)
        );
        CREATE INDEX job_webhook_attempts_by_job ON job_webhook_attempts (job, attempt);

        CREATE TABLE webhook_ingestions (
            source       text        NOT NULL,
            webhook_id   text        NOT NULL,
            receive_time timestamptz NOT NULL DEFAULT now(),
            -- `jobs/{id}` once the job exists.
            job          text,
            PRIMARY KEY (source, webhook_id)
        );
        CREATE INDEX webhook_ingestions_by_time ON webhook_ingestions (receive_time);
        """,
    ],
    drop="DROP TABLE IF EXISTS job_webhook_attempts, job_webhook_events, webhook_ingestions",
)
