"""The grammar store: the `grammars` table's SQL, and nothing else touches it."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from psycopg.rows import dict_row

from services.common.database import Database
from services.grammars.domain import GrammarFields, StoredGrammar

COLUMNS = "id, display_name, description, syntax, definition, creator, request_id, etag"


def new_grammar_id() -> str:
    """An id for a grammar created without one: a letter first, as `grammar_id` must be."""
    return f"g-{secrets.token_hex(6)}"


def new_etag() -> str:
    # Random rather than a counter: a grammar deleted and created again never repeats an old etag.
    return secrets.token_urlsafe(9)


class GrammarStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self, grammar_id: str, fields: GrammarFields, *, creator: str, request_id: str | None
    ) -> StoredGrammar | None:
        """The new grammar; None when the id (or the request id) is taken already (nothing changed)."""
        values = [
            grammar_id,
            fields.display_name,
            fields.description,
            fields.syntax.value,
            fields.definition,
            creator,
            request_id,
            new_etag(),
        ]
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"INSERT INTO grammars ({COLUMNS}) VALUES ({', '.join(['%s'] * len(values))}) "
                "ON CONFLICT DO NOTHING RETURNING *",
                values,
            )
            row = await cur.fetchone()
        return StoredGrammar.from_row(row) if row else None

    async def by_id(self, grammar_id: str) -> StoredGrammar | None:
        return await self._one("SELECT * FROM grammars WHERE id = %s", grammar_id)

    async def by_request_id(self, request_id: str) -> StoredGrammar | None:
        return await self._one("SELECT * FROM grammars WHERE request_id = %s", request_id)

    async def update(self, grammar_id: str, etag: str, fields: GrammarFields) -> StoredGrammar | None:
        """Writes `fields` if the row still has `etag`; None when it changed or went meanwhile."""
        return await self._one(
            "UPDATE grammars SET display_name = %s, description = %s, syntax = %s, definition = %s, "
            "etag = %s, update_time = now() WHERE id = %s AND etag = %s RETURNING *",
            fields.display_name,
            fields.description,
            fields.syntax.value,
            fields.definition,
            new_etag(),
            grammar_id,
            etag,
        )

    async def delete(self, grammar_id: str, etag: str | None) -> bool:
        """Deletes the grammar (only with this etag, when one is given); whether a row went."""
        sql = "DELETE FROM grammars WHERE id = %s"
        params: list[Any] = [grammar_id]
        if etag is not None:
            sql += " AND etag = %s"
            params.append(etag)
        async with self.db.connection() as conn, conn.cursor() as cur:
            await cur.execute(sql, params)
            return cur.rowcount > 0

    async def page(self, after: tuple[Any, ...] | None, size: int) -> Sequence[StoredGrammar]:
        """Up to `size` grammars in id order, after the id that ended the previous page."""
        where, params = ("id > %s", [after[0]]) if after else ("TRUE", [])
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(f"SELECT * FROM grammars WHERE {where} ORDER BY id LIMIT %s", [*params, size])
            rows = await cur.fetchall()
        return [StoredGrammar.from_row(row) for row in rows]

    async def _one(self, sql: str, *params: Any) -> StoredGrammar | None:
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        return StoredGrammar.from_row(row) if row else None
