"""OpenAI chat completions on the wire -> a `GenerationRequest`."""

from __future__ import annotations

from typing import Any

from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from services.common.errors import invalid_argument
from services.inference import structured
from services.inference.domain import Api, FieldSpelling, GenerationRequest
from services.inference.messages import CHAT_ROLES, parse_messages
from services.inference.openai_api import fields, tools
from services.inference.sampling import same_named
from services.inference.wire import WireRequest


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
            part_fields = part.struct_value.fields
            part_type = part_fields["type"].string_value if "type" in part_fields else ""
            if part_type != "text":
                raise invalid_argument(
                    f"{where}.type", f"only 'text' parts are supported, got '{part_type or 'nothing'}'"
                )
            if "text" not in part_fields or part_fields["text"].WhichOneof("kind") != "string_value":
                raise invalid_argument(f"{where}.text", "must be a string")
            texts.append(part_fields["text"].string_value)
        # vLLM joins text parts with newlines; a single part stays as it is.
        return "\n".join(texts)
    raise invalid_argument(field, "must be a string or a list of text parts")


class ChatWire(WireRequest[openai_pb2.CreateChatCompletionRequest]):
    """A CreateChatCompletionRequest as received; `parse()` checks it."""

    api = Api.CHAT

    def parse(self) -> GenerationRequest:
        request = self.message
        model = fields.model_name(request.model)
        messages = parse_messages(
            [(m.role, m.content if m.HasField("content") else struct_pb2.Value()) for m in request.messages],
            "messages",
            content_text,
            CHAT_ROLES,
        )
        messages = tools.with_tool_turns(messages, request.messages)
        fields.one_choice(fields.opt(request, "n"), "n")
        fields.refuse_unhonoured(request)
        fields.refuse_vllm_guided(request)
        stop, single_stop = fields.stop(request)
        constraint = structured.openai_constraint(request)
        tool_use = tools.tool_use(request)
        constraint = tools.with_forced_call(constraint, tool_use)
        renamed: dict[str, str] = {**constraint.renamed}
        # `max_completion_tokens` (current name) wins over `max_tokens` (deprecated) when both are set.
        max_tokens = fields.opt(request, "max_completion_tokens")
        if max_tokens is not None:
            renamed["max_tokens"] = "max_completion_tokens"
        else:
            max_tokens = fields.opt(request, "max_tokens")
        spelling = FieldSpelling(
            input="messages", renamed=renamed, single=frozenset({"stop"} if single_stop else ())
        )
        sampling: dict[str, Any] = {
            **same_named(request, (*fields.OPENAI_SAME_NAMED, "logprobs", "top_logprobs")),
            "max_tokens": max_tokens,
            "stop": stop,
            "logit_bias": structured.openai_logit_bias(request.logit_bias),
            "constraint": constraint.output,
        }
        return self._request(
            model,
            sampling,
            spelling,
            messages=messages,
            grammar_name=constraint.grammar_name,
            tool_use=tool_use,
            user=request.user,
            include_usage=fields.include_usage(request, self.stream),
        )
