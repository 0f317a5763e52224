"""The service's own view of a generation: what the APIs validate into and what Triton streams back.

The OpenAI and native APIs both reduce their requests to a `GenerationRequest`, so admission, the
Triton client, metrics and recording deal with one shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Api(StrEnum):
    """Which public API a request came through (a metrics label and a recorded field)."""

    CHAT = "chat"
    COMPLETION = "completion"
    GENERATE = "generate"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """Sampling controls; None leaves the engine default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    # The caller's prompt-length limit (not sampling, but travels with it to the model).
    max_prompt_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, as the Triton model's `sampling_parameters` JSON expects them."""
        out: dict[str, Any] = {}
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "max_tokens",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
            "max_prompt_tokens",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.stop:
            out["stop"] = list(self.stop)
        if self.logprobs:
            out["logprobs"] = True
            out["top_logprobs"] = self.top_logprobs
        if self.ignore_eos:
            out["ignore_eos"] = True
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request. Exactly one of `prompt` and `messages` is set."""

    api: Api
    model: str
    sampling: Sampling
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    # Completions only: return the prompt in front of the generated text.
    echo: bool = False
    user: str = ""
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Piece:
    """One streamed response from the Triton model."""

    text: str
    tokens: int
    prompt_tokens: int
    # "" until the last piece; then "stop", "length" or "cancelled".
    finish_reason: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Outcome:
    """What a finished (or failed) generation produced; filled in while streaming."""

    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Seconds from receiving the request to the first piece, and to the end.
    time_to_first_token: float | None = None
    latency: float | None = None
    error_code: str = ""
    error_message: str = ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, piece: Piece) -> None:
        self.text.append(piece.text)
        self.completion_tokens += piece.tokens
        self.prompt_tokens = piece.prompt_tokens or self.prompt_tokens
        self.logprobs.extend(piece.logprobs)
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
