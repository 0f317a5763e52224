"""The conversation store: the `conversations` and `conversation_messages` tables' SQL, and nothing else
touches them."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.common.database import Database
from services.conversations.domain import ConversationFields, StoredConversation, StoredMessage


def new_conversation_id() -> str:
    return f"c-{secrets.token_hex(8)}"


class ConversationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self, fields: ConversationFields, *, owner: str, request_id: str | None
    ) -> StoredConversation | None:
        """The new conversation; None when this owner's `request_id` was used already."""
        values = [
            new_conversation_id(),
            owner,
            fields.model,
            fields.system_prompt,
            fields.context_limit_tokens,
            Jsonb(dict(fields.metadata)),
            fields.title,
            fields.sampling,
            fields.constraint,
            request_id,
        ]
        return await self._conversation(
            "INSERT INTO conversations (id, owner, model, system_prompt, context_limit_tokens, metadata, "
            "title, sampling, output_constraint, request_id) "
            f"VALUES ({', '.join(['%s'] * len(values))}) ON CONFLICT DO NOTHING RETURNING *",
            *values,
        )

    async def by_id(self, conversation_id: str) -> StoredConversation | None:
        return await self._conversation("SELECT * FROM conversations WHERE id = %s", conversation_id)

    async def by_request_id(self, owner: str, request_id: str) -> StoredConversation | None:
        return await self._conversation(
            "SELECT * FROM conversations WHERE owner = %s AND request_id = %s", owner, request_id
        )

    async def page(
        self, owner: str | None, after: tuple[Any, ...] | None, limit: int
    ) -> Sequence[StoredConversation]:
        """Conversations (of `owner`, or everyone's when None), most recently updated first."""
        where, params = ["TRUE"], []
        if owner is not None:
            where.append("owner = %s")
            params.append(owner)
        if after is not None:
            where.append("(update_time, id) < (%s, %s)")
            params.extend(after)
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT * FROM conversations WHERE {' AND '.join(where)} "
                "ORDER BY update_time DESC, id DESC LIMIT %s",
                [*params, limit],
            )
            rows = await cur.fetchall()
        return [StoredConversation.from_row(row) for row in rows]

    async def delete(self, conversation_id: str) -> bool:
        async with self.db.connection() as conn, conn.cursor() as cur:
            await cur.execute("DELETE FROM conversations WHERE id = %s", [conversation_id])
            return cur.rowcount > 0

    async def messages(self, conversation_id: str) -> list[StoredMessage]:
        """Every stored message of the conversation, oldest first."""
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT * FROM conversation_messages WHERE conversation_id = %s ORDER BY id",
                [conversation_id],
            )
            rows = await cur.fetchall()
        return [StoredMessage.from_row(row) for row in rows]

    async def add_message(
        self,
        conversation_id: str,
        parent_id: int | None,
        role: str,
        content: str,
        *,
        finish_reason: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        left_out_turns: int = 0,
        request_id: str = "",
        make_current: bool = False,
        title: str = "",
    ) -> StoredMessage:
        """Stores a message; with `make_current` it becomes the conversation's current message (and
        `title` its title, when it has none yet)."""
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "INSERT INTO conversation_messages (conversation_id, parent_id, role, content, finish_reason, "
                "prompt_tokens, completion_tokens, left_out_turns, request_id) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
                [
                    conversation_id,
                    parent_id,
                    role,
                    content,
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    left_out_turns,
                    request_id,
                ],
            )
            row = await cur.fetchone()
            assert row is not None
            message = StoredMessage.from_row(row)
            if make_current:
                await cur.execute(
                    "UPDATE conversations SET current_message = %s, update_time = now(), "
                    "title = CASE WHEN title = '' THEN %s ELSE title END WHERE id = %s",
                    [message.id, title, conversation_id],
                )
        return message

    async def touch(self, conversation_id: str) -> datetime | None:
        async with self.db.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "UPDATE conversations SET update_time = now() WHERE id = %s RETURNING update_time",
                [conversation_id],
            )
            row = await cur.fetchone()
        return row[0] if row else None

    async def _conversation(self, sql: str, *params: Any) -> StoredConversation | None:
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        return StoredConversation.from_row(row) if row else None
