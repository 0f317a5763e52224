"""The `api_keys` table: one row per API key, holding the SHA-256 of its secret, never the secret, and
its webhook signing secret sealed with the master key (services/common/secret_box.py)."""

from services.common.database import Migrations

MIGRATIONS = Migrations(
    component="gateway",
    steps=[
        """
        CREATE TABLE api_keys (
            id                  text        PRIMARY KEY,
            display_name        text        NOT NULL,
            key_hash            text        NOT NULL UNIQUE,
            scopes              text[]      NOT NULL,
            requests_per_minute integer     NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
            tokens_per_minute   integer     NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
            max_prompt_tokens   integer     NOT NULL DEFAULT 0 CHECK (max_prompt_tokens >= 0),
            max_tokens          integer     NOT NULL DEFAULT 0 CHECK (max_tokens >= 0),
            create_time         timestamptz NOT NULL DEFAULT now(),
            expire_time         timestamptz,
            revoke_time         timestamptz,
            creator             text        NOT NULL DEFAULT ''
        );
        -- Listing walks (create_time, id) newest first.
        CREATE INDEX api_keys_by_time ON api_keys (create_time DESC, id DESC);
        """,
        # Signing needs the secret itself (HMAC), so it is encrypted, not hashed; NULL: none issued.
        "ALTER TABLE api_keys ADD COLUMN webhook_secret_sealed text",
        # The gateways' background read of what changed (gateway/key_memory.py): keys created or revoked
        # since a time, every auth.cache_seconds, without a scan of the table.
        "CREATE INDEX api_keys_by_revoke_time ON api_keys (revoke_time) WHERE revoke_time IS NOT NULL",
    ],
    drop="DROP TABLE IF EXISTS api_keys",
)
