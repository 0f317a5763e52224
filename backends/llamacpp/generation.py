"""One generation's state: turns llama.cpp's streamed chunks into pieces for the client.

Knows nothing of Triton: it talks to a `ResponseSink` (model.py implements it with a response sender),
so it is tested with plain chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.llamacpp import faults
from backends.llamacpp.contract import EngineFault


@dataclass(frozen=True)
class OutputPiece:
    """One streamed response: the text since the previous one and what it counts."""

    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str  # "" until the final piece: "stop", "length" or "cancelled"
    # One entry per token ({token, logprob, top_logprobs}); None when logprobs were not asked for.
    logprobs: list[dict[str, Any]] | None


@dataclass(frozen=True)
class Usage:
    """What the finished generation reports, for the backend's metrics."""

    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


class ResponseSink(Protocol):
    def is_cancelled(self) -> bool: ...
    def send(self, piece: OutputPiece, final: bool) -> None: ...
    def fail(self, fault: EngineFault) -> None: ...


# Runs one llama.cpp completion request, calling the callback for every chunk until it returns True.
CompletionFn = Callable[[dict[str, Any], Callable[[dict[str, Any]], bool]], Any]


@dataclass
class Generation:
    sink: ResponseSink
    # Top logprobs per token to report; -1: no logprobs at all.
    n_top: int
    context_length: int
    max_prompt_tokens: int | None
    is_stopping: Callable[[], bool]
    # Told the usage of a generation that finished normally, before its final piece is sent.
    on_usage: Callable[[Usage], None]
    prompt_tokens: int = 0
    decoded: int = 0  # tokens generated so far (llama.cpp's n_decoded)
    # Text and tokens not yet sent: an incomplete UTF-8 sequence or a possible stop-string prefix
    # makes llama.cpp hold text back, and a token without text (EOS) rides with the next piece.
    pending_text: str = ""
    pending_tokens: int = 0
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)
    sent_tokens: int = 0
    finish_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    fault: EngineFault | None = None
    cancelled: bool = False

    def run(self, complete: CompletionFn, request: dict[str, Any]) -> None:
        """Stream the request through the engine to the sink."""
        try:
            complete(request, self.on_chunk)
        except Exception as exc:  # an engine failure must not take the model down
            self.sink.fail(faults.engine_failed(f"the engine failed: {exc}"))
            return
        self.finish()

    def on_chunk(self, chunk: dict[str, Any]) -> bool:
        """Called by llama.cpp for every streamed chunk; returning True stops generation."""
        if "error" in chunk or "choices" not in chunk:
            self.fault = faults.from_engine_error(chunk.get("error", chunk), self.context_length)
            return True
        choice = chunk["choices"][0]
        verbose = chunk.get("__verbose", {})
        self.prompt_tokens = verbose.get("tokens_evaluated", self.prompt_tokens)
        if self.max_prompt_tokens is not None and self.prompt_tokens > self.max_prompt_tokens:
            # llama.cpp has no tokenize call here: the count is known once the prompt is evaluated.
            self.fault = faults.prompt_too_long(self.prompt_tokens, self.max_prompt_tokens, "caller")
            return True
        decoded = verbose.get("tokens_predicted", self.decoded)
        self.pending_tokens += max(decoded - self.decoded, 0)
        self.decoded = max(decoded, self.decoded)
        self.pending_text += choice.get("text") or ""
        if self.n_top >= 0 and choice.get("logprobs"):
            self.pending_logprobs += _logprob_entries(choice["logprobs"].get("content", []), self.n_top)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
            self.usage = chunk.get("usage", {})
            return False
        if self.is_stopping():
            self.fault = faults.model_unloading()
            return True
        if self.sink.is_cancelled():
            self.cancelled = True
            return True
        if self.pending_text:
            self._send(final=False)
        return False

    def finish(self) -> None:
        if self.cancelled:
            # Nobody may be listening any more, but Triton still expects the request to be completed.
            self.finish_reason = "cancelled"
            self._send(final=True)
            return
        if self.fault is not None:
            self.sink.fail(self.fault)
            return
        if not self.finish_reason:
            self.sink.fail(faults.engine_failed("generation ended without a finish reason"))
            return
        # The engine's usage is the authority; the last piece carries any tokens not counted yet.
        completion = int(self.usage.get("completion_tokens", self.decoded))
        self.pending_tokens = max(completion - self.sent_tokens, 0)
        self.prompt_tokens = int(self.usage.get("prompt_tokens", self.prompt_tokens))
        cached = self.usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        self.on_usage(Usage(self.prompt_tokens, int(cached or 0), completion))
        self._send(final=True)

    def _send(self, final: bool) -> None:
        piece = OutputPiece(
            text=self.pending_text,
            tokens=self.pending_tokens,
            prompt_tokens=self.prompt_tokens,
            finish_reason=self.finish_reason,
            logprobs=self.pending_logprobs if self.n_top >= 0 else None,
        )
        self.sent_tokens += self.pending_tokens
        self.pending_text, self.pending_tokens, self.pending_logprobs = "", 0, []
        self.sink.send(piece, final)


def _logprob_entries(content: list[dict[str, Any]], n_top: int) -> list[dict[str, Any]]:
    return [
        {
            "token": item["token"],
            "logprob": item["logprob"],
            "top_logprobs": [
                {"token": top["token"], "logprob": top["logprob"]}
                for top in item.get("top_logprobs", [])[:n_top]
            ],
        }
        for item in content
    ]
