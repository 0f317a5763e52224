"""The generation path every API shares: model lookup, prompt, admission, Triton stream, metrics, record.

Both the OpenAI and the native servicers hand a validated `GenerationRequest` to `Pipeline.stream`
and translate the pieces it yields. Consumers must close the stream (`contextlib.aclosing`) so that a
caller going away cancels the Triton request at once.
"""

from __future__ import annotations

import logging
import time
from asyncio import CancelledError
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import grpc

from services.common.auth import AuthObserver, principal_var
from services.common.config import InferenceSettings
from services.common.errors import RpcError, invalid_argument
from services.common.interceptor import current_call
from services.common.triton import ModelInfo
from services.inference import metrics
from services.inference.admission import Admission
from services.inference.catalog import Catalog
from services.inference.generation import Api, GenerationRequest, Outcome, Piece
from services.inference.templates import ChatTemplates
from services.inference.triton import EngineError, EngineRejected, PromptTooLong, TritonStreamer
from services.inference.validation import apply_caller_limits, check_against_model

log = logging.getLogger(__name__)

# Triton's deadline is the caller's minus this much, so the failure reaches us (and we can tell the
# caller what happened, e.g. as an SSE error event) before the caller's own deadline fires.
DEADLINE_MARGIN_SECONDS = 0.25


UNKNOWN_MODEL_LABEL = "_unknown"


class Deadline(Protocol):
    def time_remaining(self) -> float | None: ...


@dataclass
class Generation:
    """One request in progress: its identity and what it has produced so far."""

    request_id: str
    request: GenerationRequest
    prompt: str = ""
    outcome: Outcome | None = None


class Recorder(Protocol):
    """Where the transaction record of every admitted request goes: `started` once admitted,
    `finished` before the caller receives the last piece (or when the request fails or is cancelled).
    The service uses `recording.TransactionRecording`; `NullRecorder` records nothing.
    """

    async def started(self, generation: Generation) -> None: ...

    async def finished(self, generation: Generation) -> None: ...


class NullRecorder:
    async def started(self, generation: Generation) -> None:
        return None

    async def finished(self, generation: Generation) -> None:
        return None


def _input_field(request: GenerationRequest) -> str:
    if request.messages is not None:
        return "messages.messages" if request.api is Api.GENERATE else "messages"
    return "prompt"


def _engine_error(err: EngineError, request: GenerationRequest) -> RpcError:
    if isinstance(err, PromptTooLong):
        message = err.message
        if err.context_length == request.sampling.max_prompt_tokens:
            message = (
                f"the prompt is {err.prompt_tokens} tokens, more than the {err.context_length} "
                "allowed for this API key (max_prompt_tokens)"
            )
        rpc = invalid_argument(_input_field(request), message, reason="PROMPT_TOO_LONG")
        rpc.metadata.update(prompt_tokens=str(err.prompt_tokens), context_length=str(err.context_length))
        return rpc
    if isinstance(err, EngineRejected):
        prefix = "sampling." if request.api is Api.GENERATE else ""
        return invalid_argument(f"{prefix}{err.field}", err.message)
    if err.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RpcError(
            err.code, "generation did not finish before the request deadline", "DEADLINE_EXCEEDED"
        )
    if err.code == grpc.StatusCode.UNAVAILABLE:
        return RpcError(err.code, err.message, "ENGINE_UNAVAILABLE", retry_after_seconds=1.0)
    return RpcError(err.code, err.message, "ENGINE_ERROR")


class Pipeline:
    def __init__(
        self,
        catalog: Catalog,
        streamer: TritonStreamer,
        templates: ChatTemplates,
        settings: InferenceSettings,
        recorder: Recorder | None = None,
        auth: AuthObserver | None = None,
    ) -> None:
        self.auth = auth
        self.catalog = catalog
        self.streamer = streamer
        self.templates = templates
        self.settings = settings
        self.recorder: Recorder = recorder or NullRecorder()
        self._admission: dict[str, Admission] = {}

    def validate(self, api: Api, model: str, build: Callable[[], GenerationRequest]) -> GenerationRequest:
        """Runs a request's validation, counting a refusal in the requests metric like any outcome."""
        try:
            return build()
        except RpcError as err:
            name = model.removeprefix("models/")
            label = name if self.catalog.is_known(name) else UNKNOWN_MODEL_LABEL
            metrics.REQUESTS.labels(label, api.value, err.code.name.lower()).inc()
            raise

    def limits(self, model: ModelInfo) -> tuple[int, int]:
        """(in flight, queued): configured values, else the engine's slot count and 8 x that."""
        in_flight = self.settings.max_in_flight or model.engine_slots or 1
        queued = self.settings.max_queued if self.settings.max_queued >= 0 else 8 * in_flight
        return in_flight, queued

    def admission(self, model: ModelInfo) -> Admission:
        in_flight, queued = self.limits(model)
        gate = self._admission.get(model.name)
        if gate is None:
            gate = self._admission[model.name] = Admission(model.name, in_flight, queued)
            metrics.IN_FLIGHT.labels(model.name).set_function(lambda: gate.in_flight)
            metrics.QUEUED.labels(model.name).set_function(lambda: gate.queued)
        elif (gate.max_in_flight, gate.max_queued) != (in_flight, queued):
            gate.resize(in_flight, queued)
        metrics.ADMISSION_LIMIT.labels(model.name, "in_flight").set(gate.max_in_flight)
        metrics.ADMISSION_LIMIT.labels(model.name, "queued").set(gate.max_queued)
        return gate

    def render(self, request: GenerationRequest, model: ModelInfo) -> str:
        if request.prompt is not None:
            return request.prompt
        assert request.messages is not None
        return self.templates.render(
            model.name, model.chat_template, request.messages, field=_input_field(request)
        )

    async def stream(
        self, request: GenerationRequest, request_id: str, deadline: Deadline
    ) -> AsyncGenerator[tuple[Piece, Generation], None]:
        """Runs one generation; yields each piece with the generation (whose outcome grows).

        Raises RpcError for everything the caller should see as a status; nothing is yielded before
        the first piece, so a request refused early still gets a plain error status (HTTP 4xx/5xx).
        Only admitted requests are recorded (refusals are the audit trail's business).
        """
        started = time.monotonic()
        generation = Generation(request_id=request_id, request=request)
        outcome = generation.outcome = Outcome()
        # A metrics label only once the model is known to exist: caller-chosen names would let
        # anyone create unbounded series.
        model = UNKNOWN_MODEL_LABEL
        code = "internal"
        # Recorded: "" (not admitted, not recorded), "started", or "finished".
        recorded = ""
        try:
            info = await self.catalog.resolve(request.model)
            model = info.name
            check_against_model(request, info)
            request = generation.request = apply_caller_limits(request, self.settings, principal_var.get())
            generation.prompt = self.render(request, info)
            async with self.admission(info).slot(deadline.time_remaining()) as waited:
                metrics.QUEUE_DURATION.labels(model).observe(waited)
                recorded = "started"
                await self._record(self.recorder.started, generation)
                remaining = deadline.time_remaining()
                if remaining is not None and remaining <= DEADLINE_MARGIN_SECONDS:
                    raise RpcError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the request deadline left no time to generate",
                        "DEADLINE_EXCEEDED",
                    )
                pieces = self.streamer.stream(
                    info.name,
                    generation.prompt,
                    request.sampling.to_json(),
                    request_id=request_id,
                    timeout=None if remaining is None else remaining - DEADLINE_MARGIN_SECONDS,
                )
                last = started
                async with aclosing(pieces):
                    try:
                        async for piece in pieces:
                            now = time.monotonic()
                            if outcome.time_to_first_token is None:
                                outcome.time_to_first_token = now - started
                                metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(now - started)
                            elif piece.tokens:
                                # A piece of k tokens after a gap g counts as k gaps of g / k.
                                gap = (now - last) / piece.tokens
                                for _ in range(piece.tokens):
                                    metrics.INTER_TOKEN_LATENCY.labels(model).observe(gap)
                            last = now
                            outcome.add(piece)
                            if piece.finish_reason:
                                # Recorded before the caller gets the last piece: answered means recorded.
                                outcome.latency = now - started
                                recorded = "finished"
                                await self._record(self.recorder.finished, generation)
                            yield piece, generation
                    except EngineError as err:
                        raise _engine_error(err, request) from err
            code = "ok"
            metrics.E2E_LATENCY.labels(model).observe(time.monotonic() - started)
            metrics.FINISHED.labels(model, outcome.finish_reason or "unknown").inc()
        except RpcError as err:
            code = err.code.name.lower()
            outcome.error_code, outcome.error_message = err.code.name, err.message
            raise
        except (GeneratorExit, CancelledError):
            # The caller went away; leaving the `async with` blocks above cancelled the Triton stream.
            code = "cancelled"
            outcome.error_code, outcome.error_message = "CANCELLED", "the caller went away"
            raise
        except Exception as err:
            outcome.error_code, outcome.error_message = "INTERNAL", repr(err)
            raise
        finally:
            if outcome.latency is None:
                outcome.latency = time.monotonic() - started
            metrics.REQUESTS.labels(model, request.api.value, code).inc()
            if outcome.prompt_tokens:
                metrics.PROMPT_TOKENS.labels(model).inc(outcome.prompt_tokens)
            if outcome.completion_tokens:
                metrics.COMPLETION_TOKENS.labels(model).inc(outcome.completion_tokens)
                self._count_usage(outcome.completion_tokens)
            if recorded == "started":
                await self._record(self.recorder.finished, generation)

    def _count_usage(self, completion_tokens: int) -> None:
        """Generated tokens count against the caller's tokens-per-minute limits (at the gateway)."""
        principal, call = principal_var.get(), current_call.get()
        if self.auth is not None and principal is not None:
            self.auth.record_usage(principal, call.client_address if call else "", completion_tokens)

    async def _record(self, hook: Callable[[Generation], Awaitable[None]], generation: Generation) -> None:
        try:
            await hook(generation)
        except Exception:
            # Recording must never turn a served answer into an error (the recorder spools durably).
            log.exception("recording request %s failed", generation.request_id)

    async def collect(self, request: GenerationRequest, request_id: str, deadline: Deadline) -> Generation:
        """Runs a generation to its end (unary APIs)."""
        generation: Generation | None = None
        async with aclosing(self.stream(request, request_id, deadline)) as pieces:
            async for _piece, current in pieces:
                generation = current
        if generation is None:
            raise RpcError(grpc.StatusCode.INTERNAL, "the engine produced no response", "ENGINE_ERROR")
        return generation
