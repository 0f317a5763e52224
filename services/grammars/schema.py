"""The `grammars` table: one row per stored grammar, keyed by its id (`grammars/{id}`)."""

from services.common.database import Migrations

MIGRATIONS = Migrations(
    component="grammars",
    steps=[
        """
        CREATE TABLE grammars (
            id           text        PRIMARY KEY,
            display_name text        NOT NULL DEFAULT '',
            description  text        NOT NULL DEFAULT '',
            syntax       text        NOT NULL CHECK (syntax IN ('GBNF', 'LARK')),
            definition   text        NOT NULL,
            creator      text        NOT NULL DEFAULT '',
            -- The create's client request id (AIP-155): a retried create finds its first answer.
            request_id   text        UNIQUE,
            -- Replaced by every change (AIP-154).
            etag         text        NOT NULL,
            create_time  timestamptz NOT NULL DEFAULT now(),
            update_time  timestamptz NOT NULL DEFAULT now()
        );
        """,
    ],
    drop="DROP TABLE IF EXISTS grammars",
)
