"""The engine as the pipeline sees it: generate this rendered request, stream its pieces; closing the
stream early cancels the generation. Failures are typed (`EngineError` and its kinds); what a caller
is answered for each is decided once, in `services.inference.engine_errors`."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from backends.llamacpp.contract import EngineFault, SamplingParameters
from services.inference.domain import Piece


class EngineError(Exception):
    """A generation failed in the engine or on the way to it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class Engine(Protocol):
    def generate(
        self,
        model: str,
        prompt: str,
        sampling: SamplingParameters,
        *,
        request_id: str,
        timeout: float | None,
    ) -> AsyncGenerator[Piece, None]:
        """Yields the pieces of one generation, the last carrying a finish reason; raises EngineError.
        Closing the generator before the last piece cancels the generation (frees its engine slot)."""
        ...
