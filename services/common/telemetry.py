"""OpenTelemetry set-up: W3C trace context in and out of every process; exporter, head sampling and
content capture chosen by config (`telemetry.*`, docs/observability.md)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, TraceFlags

from services.common.config import TelemetrySettings

HEALTH_SERVICE = "grpc.health.v1.Health"
# Health probes arrive every second from Envoy; tracing them would drown the real traffic.
_NOT_HEALTH = filters.negate(filters.service_name(HEALTH_SERVICE))
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


# This process's tracing choices (configure_tracing sets them once, at start).
_enabled = False
_capture_content = False
TRACER_NAME = "ferry"


def configure_tracing(service: str, settings: TelemetrySettings) -> None:
    global _enabled, _capture_content
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": f"ferry-{service}", "service.namespace": settings.service_namespace}
        ),
        # Head sampling for traces that start here; a caller's sampled flag decides for its own.
        sampler=ParentBased(TraceIdRatioBased(settings.sampling_ratio)),
    )
    if settings.exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    _enabled = settings.enabled
    _capture_content = settings.enabled and settings.capture_content


def tracing_enabled() -> bool:
    """True when spans go somewhere (an exporter is configured): only then are ferry's own spans made."""
    return _enabled


def capture_content() -> bool:
    """True when an operator asked for prompts and generated text on spans (`telemetry.capture_content`)."""
    return _capture_content


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def current_trace_id() -> str:
    """The current span's trace id as W3C writes it (32 hex digits); empty outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def traceparent(span: Span | None = None) -> str:
    """`span`'s (default: the current span's) context as a W3C `traceparent`; empty outside any trace.
    What a spooled record keeps of the request it carries, so that its delivery can link to it."""
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def link_to(parent: str) -> Link | None:
    """A span link to the context a `traceparent` names: None for an empty or malformed one, and for
    one not sampled (its trace was never recorded: nothing to link to)."""
    if not parent:
        return None
    ctx = trace.get_current_span(propagate.extract({"traceparent": parent})).get_span_context()
    return Link(ctx) if ctx.is_valid and ctx.trace_flags.sampled else None


def trace_headers(span: Span | None = None) -> dict[str, str]:
    """W3C trace headers for an outgoing call: `span`'s context (default: the current one)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
    return carrier


def exemplar() -> dict[str, str] | None:
    """The current sampled span as a Prometheus exemplar (`trace_id`, `span_id`), when tracing is on."""
    if not _enabled:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


def server_interceptors(settings: TelemetrySettings) -> list[grpc.aio.ServerInterceptor]:
    """Spans for every RPC when they go somewhere; otherwise only the trace context.

    With no exporter, OpenTelemetry's interceptor would build, time and drop a span per RPC (and
    format a traceback for every cancelled or failed one); a trace id is all that is used then:
    logs, audit events and transaction records carry it, and Triton receives it.
    """
    if settings.exporter == "none":
        return [TraceContextInterceptor()]
    return [aio_server_interceptor(filter_=_NOT_HEALTH)]


class TraceContextInterceptor(grpc.aio.ServerInterceptor):
    """Makes each RPC's trace context current without recording spans: the caller's (W3C
    `traceparent`) with a span id of our own, or a new trace."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        if not method.startswith(f"/{HEALTH_SERVICE}/"):
            # grpc.aio runs the interceptors and then the handler in the RPC's own task, so what is
            # attached here is current for the handler and ends with the task (nothing to detach).
            otel_context.attach(trace.set_span_in_context(NonRecordingSpan(_span_context(details))))
        return await continuation(details)


def _span_context(details: grpc.HandlerCallDetails) -> SpanContext:
    metadata = details.invocation_metadata or ()  # type: ignore[attr-defined]
    carrier = {key: value for key, value in metadata if key in _TRACE_HEADERS}
    parent = trace.get_current_span(propagate.extract(carrier)).get_span_context() if carrier else None
    span_id = random.getrandbits(64) or 1
    if parent is not None and parent.is_valid:
        return SpanContext(parent.trace_id, span_id, False, parent.trace_flags, parent.trace_state)
    # Sampled, as the SDK's default sampler would have it: Triton's own tracing decides on its side.
    return SpanContext(random.getrandbits(128) or 1, span_id, False, TraceFlags(TraceFlags.SAMPLED))


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return list(aio_client_interceptors(filter_=_NOT_HEALTH))
