"""The jobs tables: `jobs` (one row per job: what it asks, whose it is, where it stands), `job_results`
(at most one answer per job) and `job_attempts` (every start of a job by a worker)."""

from services.common.database import Migrations

STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")

MIGRATIONS = Migrations(
    component="jobs",
    steps=[
        """
        CREATE TABLE jobs (
            id            text        PRIMARY KEY,
            -- The create's client request id (AIP-155): a retried create finds its first answer
            -- (unique per creator since step 2).
            request_id    text        UNIQUE,
            -- `keys/{id}` (or `webhooks/{source}`): whose job it is; reads by others are NOT_FOUND.
            creator       text        NOT NULL,
            -- The creator's Principal (ferry.auth.v1.Principal, no secret): the worker runs the job on
            -- its behalf, with its scopes and limits as they were at create.
            principal     bytea       NOT NULL,
            -- The JobRequest as received (protobuf).
            request       bytea       NOT NULL,
            kind          text        NOT NULL
                CHECK (kind IN ('chat_completion', 'completion', 'generate')),
            model         text        NOT NULL,
            metadata      jsonb       NOT NULL DEFAULT '{}',
            webhook_url   text        NOT NULL DEFAULT '',
            state         text        NOT NULL
                CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
            attempts      integer     NOT NULL DEFAULT 0,
            error_code    text        NOT NULL DEFAULT '',
            error_message text        NOT NULL DEFAULT '',
            -- Its queue message went out (an outbox: a job stored while NATS was away is published later).
            published     boolean     NOT NULL DEFAULT false,
            -- A running job belongs to its worker until then (renewed while it runs).
            lease_until   timestamptz,
            create_time   timestamptz NOT NULL DEFAULT now(),
            start_time    timestamptz,
            end_time      timestamptz,
            update_time   timestamptz NOT NULL DEFAULT now()
        );
        -- Listing walks (create_time, id) newest first, per creator or for everyone (admin).
        CREATE INDEX jobs_by_creator ON jobs (creator, create_time DESC, id DESC);
        CREATE INDEX jobs_by_time ON jobs (create_time DESC, id DESC);
        CREATE INDEX jobs_unpublished ON jobs (create_time) WHERE NOT published;

        CREATE TABLE job_results (
            job_id      text        PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
            -- The JobResult (protobuf): the answer of the kind the request asked for.
            result      bytea       NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE job_attempts (
            job_id        text        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            attempt       integer     NOT NULL,
            worker        text        NOT NULL DEFAULT '',
            start_time    timestamptz NOT NULL DEFAULT now(),
            end_time      timestamptz,
            error_code    text        NOT NULL DEFAULT '',
            error_message text        NOT NULL DEFAULT '',
            PRIMARY KEY (job_id, attempt)
        );
        """,
        # Request ids are each creator's own: two keys using the same one make two jobs.
        """
        ALTER TABLE jobs DROP CONSTRAINT jobs_request_id_key;
        ALTER TABLE jobs ADD CONSTRAINT jobs_creator_request_id_key UNIQUE (creator, request_id);
        """,
    ],
    drop="DROP TABLE IF EXISTS job_attempts, job_results, jobs",
)
