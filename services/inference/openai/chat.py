"""OpenAI chat completions on the wire -> a `GenerationRequest`."""

from __future__ import annotations

from typing import Any

from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from services.common.errors import invalid_argument
from services.inference.generation import Api, FieldSpelling, GenerationRequest
from services.inference.messages import parse_messages
from services.inference.openai import wire
from services.inference.sampling import same_named, sampling_parameters


def content_text(value: struct_pb2.Value, field: str, role: str) -> str:
    """OpenAI message content: a string, or a list of `{"type": "text", "text": ...}` parts."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "null_value" or kind is None:
        # OpenAI allows a null content only on assistant turns (that carried tool calls).
        if role == "assistant":
            return ""
        raise invalid_argument(field, "is required")
    if kind == "list_value":
        texts: list[str] = []
        for i, part in enumerate(value.list_value.values):
            where = f"{field}[{i}]"
            if part.WhichOneof("kind") != "struct_value":
                raise invalid_argument(where, "must be an object like {'type': 'text', 'text': '...'}")
            fields = part.struct_value.fields
            part_type = fields["type"].string_value if "type" in fields else ""
            if part_type != "text":
                raise invalid_argument(
                    f"{where}.type", f"only 'text' parts are supported, got '{part_type or 'nothing'}'"
                )
            if "text" not in fields or fields["text"].WhichOneof("kind") != "string_value":
                raise invalid_argument(f"{where}.text", "must be a string")
            texts.append(fields["text"].string_value)
        # vLLM joins text parts with newlines; a single part stays as it is.
        return "\n".join(texts)
    raise invalid_argument(field, "must be a string or a list of text parts")


class ChatWire:
    """A CreateChatCompletionRequest as received; `parse()` checks it."""

    api = Api.CHAT

    def __init__(self, message: openai_pb2.CreateChatCompletionRequest, *, stream: bool) -> None:
        self.message = message
        self.stream = stream

    @property
    def model(self) -> str:
        return self.message.model

    def parse(self) -> GenerationRequest:
        request = self.message
        model = wire.model_name(request.model)
        messages = parse_messages(
            [(m.role, m.content if m.HasField("content") else struct_pb2.Value()) for m in request.messages],
            "messages",
            content_text,
        )
        wire.one_choice(wire.opt(request, "n"), "n")
        stop, single_stop = wire.stop(request)
        renamed: dict[str, str] = {}
        # `max_completion_tokens` (current name) wins over `max_tokens` (deprecated) when both are set.
        max_tokens = wire.opt(request, "max_completion_tokens")
        if max_tokens is not None:
            renamed["max_tokens"] = "max_completion_tokens"
        else:
            max_tokens = wire.opt(request, "max_tokens")
        spelling = FieldSpelling(
            input="messages", renamed=renamed, single=frozenset({"stop"} if single_stop else ())
        )
        values: dict[str, Any] = {
            **same_named(request),
            "max_tokens": max_tokens,
            "stop": stop,
            "logprobs": wire.opt(request, "logprobs"),
            "top_logprobs": wire.opt(request, "top_logprobs"),
            "ignore_eos": wire.opt(request, "ignore_eos"),
        }
        return GenerationRequest(
            api=self.api,
            model=model,
            sampling=sampling_parameters(values, spelling),
            spelling=spelling,
            messages=messages,
            user=request.user,
            stream=self.stream,
            include_usage=wire.include_usage(request, self.stream),
        )
