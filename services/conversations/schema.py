"""The conversations service's tables: `conversations` (one row per chat) and `conversation_messages`
(every message ever stored, each with its parent: edits and regenerations add siblings, nothing is
overwritten)."""

from services.common.database import Migrations

MIGRATIONS = Migrations(
    component="conversations",
    steps=[
        """
        CREATE TABLE conversations (
            id                   text        PRIMARY KEY,
            owner                text        NOT NULL,
            model                text        NOT NULL,
            system_prompt        text        NOT NULL DEFAULT '',
            context_limit_tokens integer     NOT NULL DEFAULT 0,
            metadata             jsonb       NOT NULL DEFAULT '{}',
            title                text        NOT NULL DEFAULT '',
            -- ferry.inference.v1 SamplingParams / OutputConstraint, serialized (NULL: none).
            sampling             bytea,
            output_constraint    bytea,
            -- The leaf of the branch the next turn continues.
            current_message      bigint,
            -- The create's client request id (AIP-155), unique per owner.
            request_id           text,
            create_time          timestamptz NOT NULL DEFAULT now(),
            update_time          timestamptz NOT NULL DEFAULT now(),
            UNIQUE (owner, request_id)
        );
        CREATE INDEX conversations_by_owner ON conversations (owner, update_time DESC, id);
        CREATE TABLE conversation_messages (
            id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            conversation_id   text        NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            parent_id         bigint      REFERENCES conversation_messages (id) ON DELETE CASCADE,
            role              text        NOT NULL CHECK (role IN ('user', 'assistant')),
            content           text        NOT NULL,
            finish_reason     integer     NOT NULL DEFAULT 0,
            prompt_tokens     integer     NOT NULL DEFAULT 0,
            completion_tokens integer     NOT NULL DEFAULT 0,
            left_out_turns    integer     NOT NULL DEFAULT 0,
            request_id        text        NOT NULL DEFAULT '',
            create_time       timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX conversation_messages_by_conversation ON conversation_messages (conversation_id, id);
        """,
    ],
    drop="DROP TABLE IF EXISTS conversation_messages; DROP TABLE IF EXISTS conversations",
)
