"""OpenTelemetry set-up: W3C trace context in and out of every process; exporter chosen by config."""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from services.common.config import TelemetrySettings

# Health probes arrive every second from Envoy; tracing them would drown the real traffic.
_NOT_HEALTH = filters.negate(filters.service_name("grpc.health.v1.Health"))


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


def server_interceptor() -> grpc.aio.ServerInterceptor:
    return aio_server_interceptor(filter_=_NOT_HEALTH)  # type: ignore[no-any-return]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return list(aio_client_interceptors(filter_=_NOT_HEALTH))
