"""What watches generations without taking part in them: Prometheus metrics (with trace exemplars),
the request span's events and attributes, and the usage reported to the gateway. The pipeline tells
each observer what happened; observers never fail a request."""

from __future__ import annotations

from typing import Protocol

from ferry.auth.v1.auth_pb2 import Principal
from opentelemetry import trace

from services.common.auth import principal_var
from services.common.errors import RpcError
from services.common.interceptor import current_call
from services.common.metrics import child
from services.common.telemetry import tracing_enabled
from services.inference import metrics
from services.inference.domain import UNKNOWN_MODEL, Api, Exchange, Piece
from services.inference.tracing import ADMISSION_WAIT, ADMITTED_EVENT, FIRST_TOKEN_EVENT


class GenerationObserver:
    """Hooks of one generation's life; each does nothing unless overridden."""

    def refused(self, api: Api, model: str, err: RpcError) -> None:
        """The request was refused before it became a generation (it did not parse)."""

    def admitted(self, exchange: Exchange, waited: float) -> None:
        """The request got an engine slot after waiting `waited` seconds."""

    def piece(self, exchange: Exchange, piece: Piece, gap: float | None) -> None:
        """A piece arrived `gap` seconds after the previous one (None: the first piece)."""

    def ended(self, exchange: Exchange) -> None:
        """The generation is over (answered, failed or abandoned; see `exchange.outcome`)."""


class KnownModels(Protocol):
    def is_known(self, name: str) -> bool: ...


def outcome_label(exchange: Exchange) -> str:
    """`ok`, or the lower-case gRPC code the request ended with (`cancelled`, `invalid_argument`...)."""
    return exchange.outcome.error_code.lower() or "ok"


class MetricsObserver(GenerationObserver):
    """The `ferry_inference_*` metrics (names and labels: services.inference.metrics)."""

    def __init__(self, models: KnownModels) -> None:
        self.models = models

    def refused(self, api: Api, model: str, err: RpcError) -> None:
        # A label only for a model known to exist: caller-chosen names would create unbounded series.
        label = model if self.models.is_known(model) else UNKNOWN_MODEL
        child(metrics.REQUESTS, label, api.value, err.code.name.lower()).inc()

    def admitted(self, exchange: Exchange, waited: float) -> None:
        child(metrics.QUEUE_DURATION, exchange.model_label).observe(waited)

    def piece(self, exchange: Exchange, piece: Piece, gap: float | None) -> None:
        if exchange.cache == "hit":
            return  # an answer from the response cache says nothing of the engine's latencies
        model = exchange.model_label
        if gap is None:
            ttft = exchange.outcome.time_to_first_token
            if ttft is not None:
                child(metrics.TIME_TO_FIRST_TOKEN, model).observe(ttft)
        elif piece.tokens:
            # A piece of k tokens after a gap g (coalesced: services.inference.coalesce) counts as k
            # gaps of g / k.
            histogram, share = child(metrics.INTER_TOKEN_LATENCY, model), gap / piece.tokens
            for _ in range(piece.tokens):
                histogram.observe(share)

    def ended(self, exchange: Exchange) -> None:
        model, outcome = exchange.model_label, exchange.outcome
        label = outcome_label(exchange)
        child(metrics.REQUESTS, model, exchange.request.api.value, label).inc()
        if label == "ok":
            if outcome.latency is not None:
                child(metrics.E2E_LATENCY, model).observe(outcome.latency)
            child(metrics.FINISHED, model, outcome.finish_reason or "unknown").inc()
        if outcome.prompt_tokens:
            child(metrics.PROMPT_TOKENS, model).inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            child(metrics.COMPLETION_TOKENS, model).inc(outcome.completion_tokens)


class TracingObserver(GenerationObserver):
    """The request's server span (current while the pipeline runs): the admission wait and the first
    token as events, the model, usage and finish reason as gen_ai.* attributes. The engine's CLIENT
    span (services.inference.tracing) gets the admission wait too, through ADMISSION_WAIT."""

    def admitted(self, exchange: Exchange, waited: float) -> None:
        ADMISSION_WAIT.set(waited)
        if tracing_enabled():
            trace.get_current_span().add_event(ADMITTED_EVENT, {"ferry.admission.wait_seconds": waited})

    def piece(self, exchange: Exchange, piece: Piece, gap: float | None) -> None:
        if gap is None and tracing_enabled():
            trace.get_current_span().add_event(FIRST_TOKEN_EVENT)

    def ended(self, exchange: Exchange) -> None:
        if not tracing_enabled():
            return
        span, outcome = trace.get_current_span(), exchange.outcome
        if not span.is_recording():
            return
        span.set_attributes(
            {
                "ferry.request_id": exchange.request_id,
                "gen_ai.request.model": exchange.model_label,
                "gen_ai.usage.input_tokens": outcome.prompt_tokens,
                "gen_ai.usage.output_tokens": outcome.completion_tokens,
            }
        )
        if outcome.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [outcome.finish_reason])
        if outcome.error_code:
            span.set_attribute("error.type", outcome.error_code)


class UsageSink(Protocol):
    """Where generated tokens are counted against the caller's tokens-per-minute limits (the gateway,
    through `services.common.auth.AuthObserver`, which skips callers without such a limit)."""

    def record_usage(self, principal: Principal, address: str, completion_tokens: int) -> None: ...


class UsageReporter(GenerationObserver):
    def __init__(self, sink: UsageSink) -> None:
        self.sink = sink

    def ended(self, exchange: Exchange) -> None:
        tokens = exchange.outcome.completion_tokens
        principal, call = principal_var.get(), current_call.get()
        if tokens and principal is not None:
            self.sink.record_usage(principal, call.client_address if call else "", tokens)
