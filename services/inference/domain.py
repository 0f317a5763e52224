"""The service's own view of a generation: the request every API parses into, the pieces the engine
streams back, what a generation produced, and their conversions to and from the wire.

The OpenAI and native APIs both reduce their requests to a `GenerationRequest`, so the pipeline, the
engine client, metrics and recording deal with one shape. The request remembers how its caller spelled
each field (`FieldSpelling`), so an error found later (by the policy or the engine) names the field
the way the caller wrote it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from backends.llamacpp.contract import SamplingParameters

Proto = TypeVar("Proto")

# The metrics label of a model not (yet) known to exist.
UNKNOWN_MODEL = "_unknown"


class Api(StrEnum):
    """Which public API a request came through (a metrics label and a recorded field)."""

    CHAT = "chat"
    COMPLETION = "completion"
    GENERATE = "generate"


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made: its id (`call_...`), the function and its arguments (JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # Assistant turns: the calls it made. `tool` turns: the id of the call answered.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call; `parameters` is the JSON Schema of its arguments (an object)."""

    name: str
    description: str
    parameters: Mapping[str, Any] = field(compare=False, hash=False)


class ToolChoice(StrEnum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    # One function, named in `ToolUse.function`.
    FUNCTION = "function"


@dataclass(frozen=True)
class ToolUse:
    """The tools a chat request offers and what it asks of them (docs/tools.md)."""

    tools: tuple[FunctionTool, ...]
    choice: ToolChoice
    function: str = ""
    # OpenAI's `parallel_tool_calls`: false = at most one call per answer.
    parallel: bool = True

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.choice is not ToolChoice.NONE

    @property
    def forced(self) -> bool:
        """A call is required (generation is constrained to one)."""
        return self.choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION)

    def tool(self, name: str) -> FunctionTool | None:
        return next((t for t in self.tools if t.name == name), None)


@dataclass(frozen=True)
class FieldSpelling:
    """How the caller's API spells the request's fields: the input (`messages`, `messages.messages`,
    `prompt`) and each `SamplingParameters` field (`top_p`, `sampling.top_p`, `max_completion_tokens`)."""

    input: str
    # Put before every sampling field (the native API nests them in `sampling`).
    prefix: str = ""
    # Contract field -> the caller's name, where it is not prefix + the contract's name.
    renamed: Mapping[str, str] = field(default_factory=dict, hash=False)
    # List fields the caller sent as a single value (OpenAI's `"stop": "END"`): no index in errors.
    single: frozenset[str] = frozenset()
    # Map fields (`logit_bias`): an error's key is written `.key`, as the caller wrote the entry.
    keyed: frozenset[str] = frozenset({"logit_bias"})

    def field(self, name: str) -> str:
        """The caller's name of a contract field (or of an input tensor of the engine)."""
        if name in ("input", "text_input"):
            return self.input
        return self.renamed.get(name, f"{self.prefix}{name}")

    def location(self, loc: tuple[str | int, ...]) -> str:
        """A validation error's `loc` ((field,) or (field, index)) as the caller would write it."""
        if not loc:
            return self.field("sampling_parameters")
        name = str(loc[0])
        where = self.field(name)
        if name in self.keyed:
            # pydantic marks an error in a key (not its value) with a trailing "[key]".
            where += "".join(f".{key}" for key in loc[1:] if key != "[key]")
        elif name not in self.single:
            where += "".join(f"[{index}]" for index in loc[1:])
        return where


@dataclass(frozen=True)
class GenerationRequest:
    """A parsed, valid request. Exactly one of `prompt` and `messages` is set."""

    api: Api
    model: str
    sampling: SamplingParameters
    spelling: FieldSpelling
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    # Completions only: return the prompt in front of the generated text.
    echo: bool = False
    user: str = ""
    stream: bool = False
    include_usage: bool = False
    # The alias the caller named (`model_aliases`) when `model` is the model it resolved to.
    model_alias: str = ""
    # Chat only: the tools offered and `tool_choice` (None: no tools sent).
    tool_use: ToolUse | None = None
    # A stored grammar (`grammars/{id}`) the output must follow; a pipeline stage resolves it into
    # `sampling.constraint` before the engine sees the request.
    grammar_name: str = ""
    # The response cache (services.inference.response_cache): "" uses it, "no-cache" always generates
    # (and keeps the fresh answer), "no-store" always generates and keeps nothing.
    cache_policy: str = ""

    def recorded_parameters(self) -> dict[str, Any]:
        """What the transaction record keeps of the request besides its input."""
        parameters: dict[str, Any] = {
            "api": self.api.value,
            "stream": self.stream,
            **self.sampling.model_dump(mode="json", exclude_defaults=True, exclude={"constraint"}),
        }
        # A schema or grammar may be 256 KiB: the record keeps what kind of constraint applied.
        if self.sampling.constraint is not None:
            parameters["constraint"] = self.sampling.constraint.kind.value
        if self.grammar_name:
            parameters["grammar"] = self.grammar_name
        if self.user:
            parameters["user"] = self.user
        if self.echo:
            parameters["echo"] = True
        if self.model_alias:
            parameters["model_alias"] = self.model_alias
        if self.tool_use is not None:
            parameters["tool_choice"] = self.tool_use.function or self.tool_use.choice.value
            parameters["tools"] = [t.name for t in self.tool_use.tools]
        return parameters


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()

    @classmethod
    def list_from_json(cls, raw: str) -> tuple[TokenLogprob, ...]:
        """The engine's `logprobs` output: a JSON list of {token, logprob, top_logprobs: [...]}."""
        if not raw:
            return ()
        items: list[dict[str, Any]] = json.loads(raw)
        return tuple(cls.from_dict(item) for item in items)

    @classmethod
    def from_dict(cls, item: dict[str, Any], top: int | None = None) -> TokenLogprob:
        """One {token, logprob, top_logprobs: [{token, logprob}]} entry (the backend's and OpenAI chat's
        shape), keeping at most `top` alternatives."""
        return cls(
            token=str(item.get("token", "")),
            logprob=float(item.get("logprob", 0.0)),
            top_logprobs=tuple(
                TopLogprob(str(alt.get("token", "")), float(alt.get("logprob", 0.0)))
                for alt in (item.get("top_logprobs") or ())[:top]
            ),
        )

    def to_native(self) -> inference_pb2.TokenLogprob:
        return self._to(inference_pb2.TokenLogprob, inference_pb2.TopLogprob)

    def to_openai(self) -> openai_pb2.TokenLogprob:
        return self._to(openai_pb2.TokenLogprob, openai_pb2.TopLogprob)

    def _to(self, token: Callable[..., Proto], top: Callable[..., Any]) -> Proto:
        """Both APIs' messages have the same fields: token, logprob, top_logprobs [token, logprob]."""
        alternatives = [top(token=t.token, logprob=t.logprob) for t in self.top_logprobs]
        return token(token=self.token, logprob=self.logprob, top_logprobs=alternatives)


def chat_logprobs(items: Iterable[TokenLogprob]) -> openai_pb2.ChoiceLogprobs:
    return openai_pb2.ChoiceLogprobs(content=[item.to_openai() for item in items])


def completion_logprobs(items: Iterable[TokenLogprob], offset: int) -> openai_pb2.CompletionLogprobs:
    """The legacy completions format: parallel lists, `top_logprobs` as {token: logprob} objects,
    `text_offset` counted from `offset` (the characters already sent)."""
    out = openai_pb2.CompletionLogprobs()
    for item in items:
        out.tokens.append(item.token)
        out.token_logprobs.append(item.logprob)
        top = struct_pb2.Struct()
        for alt in item.top_logprobs:
            top[alt.token] = alt.logprob
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(item.token)
    return out


@dataclass(frozen=True)
class Piece:
    """One streamed response of the engine."""

    text: str
    tokens: int
    prompt_tokens: int
    # "" until the last piece; then "stop", "length" or "cancelled".
    finish_reason: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Outcome:
    """What a generation produced, filled in while it streams; `error_code` is set when it failed."""

    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # When the request arrived (time.monotonic()); TTFT and latency count from it.
    started_at: float = field(default_factory=time.monotonic)
    time_to_first_token: float | None = None
    latency: float | None = None
    error_code: str = ""
    error_message: str = ""
    _last_piece_at: float | None = field(default=None, repr=False)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, piece: Piece, at: float) -> float | None:
        """Takes in a piece that arrived at `at`; returns the seconds since the previous piece (None
        for the first one, whose delay is `time_to_first_token`)."""
        self.text.append(piece.text)
        self.completion_tokens += piece.tokens
        self.prompt_tokens = piece.prompt_tokens or self.prompt_tokens
        self.logprobs.extend(piece.logprobs)
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
            self.latency = at - self.started_at
        previous, self._last_piece_at = self._last_piece_at, at
        if previous is None:
            self.time_to_first_token = at - self.started_at
            return None
        return at - previous

    def failed(self, code: str, message: str) -> None:
        self.error_code, self.error_message = code, message

    def native_usage(self) -> inference_pb2.Usage:
        return inference_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
        )

    def openai_usage(self) -> openai_pb2.Usage:
        return openai_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
        )


@dataclass
class Exchange:
    """One request being served: its id, the request (as the policy left it), the prompt the engine
    gets, and what has been answered so far."""

    request_id: str
    request: GenerationRequest
    prompt: str = ""
    # The model's name once resolved; the metrics label (a caller-chosen name would let anyone create
    # unbounded series).
    model_label: str = UNKNOWN_MODEL
    outcome: Outcome = field(default_factory=Outcome)
    # The response cache's part: "hit", "miss", "bypass" (opted out), or "" (not cacheable, cache off).
    cache: str = ""
