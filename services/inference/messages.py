"""Conversation turns as every API sends them: roles checked and normalised, each refusal naming the
turn the way the caller wrote it (`messages[1].role`, `messages.messages[0].content`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from services.common.errors import invalid_argument
from services.inference.domain import Message

# `developer` is OpenAI's newer name for `system`; templates only know `system`.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI chat also has tool results (`tool` turns answer an assistant's tool calls).
CHAT_ROLES = {**ROLES, "tool": "tool"}

Content = TypeVar("Content")


def parse_messages(
    items: Sequence[tuple[str, Content]],
    field: str,
    content_text: Callable[[Content, str, str], str],
    roles: Mapping[str, str] = ROLES,
) -> tuple[Message, ...]:
    """(role, content) pairs -> messages; `content_text(content, its field, role)` reads a content;
    `roles`: the roles the API accepts -> the role templates are given."""
    if not items:
        raise invalid_argument(field, "must contain at least one message")
    out: list[Message] = []
    for i, (role, content) in enumerate(items):
        where = f"{field}[{i}]"
        if not role:
            raise invalid_argument(f"{where}.role", "is required")
        if role not in roles:
            raise invalid_argument(f"{where}.role", f"'{role}' is not one of {', '.join(sorted(roles))}")
        out.append(Message(roles[role], content_text(content, f"{where}.content", role)))
    return tuple(out)
