"""OpenAI (legacy) completions on the wire -> a `GenerationRequest`."""

from __future__ import annotations

from typing import Any

from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from services.common.errors import invalid_argument
from services.inference import structured
from services.inference.domain import Api, FieldSpelling, GenerationRequest
from services.inference.openai_api import fields
from services.inference.sampling import same_named
from services.inference.wire import WireRequest

# The legacy completions API allows at most 5 alternatives per position.
MAX_COMPLETION_LOGPROBS = 5


def prompt_text(value: struct_pb2.Value | None) -> str:
    """Completions `prompt`: a string, or a list holding one string."""
    kind = value.WhichOneof("kind") if value is not None else None
    if value is None or kind in (None, "null_value"):
        raise invalid_argument("prompt", "is required")
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        items = value.list_value.values
        if len(items) != 1:
            raise invalid_argument("prompt", f"exactly one prompt per request is supported, got {len(items)}")
        if items[0].WhichOneof("kind") != "string_value":
            raise invalid_argument("prompt[0]", "must be a string (token id prompts are not supported)")
        return items[0].string_value
    raise invalid_argument("prompt", "must be a string or a list holding one string")


class CompletionWire(WireRequest[openai_pb2.CreateCompletionRequest]):
    """A CreateCompletionRequest as received; `parse()` checks it."""

    api = Api.COMPLETION

    def parse(self) -> GenerationRequest:
        request = self.message
        model = fields.model_name(request.model)
        prompt = prompt_text(request.prompt if request.HasField("prompt") else None)
        fields.one_choice(fields.opt(request, "n"), "n")
        fields.one_choice(fields.opt(request, "best_of"), "best_of")
        fields.refuse_vllm_guided(request)
        if request.suffix:
            raise invalid_argument("suffix", "is not supported by this model (no fill-in-the-middle)")
        # An integer here: how many alternatives to return per position (the contract's top_logprobs).
        logprobs = fields.opt(request, "logprobs")
        if request.echo and logprobs is not None:
            raise invalid_argument(
                "echo", "cannot be combined with logprobs (prompt logprobs are not returned)"
            )
        if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            # Tighter than the contract's top_logprobs range, so the refusal states this API's own.
            raise invalid_argument("logprobs", f"must be in [0, {MAX_COMPLETION_LOGPROBS}], got {logprobs}")
        stop, single_stop = fields.stop(request)
        constraint = structured.openai_constraint(request)
        spelling = FieldSpelling(
            input="prompt",
            renamed={"top_logprobs": "logprobs", **constraint.renamed},
            single=frozenset({"stop"} if single_stop else ()),
        )
        sampling: dict[str, Any] = {
            **same_named(request, (*fields.OPENAI_SAME_NAMED, "max_tokens")),
            "stop": stop,
            "logprobs": True if logprobs is not None else None,
            "top_logprobs": logprobs,
            "logit_bias": structured.openai_logit_bias(request.logit_bias),
            "constraint": constraint.output,
        }
        return self._request(
            model,
            sampling,
            spelling,
            prompt=prompt,
            grammar_name=constraint.grammar_name,
            echo=request.echo,
            user=request.user,
            include_usage=fields.include_usage(request, self.stream),
        )
