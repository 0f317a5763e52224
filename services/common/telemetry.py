"""OpenTelemetry set-up: W3C trace context in and out of every process; exporter chosen by config."""

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
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.common.config import TelemetrySettings

HEALTH_SERVICE = "grpc.health.v1.Health"
# Health probes arrive every second from Envoy; tracing them would drown the real traffic.
_NOT_HEALTH = filters.negate(filters.service_name(HEALTH_SERVICE))
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def configure_tracing(service: str, settings: TelemetrySettings) -> None:
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": f"ferry-{service}", "service.namespace": settings.service_namespace}
        )
    )
    if settings.exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    trace.set_tracer_provider(provider)


def current_trace_id() -> str:
    """The current span's trace id as W3C writes it (32 hex digits); empty outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


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
