"""Request validation with OpenAI's ranges: proto requests in, `GenerationRequest` out.

Every rule raises INVALID_ARGUMENT naming the offending field the way the caller wrote it
(`messages[1].role`, `temperature`, `sampling.top_p`), so a 400 tells the user what to fix.
Limits that depend on the model (max_tokens at most the model's limit) are checked later, once the
model's metadata is known (`check_against_model`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ferry.auth.v1.auth_pb2 import Principal
from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from services.common.config import InferenceSettings
from services.common.errors import invalid_argument
from services.common.triton import ModelInfo
from services.inference.generation import Api, GenerationRequest, Message, Sampling

# `developer` is OpenAI's newer name for `system`; templates only know `system`.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
# The legacy completions API allows at most 5 alternatives per position.
MAX_COMPLETION_LOGPROBS = 5
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NATIVE_MODEL = re.compile(r"^models/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")
INT32_MAX = 2**31 - 1


def _opt(message: Any, name: str) -> Any:
    """The value of a proto3 `optional` field, or None when the caller did not set it."""
    return getattr(message, name) if message.HasField(name) else None


def _in_range(field: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise invalid_argument(field, "must be a finite number")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid_argument(field, f"must be in {bracket}{low:g}, {high:g}], got {value:g}")


def _at_least(field: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise invalid_argument(field, f"must be at least {low}, got {value}")


def openai_model(model: str, field: str = "model") -> str:
    # Any other string is a lookup miss (NOT_FOUND), as with OpenAI, rather than a malformed request.
    if not model:
        raise invalid_argument(field, "is required")
    return model


def native_model(model: str, field: str = "model") -> str:
    """`models/{model}` (AIP-122) -> model id; a bare id is accepted too for convenience."""
    if not model:
        raise invalid_argument(field, "is required, in the form models/{model}")
    match = _NATIVE_MODEL.match(model)
    if match:
        return match.group(1)
    if _MODEL_ID.match(model):
        return model
    raise invalid_argument(field, f"'{model}' is not a model name of the form models/{{model}}")


def _content_text(value: struct_pb2.Value, field: str, role: str) -> str:
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


def _messages(items: Sequence[tuple[str, Any]], prefix: str, content_of: Any) -> tuple[Message, ...]:
    if not items:
        raise invalid_argument(prefix, "must contain at least one message")
    out: list[Message] = []
    for i, (role, raw) in enumerate(items):
        where = f"{prefix}[{i}]"
        if not role:
            raise invalid_argument(f"{where}.role", "is required")
        if role not in ROLES:
            raise invalid_argument(f"{where}.role", f"'{role}' is not one of {', '.join(sorted(ROLES))}")
        out.append(Message(ROLES[role], content_of(raw, f"{where}.content", role)))
    return tuple(out)


def _stop(value: struct_pb2.Value | None, field: str = "stop") -> tuple[str, ...]:
    """`stop`: null, a string, or a list of up to 4 strings."""
    if value is None:
        return ()
    kind = value.WhichOneof("kind")
    if kind in (None, "null_value"):
        return ()
    if kind == "string_value":
        items = [value.string_value]
    elif kind == "list_value":
        items = []
        for i, item in enumerate(value.list_value.values):
            if item.WhichOneof("kind") != "string_value":
                raise invalid_argument(f"{field}[{i}]", "must be a string")
            items.append(item.string_value)
    else:
        raise invalid_argument(field, "must be a string or a list of strings")
    return _stop_list(items, field)


def _stop_list(items: Sequence[str], field: str) -> tuple[str, ...]:
    if len(items) > MAX_STOP:
        raise invalid_argument(field, f"at most {MAX_STOP} sequences are allowed, got {len(items)}")
    for i, item in enumerate(items):
        if not item:
            raise invalid_argument(f"{field}[{i}]" if len(items) > 1 else field, "must not be empty")
    return tuple(items)


def _n(value: int | None, field: str = "n") -> None:
    if value is not None and value != 1:
        raise invalid_argument(field, f"only 1 choice per request is supported, got {value}")


def _sampling(
    *,
    prefix: str,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    max_tokens: int | None,
    max_tokens_field: str,
    stop: tuple[str, ...],
    seed: int | None,
    frequency_penalty: float | None,
    presence_penalty: float | None,
    repetition_penalty: float | None,
    logprobs: bool,
    top_logprobs: int | None,
    top_logprobs_field: str,
    max_top_logprobs: int,
    ignore_eos: bool,
) -> Sampling:
    _in_range(f"{prefix}temperature", temperature, 0.0, 2.0)
    _in_range(f"{prefix}top_p", top_p, 0.0, 1.0)
    # vLLM's -1 ("disabled") is accepted and means the same as 0.
    _at_least(f"{prefix}top_k", top_k, -1)
    _in_range(f"{prefix}min_p", min_p, 0.0, 1.0)
    _at_least(max_tokens_field, max_tokens, 1)
    _in_range(f"{prefix}frequency_penalty", frequency_penalty, -2.0, 2.0)
    _in_range(f"{prefix}presence_penalty", presence_penalty, -2.0, 2.0)
    _in_range(f"{prefix}repetition_penalty", repetition_penalty, 0.0, 2.0, low_open=True)
    if top_logprobs is not None:
        _in_range(top_logprobs_field, top_logprobs, 0, max_top_logprobs)
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=0 if top_k == -1 else top_k,
        min_p=min_p,
        max_tokens=max_tokens,
        stop=stop,
        seed=seed,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        ignore_eos=ignore_eos,
    )


def _stream_options(request: Any, stream: bool) -> bool:
    if not request.HasField("stream_options"):
        return False
    # A gRPC caller may send `stream: true` to the unary RPC; the options are then merely unused.
    if not stream and not request.stream:
        raise invalid_argument("stream_options", "is only allowed when stream is true")
    return stream and bool(request.stream_options.include_usage)


def _max_tokens(request: Any) -> tuple[int | None, str]:
    """`max_completion_tokens` (current name) wins over `max_tokens` (deprecated) when both are set."""
    newer = _opt(request, "max_completion_tokens")
    if newer is not None:
        return newer, "max_completion_tokens"
    return _opt(request, "max_tokens"), "max_tokens"


def chat_request(request: openai_pb2.CreateChatCompletionRequest, stream: bool) -> GenerationRequest:
    model = openai_model(request.model)
    messages = _messages(
        [(m.role, m.content if m.HasField("content") else struct_pb2.Value()) for m in request.messages],
        "messages",
        _content_text,
    )
    _n(_opt(request, "n"))
    top_logprobs = _opt(request, "top_logprobs")
    logprobs = bool(_opt(request, "logprobs"))
    if top_logprobs is not None and top_logprobs > 0 and not logprobs:
        raise invalid_argument("top_logprobs", "requires logprobs to be true")
    max_tokens, max_tokens_field = _max_tokens(request)
    sampling = _sampling(
        prefix="",
        temperature=_opt(request, "temperature"),
        top_p=_opt(request, "top_p"),
        top_k=_opt(request, "top_k"),
        min_p=_opt(request, "min_p"),
        max_tokens=max_tokens,
        max_tokens_field=max_tokens_field,
        stop=_stop(request.stop if request.HasField("stop") else None),
        seed=_opt(request, "seed"),
        frequency_penalty=_opt(request, "frequency_penalty"),
        presence_penalty=_opt(request, "presence_penalty"),
        repetition_penalty=_opt(request, "repetition_penalty"),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        top_logprobs_field="top_logprobs",
        max_top_logprobs=MAX_TOP_LOGPROBS,
        ignore_eos=bool(_opt(request, "ignore_eos")),
    )
    return GenerationRequest(
        api=Api.CHAT,
        model=model,
        sampling=sampling,
        messages=messages,
        user=request.user,
        stream=stream,
        include_usage=_stream_options(request, stream),
    )


def _prompt(value: struct_pb2.Value | None) -> str:
    """Completions `prompt`: a string, or a list holding one string."""
    if value is None:
        raise invalid_argument("prompt", "is required")
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        items = value.list_value.values
        if len(items) != 1:
            raise invalid_argument("prompt", f"exactly one prompt per request is supported, got {len(items)}")
        if items[0].WhichOneof("kind") != "string_value":
            raise invalid_argument("prompt[0]", "must be a string (token id prompts are not supported)")
        return items[0].string_value
    if kind in (None, "null_value"):
        raise invalid_argument("prompt", "is required")
    raise invalid_argument("prompt", "must be a string or a list holding one string")


def completion_request(request: openai_pb2.CreateCompletionRequest, stream: bool) -> GenerationRequest:
    model = openai_model(request.model)
    prompt = _prompt(request.prompt if request.HasField("prompt") else None)
    _n(_opt(request, "n"))
    _n(_opt(request, "best_of"), "best_of")
    if request.suffix:
        raise invalid_argument("suffix", "is not supported by this model (no fill-in-the-middle)")
    logprobs = _opt(request, "logprobs")
    if request.echo and logprobs is not None:
        raise invalid_argument("echo", "cannot be combined with logprobs (prompt logprobs are not returned)")
    sampling = _sampling(
        prefix="",
        temperature=_opt(request, "temperature"),
        top_p=_opt(request, "top_p"),
        top_k=_opt(request, "top_k"),
        min_p=_opt(request, "min_p"),
        max_tokens=_opt(request, "max_tokens"),
        max_tokens_field="max_tokens",
        stop=_stop(request.stop if request.HasField("stop") else None),
        seed=_opt(request, "seed"),
        frequency_penalty=_opt(request, "frequency_penalty"),
        presence_penalty=_opt(request, "presence_penalty"),
        repetition_penalty=_opt(request, "repetition_penalty"),
        logprobs=logprobs is not None,
        top_logprobs=logprobs,
        top_logprobs_field="logprobs",
        max_top_logprobs=MAX_COMPLETION_LOGPROBS,
        ignore_eos=bool(_opt(request, "ignore_eos")),
    )
    return GenerationRequest(
        api=Api.COMPLETION,
        model=model,
        sampling=sampling,
        prompt=prompt,
        echo=request.echo,
        user=request.user,
        stream=stream,
        include_usage=_stream_options(request, stream),
    )


def generate_request(request: inference_pb2.GenerateRequest, stream: bool) -> GenerationRequest:
    model = native_model(request.model)
    which = request.WhichOneof("input")
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    if which == "prompt":
        prompt = request.prompt
    elif which == "messages":
        messages = _messages(
            [(m.role, m.content) for m in request.messages.messages],
            "messages.messages",
            lambda raw, field, role: raw,
        )
    else:
        raise invalid_argument("prompt", "one of prompt or messages is required")
    s = request.sampling
    top_logprobs = s.top_logprobs if s.top_logprobs else None
    if top_logprobs and not s.logprobs:
        raise invalid_argument("sampling.top_logprobs", "requires sampling.logprobs to be true")
    sampling = _sampling(
        prefix="sampling.",
        temperature=_opt(s, "temperature"),
        top_p=_opt(s, "top_p"),
        top_k=_opt(s, "top_k"),
        min_p=_opt(s, "min_p"),
        max_tokens=_opt(s, "max_tokens"),
        max_tokens_field="sampling.max_tokens",
        stop=_stop_list(list(s.stop), "sampling.stop"),
        seed=_opt(s, "seed"),
        frequency_penalty=_opt(s, "frequency_penalty"),
        presence_penalty=_opt(s, "presence_penalty"),
        repetition_penalty=_opt(s, "repetition_penalty"),
        logprobs=s.logprobs,
        top_logprobs=top_logprobs,
        top_logprobs_field="sampling.top_logprobs",
        max_top_logprobs=MAX_TOP_LOGPROBS,
        ignore_eos=s.ignore_eos,
    )
    return GenerationRequest(
        api=Api.GENERATE, model=model, sampling=sampling, prompt=prompt, messages=messages, stream=stream
    )


def apply_caller_limits(
    request: GenerationRequest, settings: InferenceSettings, principal: Principal | None
) -> GenerationRequest:
    """The tighter of the global limits (settings) and the caller's key limits: a larger `max_tokens`
    is refused naming the field; an omitted one becomes the limit; the prompt limit goes to the model
    (only it can count tokens)."""
    key = principal.limits if principal is not None else None
    max_tokens = _tightest(settings.max_tokens, key.max_tokens if key else 0)
    max_prompt = _tightest(settings.max_prompt_tokens, key.max_prompt_tokens if key else 0)
    sampling = request.sampling
    asked = sampling.max_tokens
    if max_tokens and asked is not None and asked > max_tokens:
        field = "sampling.max_tokens" if request.api is Api.GENERATE else "max_tokens"
        raise invalid_argument(field, f"must be at most {max_tokens} for this API key, got {asked}")
    changes: dict[str, int] = {}
    if max_tokens and asked is None:
        changes["max_tokens"] = max_tokens
    if max_prompt:
        changes["max_prompt_tokens"] = max_prompt
    if not changes:
        return request
    return replace(request, sampling=replace(sampling, **changes))  # type: ignore[arg-type]


def _tightest(*limits: int) -> int:
    """The smallest positive limit; 0 when none is set."""
    return min((limit for limit in limits if limit > 0), default=0)


def check_against_model(request: GenerationRequest, model: ModelInfo) -> None:
    """Limits that come from the model's metadata."""
    limit = model.max_tokens
    asked = request.sampling.max_tokens
    if limit and asked is not None and asked > limit:
        field = "sampling.max_tokens" if request.api is Api.GENERATE else "max_tokens"
        raise invalid_argument(field, f"must be at most {limit} for model '{model.name}', got {asked}")
    if request.messages is not None and not model.chat_template:
        field = "messages.messages" if request.api is Api.GENERATE else "messages"
        raise invalid_argument(field, f"model '{model.name}' has no chat template; send a prompt instead")
