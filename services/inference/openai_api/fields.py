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


def _given(message: Any, name: str) -> struct_pb2.Value | None:
    """A google.protobuf.Value field the caller sent with a value other than null, else None."""
    if not message.HasField(name):
        return None
    value: struct_pb2.Value = getattr(message, name)
    return None if value.WhichOneof("kind") in (None, "null_value") else value


# Chat fields OpenAI defines that ferry cannot honour: refused by name whatever their value (null is
# "not sent"), with what to do instead.
REFUSED_CHAT_FIELDS = {
    "functions": "is deprecated by OpenAI and not supported: use tools",
    "function_call": "is deprecated by OpenAI and not supported: use tool_choice (with tools)",
    "audio": "is not supported: ferry's models answer in text only",
    "prediction": "is not supported (predicted outputs)",
    "reasoning_effort": "is not supported: ferry's models do not reason before answering",
    "web_search_options": "is not supported: ferry does not search the web",
    "verbosity": "is not supported: set max_completion_tokens or ask for brevity in the prompt",
}
# vLLM's structured-output fields, on both APIs: refused rather than ignored, since a caller who sends
# them counts on a constrained answer.
VLLM_GUIDED_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "structured_outputs",
)
VLLM_GUIDED_WHY = (
    "is vLLM's extension, which ferry does not read: use response_format "
    "({'type': 'json_schema', ...}) or ferry's grammar ({'gbnf': ...} or {'lark': ...}); see docs/structured-output.md"
)


def refuse_vllm_guided(message: Any) -> None:
    for name in VLLM_GUIDED_FIELDS:
        if _given(message, name) is not None:
            raise invalid_argument(name, VLLM_GUIDED_WHY)


# Hints OpenAI defines that ferry accepts and does not act on (each must be a string).
HINT_FIELDS = ("prompt_cache_key", "safety_identifier")
SERVICE_TIERS = ("auto", "default")


def refuse_unhonoured(message: Any) -> None:
    """OpenAI-defined chat fields ferry cannot honour are refused naming them; their no-op values are
    accepted (`store: false`, `modalities: ["text"]`, `service_tier: "auto"`/`"default"`)."""
    for name, why in REFUSED_CHAT_FIELDS.items():
        if _given(message, name) is not None:
            raise invalid_argument(name, why)
    store = _given(message, "store")
    if store is not None and not (store.WhichOneof("kind") == "bool_value" and not store.bool_value):
        raise invalid_argument(
            "store", "only false is supported: ferry does not store completions for later retrieval"
        )
    metadata = _given(message, "metadata")
    if metadata is not None and not (
        metadata.WhichOneof("kind") == "struct_value" and not metadata.struct_value.fields
    ):
        # As at OpenAI, metadata goes with store; ferry's transaction records are kept regardless.
        raise invalid_argument("metadata", "is only allowed when store is true, which ferry does not support")
    modalities = _given(message, "modalities")
    if modalities is not None and not _is_text_only(modalities):
        raise invalid_argument("modalities", 'only ["text"] is supported')
    tier = _given(message, "service_tier")
    if tier is not None and not (
        tier.WhichOneof("kind") == "string_value" and tier.string_value in SERVICE_TIERS
    ):
        raise invalid_argument("service_tier", "only 'auto' and 'default' are supported")
    for name in HINT_FIELDS:
        hint = _given(message, name)
        if hint is not None and hint.WhichOneof("kind") != "string_value":
            raise invalid_argument(name, "must be a string")


def _is_text_only(value: struct_pb2.Value) -> bool:
    if value.WhichOneof("kind") != "list_value":
        return False
    items = value.list_value.values
    return (
        len(items) == 1 and items[0].WhichOneof("kind") == "string_value" and items[0].string_value == "text"
    )
