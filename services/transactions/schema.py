"""The `transactions` table: one row per inference request, keyed by its request id."""

from services.common.database import Migrations

STATUSES = ("IN_PROGRESS", "SUCCEEDED", "FAILED", "CANCELLED", "INCOMPLETE")

MIGRATIONS = Migrations(
    component="transactions",
    steps=[
        """
        CREATE TABLE transactions (
            request_id        text        PRIMARY KEY,
            principal         text        NOT NULL DEFAULT '',
            model             text        NOT NULL DEFAULT '',
            operation         text        NOT NULL DEFAULT '',
            prompt            text        NOT NULL DEFAULT '',
            messages          jsonb       NOT NULL DEFAULT '[]',
            parameters        jsonb       NOT NULL DEFAULT '{}',
            output            text        NOT NULL DEFAULT '',
            finish_reason     text        NOT NULL DEFAULT '',
            prompt_tokens     integer     NOT NULL DEFAULT 0,
            completion_tokens integer     NOT NULL DEFAULT 0,
            total_tokens      integer     NOT NULL DEFAULT 0,
            ttft_us           bigint,
            latency_us        bigint,
            status            text        NOT NULL
                CHECK (status IN ('IN_PROGRESS', 'SUCCEEDED', 'FAILED', 'CANCELLED', 'INCOMPLETE')),
            error_code        text        NOT NULL DEFAULT '',
            error_message     text        NOT NULL DEFAULT '',
            trace_id          text        NOT NULL DEFAULT '',
            create_time       timestamptz NOT NULL,
            complete_time     timestamptz,
            update_time       timestamptz NOT NULL DEFAULT now()
        );
        -- Listing walks (create_time, request_id) newest first; the filters narrow it.
        CREATE INDEX transactions_by_time ON transactions (create_time DESC, request_id DESC);
        CREATE INDEX transactions_by_model ON transactions (model, create_time DESC);
        CREATE INDEX transactions_by_principal ON transactions (principal, create_time DESC);
        CREATE INDEX transactions_by_status ON transactions (status, create_time DESC);
        """,
        # Answered from the response cache (services/inference/response_cache.py).
        "ALTER TABLE transactions ADD COLUMN cache_hit boolean NOT NULL DEFAULT false",
    ],
    drop="DROP TABLE IF EXISTS transactions",
)
