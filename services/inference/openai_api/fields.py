"""Wire rules both OpenAI generation APIs share: optional fields, the model, `stop`, `n`,
`stream_options` (each refusal names the field as OpenAI spells it)."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from services.common.errors import invalid_argument
from services.inference.sampling import SAME_NAMED

# Sampling fields both OpenAI requests spell as the contract does, all `optional`.
OPENAI_SAME_NAMED = (*SAME_NAMED, "ignore_eos")


def opt(message: Any, name: str) -> Any:
    """The value of a proto3 `optional` field, or None when the caller did not set it."""
    return getattr(message, name) if message.HasField(name) else None


def model_name(model: str) -> str:
    # Any other string is a lookup miss (NOT_FOUND), as with OpenAI, rather than a malformed request.
    if not model:
        raise invalid_argument("model", "is required")
    return model


def stop(message: Any) -> tuple[tuple[str, ...] | None, bool]:
    """`stop`: null, a string, or a list of strings -> (sequences, whether a single string was sent);
    None when absent or null (the model's default applies). How many and whether empty is the contract's
    to say."""
    value: struct_pb2.Value | None = message.stop if message.HasField("stop") else None
    kind = value.WhichOneof("kind") if value is not None else None
    if value is None or kind in (None, "null_value"):
        return None, False
    if kind == "string_value":
        return (value.string_value,), True
    if kind != "list_value":
        raise invalid_argument("stop", "must be a string or a list of strings")
    items: list[str] = []
    for i, item in enumerate(value.list_value.values):
        if item.WhichOneof("kind") != "string_value":
            raise invalid_argument(f"stop[{i}]", "must be a string")
        items.append(item.string_value)
    return tuple(items), False


def one_choice(value: int | None, field: str) -> None:
    """`n` / `best_of`: only 1 is supported."""
    if value is not None and value != 1:
        raise invalid_argument(field, f"only 1 choice per request is supported, got {value}")


def include_usage(message: Any, stream: bool) -> bool:
    """`stream_options.include_usage`; the options are refused on a request that does not stream."""
    if not message.HasField("stream_options"):
        return False
    # A gRPC caller may send `stream: true` to the unary RPC; the options are then merely unused.
    if not stream and not message.stream:
        raise invalid_argument("stream_options", "is only allowed when stream is true")
    return stream and bool(message.stream_options.include_usage)
