"""The engine as the pipeline sees it: generate this rendered request, stream its pieces; closing the
stream early cancels the generation. Failures are typed (`EngineError` and its kinds); what a caller
is answered for each is decided once, in `services.inference.engine_errors`.

Every provider of models (Triton, an OpenAI-compatible upstream) is one `Engine`; the pipeline's engine
is an `EngineRouter` that hands each generation to the engine of its model's provider."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Protocol

from backends.llamacpp.contract import EngineFault, SamplingParameters
from services.common.triton_client import ModelInfo, Provider
from services.inference.domain import Message, Piece


class EngineError(Exception):
    """A generation failed in the engine or on the way to it. `retry_after_seconds`: when the engine
    knows how long a retry should wait (used only where the caller's error is retryable)."""

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds


class EngineFaulted(EngineError):
    """The backend reported one of the contract's faults."""

    def __init__(self, fault: EngineFault) -> None:
        super().__init__(fault.message)
        self.fault = fault


class EngineRefused(EngineError):
    """Triton itself refused or dropped the request (not a backend fault: unknown model, model not
    ready, ...); whether to retry depends on whether the model is still ready."""


class EngineUnreachable(EngineError):
    """Triton did not answer, or ended the stream from its side (stopping, restarting)."""


class EngineTimedOut(EngineError):
    """The deadline given to the engine passed before the generation finished."""


class EngineBroken(EngineError):
    """The engine's stream broke its own protocol (e.g. ended without a final piece)."""


class UpstreamUnreachable(EngineUnreachable):
    """An upstream server did not answer, answered with a server error (5xx) or dropped the connection."""


class UpstreamRateLimited(EngineError):
    """An upstream server kept refusing for load (HTTP 429) after ferry's retries."""


class UpstreamAuthFailed(EngineError):
    """An upstream server refused ferry's credentials (HTTP 401/403), or its API key is not set: an
    operator's configuration error. The message never holds the key."""


class UpstreamRefused(EngineError):
    """An upstream server refused the request for a reason the caller cannot fix (e.g. 404: it does not
    know the configured model name)."""


class Engine(Protocol):
    def generate(
        self,
        model: ModelInfo,
        prompt: str,
        sampling: SamplingParameters,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str,
        timeout: float | None,
    ) -> AsyncGenerator[Piece, None]:
        """Yields the pieces of one generation, the last carrying a finish reason; raises EngineError.
        Closing the generator before the last piece cancels the generation (frees its engine slot).

        `prompt` is the rendered input; `messages` the conversation as the caller sent it (None for a
        plain prompt), for engines that apply the model's chat template themselves."""
        ...


class EngineRouter:
    """The pipeline's engine: each generation goes to the engine of its model's provider."""

    def __init__(self, engines: Mapping[Provider, Engine]) -> None:
        self.engines = dict(engines)

    def generate(
        self,
        model: ModelInfo,
        prompt: str,
        sampling: SamplingParameters,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str,
        timeout: float | None,
    ) -> AsyncGenerator[Piece, None]:
        engine = self.engines.get(model.provider)
        if engine is None:
            return _failing(EngineError(f"no engine serves {model.provider} models in this service"))
        # The engine's own generator, not a wrapper: no extra step per piece.
        return engine.generate(
            model, prompt, sampling, messages=messages, request_id=request_id, timeout=timeout
        )


async def _failing(err: EngineError) -> AsyncGenerator[Piece, None]:
    raise err
    yield  # an async generator, as the interface promises
