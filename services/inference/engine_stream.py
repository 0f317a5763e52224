"""The stream stage: runs the generation on the engine within the caller's deadline and turns an engine
failure into the caller's error (`services.inference.engine_errors`)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Protocol

from services.common.errors import Reason, rpc_error
from services.common.triton_client import ModelInfo
from services.inference.deadline import Deadline
from services.inference.domain import Exchange, Piece
from services.inference.engine_errors import caller_error
from services.inference.engine_interface import Engine, EngineError, EngineRefused

# The engine's deadline is the caller's minus this much, so the failure reaches us (and we can tell
# the caller what happened, e.g. as an SSE error event) before the caller's own deadline fires.
DEADLINE_MARGIN_SECONDS = 0.25


class Readiness(Protocol):
    async def is_ready(self, name: str) -> bool: ...


class EngineStream:
    def __init__(self, engine: Engine, readiness: Readiness) -> None:
        self.engine = engine
        self.readiness = readiness

    async def __call__(
        self, exchange: Exchange, model: ModelInfo, deadline: Deadline
    ) -> AsyncGenerator[Piece, None]:
        """The engine's pieces for the exchange's prompt (and the caller's messages, for engines that
        render them themselves); closing early cancels the generation."""
        remaining = deadline.time_remaining()
        if remaining is not None and remaining <= DEADLINE_MARGIN_SECONDS:
            raise rpc_error(Reason.DEADLINE_EXCEEDED, "the request deadline left no time to generate")
        request = exchange.request
        pieces = self.engine.generate(
            model,
            exchange.prompt,
            request.sampling,
            messages=request.messages,
            request_id=exchange.request_id,
            timeout=None if remaining is None else remaining - DEADLINE_MARGIN_SECONDS,
        )
        async with aclosing(pieces):
            try:
                async for piece in pieces:
                    yield piece
            except EngineError as err:
                # Triton's own refusal is worth a retry only when the model is no longer ready.
                ready = not isinstance(err, EngineRefused) or await self.readiness.is_ready(model.name)
                raise caller_error(err, request.spelling, model_ready=ready) from err
