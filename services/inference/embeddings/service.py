"""The embeddings path both APIs share: parse -> resolve -> check the model -> admit -> record -> Triton.

Like a generation's (services.inference.pipeline), with the same pieces: the catalog resolves the
model (aliases, `allowed_models`, readiness), the model's admission gate bounds requests in flight
(`concurrent_requests` of its config), every admitted request leaves exactly one transaction record,
and the shared `ferry_inference_*` metrics count it (api="embedding"). The deadline is the caller's;
a caller going away cancels the Triton requests.
"""

from __future__ import annotations

import time
from asyncio import CancelledError
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol, TypeVar

import grpc
import numpy as np

from services.common.config import EmbeddingSettings, InferenceSettings
from services.common.errors import Reason, RpcError, invalid_argument, rpc_error
from services.common.triton_client import Capability, ModelInfo
from services.inference import metrics
from services.inference.admission import Admissions
from services.inference.deadline import Deadline
from services.inference.domain import UNKNOWN_MODEL
from services.inference.embeddings import metrics as embedding_metrics
from services.inference.embeddings.record import EmbeddingCall, EmbeddingLog
from services.inference.embeddings.request import EmbeddingOutcome, EmbeddingRequest
from services.inference.embeddings.triton import TritonEmbedder, caller_failure
from services.inference.engine_interface import EngineError, EngineRefused
from services.inference.engine_stream import DEADLINE_MARGIN_SECONDS
from services.inference.policy import require_capability

API = "embedding"
Wire = TypeVar("Wire")


class EmbeddingModels(Protocol):
    """What the path asks about models (`catalog.Catalog` in the service)."""

    async def resolve(self, name: str) -> ModelInfo: ...

    async def is_ready(self, name: str) -> bool: ...

    def is_known(self, name: str) -> bool: ...


class Embeddings:
    def __init__(
        self,
        models: EmbeddingModels,
        embedder: TritonEmbedder,
        admissions: Admissions,
        settings: InferenceSettings,
        log: EmbeddingLog | None = None,
    ) -> None:
        self.models = models
        self.embedder = embedder
        self.admissions = admissions
        self.limits = settings.embeddings
        self.log = log

    def parse(
        self, parser: Callable[[Wire, EmbeddingSettings], EmbeddingRequest], wire: Wire, model: str
    ) -> EmbeddingRequest:
        """The parse stage (`wire.parse_openai` / `parse_native`); a refusal is counted like any outcome."""
        try:
            return parser(wire, self.limits)
        except RpcError as err:
            label = model if self.models.is_known(model) else UNKNOWN_MODEL
            metrics.REQUESTS.labels(label, API, err.code.name.lower()).inc()
            raise

    async def resolve(self, request: EmbeddingRequest) -> tuple[EmbeddingRequest, ModelInfo]:
        """The model that serves the request, which must be an embedding model of the asked dimensions."""
        model = await self.models.resolve(request.model)
        if model.name != request.model:
            request = replace(request, model=model.name, model_alias=request.model)
        require_capability(model, Capability.EMBEDDING, "model")
        if request.dimensions is not None and request.dimensions != model.dimensions:
            # Cutting a vector short only keeps its meaning for models trained for it (Matryoshka
            # training, as OpenAI's text-embedding-3); this one is not, so only its own size is honest.
            raise invalid_argument(
                "dimensions",
                f"model '{model.name}' only gives {model.dimensions}-dimensional vectors, got {request.dimensions}",
            )
        return request, model

    async def run(self, request: EmbeddingRequest, request_id: str, deadline: Deadline) -> EmbeddingCall:
        """Serves one request; raises RpcError for everything the caller should see as a status."""
        call = EmbeddingCall(request_id, request, EmbeddingOutcome())
        outcome, label, started = call.outcome, UNKNOWN_MODEL, False
        try:
            call.request, model = await self.resolve(request)
            label = model.name
            async with self.admissions.gate(model).slot(deadline.time_remaining()):
                if self.log is not None:
                    self.log.started(call)
                started = True
                outcome.vectors, outcome.token_counts = await self._embed(call, model, deadline)
                outcome.latency = time.monotonic() - outcome.started_at
        except RpcError as err:
            outcome.failed(err.code.name, err.message)
            raise
        except CancelledError:
            outcome.failed("CANCELLED", "the caller went away")
            raise
        except Exception as err:
            outcome.failed("INTERNAL", repr(err))
            raise
        finally:
            if outcome.latency is None:
                outcome.latency = time.monotonic() - outcome.started_at
            if started and self.log is not None:
                # Recorded before the caller gets the answer: answered means recorded.
                self.log.finished(call)
            self._observe(call, label)
        return call

    async def _embed(
        self, call: EmbeddingCall, model: ModelInfo, deadline: Deadline
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        remaining = deadline.time_remaining()
        if remaining is not None and remaining <= DEADLINE_MARGIN_SECONDS:
            raise rpc_error(Reason.DEADLINE_EXCEEDED, "the request deadline left no time to embed")
        try:
            return await self.embedder.embed(
                model,
                call.request,
                request_id=call.request_id,
                timeout=None if remaining is None else remaining - DEADLINE_MARGIN_SECONDS,
            )
        except EngineError as err:
            # Triton's own refusal is worth a retry only when the model is no longer ready.
            ready = not isinstance(err, EngineRefused) or await self.models.is_ready(model.name)
            raise caller_failure(err, call.request, ready) from err

    @staticmethod
    def _observe(call: EmbeddingCall, label: str) -> None:
        outcome = call.outcome
        metrics.REQUESTS.labels(label, API, outcome.error_code.lower() or "ok").inc()
        if label == UNKNOWN_MODEL:
            return
        embedding_metrics.INPUTS.labels(label).observe(len(call.request.inputs))
        if not outcome.error_code and outcome.latency is not None:
            metrics.E2E_LATENCY.labels(label).observe(outcome.latency)
        if outcome.prompt_tokens:
            metrics.PROMPT_TOKENS.labels(label).inc(outcome.prompt_tokens)


async def served(embeddings: Embeddings | None, context: grpc.aio.ServicerContext) -> Embeddings:
    """The process's embeddings path; UNIMPLEMENTED when it serves none (a servicer built without it)."""
    if embeddings is None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "embeddings are not served by this process")
        raise AssertionError("abort raises")
    return embeddings
