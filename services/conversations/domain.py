"""A conversation and its messages as the service sees them: the writable fields of a create (checked
from the wire), the rows they are kept as, and their protos."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ferry.conversations.v1 import conversations_pb2
from ferry.inference.v1 import inference_pb2

from services.common.database import nul_free
from services.common.errors import invalid_argument
from services.common.timestamps import to_timestamp

ConversationProto = conversations_pb2.Conversation
MessageProto = conversations_pb2.Message
CONVERSATIONS = "conversations"
MESSAGES = "messages"
# `conversations/{conversation}`: ferry makes the ids (a letter, then hex).
CONVERSATION_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
MESSAGE_NAME = re.compile(r"^conversations/([a-z][a-z0-9-]{0,62})/messages/([0-9]{1,18})\Z")
MAX_SYSTEM_PROMPT = 64 * 1024
MAX_CONTENT = 256 * 1024
MAX_TITLE = 200
MAX_METADATA = 16
MAX_METADATA_KEY = 63
MAX_METADATA_VALUE = 256
TITLE_FROM_MESSAGE = 60
ROLES = {"user": MessageProto.Role.ROLE_USER, "assistant": MessageProto.Role.ROLE_ASSISTANT}


def conversation_name(conversation_id: str) -> str:
    return f"{CONVERSATIONS}/{conversation_id}"


def message_name(conversation_id: str, message_id: int) -> str:
    return f"{CONVERSATIONS}/{conversation_id}/{MESSAGES}/{message_id}"


def parse_message_name(name: str, field: str) -> tuple[str, int]:
    """`conversations/{c}/messages/{m}` -> (c, m); INVALID_ARGUMENT naming `field` otherwise."""
    match = MESSAGE_NAME.match(name)
    if not match:
        raise invalid_argument(
            field, f"'{name}' is not a name of the form conversations/{{conversation}}/messages/{{message}}"
        )
    return match.group(1), int(match.group(2))


def content_text(value: str, field: str) -> str:
    if not value.strip():
        raise invalid_argument(field, "must not be empty")
    if len(value) > MAX_CONTENT:
        raise invalid_argument(field, f"must be at most {MAX_CONTENT} characters")
    return str(nul_free(value))


@dataclass(frozen=True)
class ConversationFields:
    """What a create may set."""

    model: str
    system_prompt: str
    context_limit_tokens: int
    metadata: Mapping[str, str]
    title: str
    sampling: bytes | None
    constraint: bytes | None

    @classmethod
    def from_proto(cls, conversation: ConversationProto, prefix: str = "conversation") -> ConversationFields:
        if not conversation.model:
            raise invalid_argument(f"{prefix}.model", "is required (models/{model} or the model's id)")
        if len(conversation.system_prompt) > MAX_SYSTEM_PROMPT:
            raise invalid_argument(
                f"{prefix}.system_prompt", f"must be at most {MAX_SYSTEM_PROMPT} characters"
            )
        if conversation.context_limit_tokens < 0:
            raise invalid_argument(f"{prefix}.context_limit_tokens", "must not be negative")
        if len(conversation.title) > MAX_TITLE:
            raise invalid_argument(f"{prefix}.title", f"must be at most {MAX_TITLE} characters")
        metadata = dict(conversation.metadata)
        if len(metadata) > MAX_METADATA:
            raise invalid_argument(f"{prefix}.metadata", f"must hold at most {MAX_METADATA} pairs")
        for key, value in metadata.items():
            if not key or len(key) > MAX_METADATA_KEY:
                raise invalid_argument(f"{prefix}.metadata", f"keys must be 1-{MAX_METADATA_KEY} characters")
            if len(value) > MAX_METADATA_VALUE:
                raise invalid_argument(
                    f"{prefix}.metadata[{key}]", f"must be at most {MAX_METADATA_VALUE} characters"
                )
        return cls(
            model=conversation.model,
            system_prompt=str(nul_free(conversation.system_prompt)),
            context_limit_tokens=conversation.context_limit_tokens,
            metadata=nul_free(metadata),
            title=str(nul_free(conversation.title)),
            sampling=conversation.sampling.SerializeToString() if conversation.HasField("sampling") else None,
            constraint=conversation.constraint.SerializeToString()
            if conversation.HasField("constraint")
            else None,
        )


@dataclass(frozen=True)
class StoredConversation:
    id: str
    owner: str
    fields: ConversationFields
    current_message: int | None
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        return conversation_name(self.id)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StoredConversation:
        return cls(
            id=row["id"],
            owner=row["owner"],
            fields=ConversationFields(
                model=row["model"],
                system_prompt=row["system_prompt"],
                context_limit_tokens=row["context_limit_tokens"],
                metadata=row["metadata"] or {},
                title=row["title"],
                sampling=bytes(row["sampling"]) if row["sampling"] is not None else None,
                constraint=bytes(row["output_constraint"]) if row["output_constraint"] is not None else None,
            ),
            current_message=row["current_message"],
            create_time=row["create_time"],
            update_time=row["update_time"],
        )

    def sampling(self) -> inference_pb2.SamplingParams | None:
        if self.fields.sampling is None:
            return None
        return inference_pb2.SamplingParams.FromString(self.fields.sampling)

    def constraint(self) -> inference_pb2.OutputConstraint | None:
        if self.fields.constraint is None:
            return None
        return inference_pb2.OutputConstraint.FromString(self.fields.constraint)

    def to_proto(self) -> ConversationProto:
        proto = ConversationProto(
            name=self.name,
            model=self.fields.model,
            system_prompt=self.fields.system_prompt,
            context_limit_tokens=self.fields.context_limit_tokens,
            metadata=dict(self.fields.metadata),
            title=self.fields.title,
            owner=self.owner,
            current_message=message_name(self.id, self.current_message) if self.current_message else "",
            create_time=to_timestamp(self.create_time),
            update_time=to_timestamp(self.update_time),
        )
        if (sampling := self.sampling()) is not None:
            proto.sampling.CopyFrom(sampling)
        if (constraint := self.constraint()) is not None:
            proto.constraint.CopyFrom(constraint)
        return proto


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: str
    parent_id: int | None
    role: str
    content: str
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int
    left_out_turns: int
    request_id: str
    create_time: datetime

    @property
    def name(self) -> str:
        return message_name(self.conversation_id, self.id)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StoredMessage:
        return cls(**{key: row[key] for key in cls.__dataclass_fields__})

    def to_proto(self, version: int = 1, version_count: int = 1) -> MessageProto:
        proto = MessageProto(
            name=self.name,
            parent=message_name(self.conversation_id, self.parent_id) if self.parent_id else "",
            role=ROLES[self.role],
            content=self.content,
            create_time=to_timestamp(self.create_time),
            version=version,
            version_count=version_count,
        )
        if self.role == "assistant":
            proto.finish_reason = self.finish_reason  # type: ignore[assignment]
            proto.usage.CopyFrom(
                inference_pb2.Usage(
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens,
                    total_tokens=self.prompt_tokens + self.completion_tokens,
                )
            )
            proto.left_out_turns = self.left_out_turns
            proto.request_id = self.request_id
        return proto


def branch(messages: Sequence[StoredMessage], leaf: int | None) -> list[StoredMessage]:
    """The messages from the first one to `leaf`, following parents (oldest first)."""
    by_id = {m.id: m for m in messages}
    path: list[StoredMessage] = []
    current = by_id.get(leaf) if leaf is not None else None
    while current is not None:
        path.append(current)
        current = by_id.get(current.parent_id) if current.parent_id is not None else None
    return path[::-1]


def versions(messages: Sequence[StoredMessage]) -> dict[int, tuple[int, int]]:
    """message id -> (its version, how many versions share its parent and role), by creation order."""
    groups: dict[tuple[int | None, str], list[int]] = {}
    for message in sorted(messages, key=lambda m: m.id):
        groups.setdefault((message.parent_id, message.role), []).append(message.id)
    return {
        message_id: (index + 1, len(ids)) for ids in groups.values() for index, message_id in enumerate(ids)
    }
