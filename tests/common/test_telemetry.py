"""Trace context without an exporter: every RPC still has a trace id (logs, audit events and
transaction records carry it; Triton receives it), the caller's when it sends one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry import propagate, trace

from services.common.config import TelemetrySettings
from services.common.telemetry import TraceContextInterceptor, server_interceptors

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_PARENT = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"


def _current() -> bytes:
    """The trace context a handler would hand on (to Triton, say), as a `traceparent` header."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "").encode()


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _current()


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield _current()


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=server_interceptors(TelemetrySettings(exporter="none")))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Trace", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


def _parse(traceparent: bytes) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = traceparent.decode().split("-")
    assert version == "00" and int(trace_id, 16) and int(span_id, 16)
    return trace_id, span_id, flags


def test_no_exporter_means_no_span_recording_interceptor() -> None:
    assert [type(i) for i in server_interceptors(TelemetrySettings(exporter="none"))] == [
        TraceContextInterceptor
    ]
    assert not isinstance(
        server_interceptors(TelemetrySettings(exporter="console"))[0], TraceContextInterceptor
    )


async def test_each_call_gets_a_trace_of_its_own(channel: grpc.aio.Channel) -> None:
    unary = channel.unary_unary("/test.Trace/Unary")
    first, second = _parse(await unary(b"")), _parse(await unary(b""))
    assert first[0] != second[0]
    assert first[2] == "01"
    # Nothing leaks into the caller's (here: the test's) context.
    assert not trace.get_current_span().get_span_context().is_valid


async def test_the_callers_trace_is_continued(channel: grpc.aio.Channel) -> None:
    metadata = (("traceparent", CALLER_PARENT),)
    trace_id, span_id, flags = _parse(await channel.unary_unary("/test.Trace/Unary")(b"", metadata=metadata))
    assert (trace_id, flags) == (CALLER_TRACE, "01") and span_id != "b7ad6b7169203331"
    pieces = [_parse(p) async for p in channel.unary_stream("/test.Trace/Stream")(b"", metadata=metadata)]
    assert [p[0] for p in pieces] == [CALLER_TRACE, CALLER_TRACE]


async def test_a_malformed_traceparent_starts_a_new_trace(channel: grpc.aio.Channel) -> None:
    reply = await channel.unary_unary("/test.Trace/Unary")(b"", metadata=(("traceparent", "garbage"),))
    assert _parse(reply)[0] != CALLER_TRACE


def test_the_otlp_exporter_imports() -> None:
    # xds-protos (the gateway's ext_authz types) carries an older opentelemetry/proto; the install step
    # makes opentelemetry-proto's own copy win, without which no stack with an OTLP exporter starts.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    assert OTLPSpanExporter is not None
