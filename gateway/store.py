"""The key store: API keys in PostgreSQL (`api_keys`), looked up by the hash of their secret."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ferry.auth.v1 import auth_pb2
from ferry.keys.v1 import keys_pb2
from psycopg.rows import dict_row

from services.common.database import Database
from services.common.timestamps import now, to_timestamp

Key = keys_pb2.Key
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_prompt_tokens", "max_tokens")
COLUMNS = (
    "id, display_name, key_hash, scopes, requests_per_minute, tokens_per_minute, max_prompt_tokens, "
    "max_tokens, create_time, expire_time, revoke_time, creator"
)
# Keys that still work: what ListKeys shows unless asked for inactive ones too.
ACTIVE = "revoke_time IS NULL AND (expire_time IS NULL OR expire_time > now())"


def new_key_id() -> str:
    """Short, random, and safe in a resource name (`keys/3f9a0c12b7e4`)."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class KeyRecord:
    """One row of `api_keys`."""

    id: str
    display_name: str
    key_hash: str = field(repr=False)
    scopes: tuple[str, ...]
    limits: auth_pb2.Limits
    create_time: datetime
    expire_time: datetime | None
    revoke_time: datetime | None
    creator: str

    @property
    def name(self) -> str:
        return f"keys/{self.id}"

    def state(self, at: datetime | None = None) -> Key.State.ValueType:
        when = at or now()
        if self.revoke_time is not None:
            return Key.State.STATE_REVOKED
        if self.expire_time is not None and self.expire_time <= when:
            return Key.State.STATE_EXPIRED
        return Key.State.STATE_ACTIVE

    def to_proto(self) -> keys_pb2.Key:
        key = Key(
            name=self.name,
            display_name=self.display_name,
            scopes=list(self.scopes),
            limits=self.limits,
            state=self.state(),
            create_time=to_timestamp(self.create_time),
            creator=self.creator,
        )
        if self.expire_time is not None:
            key.expire_time.CopyFrom(to_timestamp(self.expire_time))
        if self.revoke_time is not None:
            key.revoke_time.CopyFrom(to_timestamp(self.revoke_time))
        return key

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> KeyRecord:
        return cls(
            id=row["id"],
            display_name=row["display_name"],
            key_hash=row["key_hash"],
            scopes=tuple(row["scopes"]),
            limits=auth_pb2.Limits(**{name: row[name] for name in LIMIT_FIELDS}),
            create_time=row["create_time"],
            expire_time=row["expire_time"],
            revoke_time=row["revoke_time"],
            creator=row["creator"],
        )


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self,
        *,
        display_name: str,
        key_hash: str,
        scopes: list[str],
        limits: auth_pb2.Limits,
        expire_time: datetime | None,
        creator: str,
    ) -> KeyRecord | None:
        """The new key; None when a key with this hash exists already (left as it is)."""
        values = [
            new_key_id(),
            display_name,
            key_hash,
            scopes,
            *(getattr(limits, name) for name in LIMIT_FIELDS),
            now(),
            expire_time,
            None,
            creator,
        ]
        placeholders = ", ".join(["%s"] * len(values))
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"INSERT INTO api_keys ({COLUMNS}) VALUES ({placeholders}) "
                "ON CONFLICT (key_hash) DO NOTHING RETURNING *",
                values,
            )
            row = await cur.fetchone()
        return KeyRecord.from_row(row) if row else None

    async def set_webhook_secret(self, key_id: str, sealed: str) -> KeyRecord | None:
        """Replaces the key's sealed webhook signing secret; None if the key is unknown."""
        return await self._one(
            "UPDATE api_keys SET webhook_secret_sealed = %s WHERE id = %s RETURNING *", sealed, key_id
        )

    async def webhook_secret(self, key_id: str) -> tuple[KeyRecord, str | None] | None:
        """The key and its sealed webhook signing secret (None: none issued); None if unknown."""
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM api_keys WHERE id = %s", (key_id,))
            row = await cur.fetchone()
        return (KeyRecord.from_row(row), row["webhook_secret_sealed"]) if row else None

    async def by_hash(self, key_hash: str) -> KeyRecord | None:
        return await self._one("SELECT * FROM api_keys WHERE key_hash = %s", key_hash)

    async def by_id(self, key_id: str) -> KeyRecord | None:
        return await self._one("SELECT * FROM api_keys WHERE id = %s", key_id)

    async def changed_since(self, since: datetime, limit: int) -> list[KeyRecord]:
        """Up to `limit` keys created or revoked at `since` or later, newest first."""
        return await self._many(
            "SELECT * FROM api_keys WHERE create_time >= %s OR revoke_time >= %s "
            "ORDER BY create_time DESC, id DESC LIMIT %s",
            since,
            since,
            limit,
        )

    async def revoke(self, key_id: str) -> tuple[KeyRecord, bool] | None:
        """Sets revoke_time once (a second revocation keeps the first time): the key, and whether this
        call revoked it; None if unknown."""
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            # now() is this statement's transaction time: equal only when this UPDATE set it.
            await cur.execute(
                "UPDATE api_keys SET revoke_time = coalesce(revoke_time, now()) WHERE id = %s "
                "RETURNING *, revoke_time = now() AS revoked_now",
                (key_id,),
            )
            row = await cur.fetchone()
        return (KeyRecord.from_row(row), bool(row["revoked_now"])) if row else None

    async def page(self, *, show_inactive: bool, after: tuple[Any, ...] | None, size: int) -> list[KeyRecord]:
        """Up to `size` keys, newest first, after the (create_time, id) of the previous page's last."""
        where = "TRUE" if show_inactive else ACTIVE
        params: list[Any] = []
        if after is not None:
            where += " AND (create_time, id) < (%s, %s)"
            params += list(after)
        return await self._many(
            f"SELECT * FROM api_keys WHERE {where} ORDER BY create_time DESC, id DESC LIMIT %s", *params, size
        )

    async def _one(self, sql: str, *params: Any) -> KeyRecord | None:
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            row = await cur.fetchone()
        return KeyRecord.from_row(row) if row else None

    async def _many(self, sql: str, *params: Any) -> list[KeyRecord]:
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        return [KeyRecord.from_row(row) for row in rows]
