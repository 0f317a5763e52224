"""The append-only, hash-chained `audit_events` table and the single-row chain head.

Appenders serialise on the `audit_chain` row lock (SELECT ... FOR UPDATE), so concurrent appends from
many producers still form one chain with gap-free sequence numbers. Triggers refuse UPDATE, DELETE
and TRUNCATE on `audit_events` for every role; only a superuser who disables triggers (or sets
`session_replication_role = replica`) can change history, and `VerifyChain` then finds the edit.
"""

from services.common.database import Migrations

MIGRATIONS = Migrations(
    component="audit",
    steps=[
        """
        CREATE TABLE audit_events (
            sequence      bigint      PRIMARY KEY,
            event_id      text        NOT NULL UNIQUE,
            kind          text        NOT NULL,
            event_time    timestamptz NOT NULL,
            record_time   timestamptz NOT NULL,
            source        text        NOT NULL DEFAULT '',
            principal     text        NOT NULL DEFAULT '',
            service       text        NOT NULL DEFAULT '',
            method        text        NOT NULL DEFAULT '',
            resource      text        NOT NULL DEFAULT '',
            action        text        NOT NULL DEFAULT '',
            code          text        NOT NULL DEFAULT 'OK',
            message       text        NOT NULL DEFAULT '',
            latency_us    bigint,
            request_id    text        NOT NULL DEFAULT '',
            trace_id      text        NOT NULL DEFAULT '',
            peer          text        NOT NULL DEFAULT '',
            attributes    jsonb       NOT NULL DEFAULT '{}',
            previous_hash text        NOT NULL,
            hash          text        NOT NULL
        );
        CREATE INDEX audit_events_by_time ON audit_events (event_time);
        CREATE INDEX audit_events_by_principal ON audit_events (principal, sequence);
        CREATE INDEX audit_events_by_request ON audit_events (request_id);

        -- The chain head: the last sequence and hash, locked by every append.
        CREATE TABLE audit_chain (
            id            integer PRIMARY KEY CHECK (id = 1),
            last_sequence bigint  NOT NULL,
            last_hash     text    NOT NULL
        );
        INSERT INTO audit_chain VALUES (1, 0, repeat('0', 64));

        CREATE FUNCTION audit_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$;
        CREATE TRIGGER audit_events_no_update_delete BEFORE UPDATE OR DELETE ON audit_events
            FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
        CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
            FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
        REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM PUBLIC;
        """,
    ],
    drop="""
        DROP TABLE IF EXISTS audit_events;
        DROP TABLE IF EXISTS audit_chain;
        DROP FUNCTION IF EXISTS audit_events_refuse_change();
    """,
)
