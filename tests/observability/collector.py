"""A real OTLP trace receiver in the test process: the gRPC TraceService (what ferry's services and
Envoy export to) and OTLP/HTTP `POST /v1/traces` (the only exporter Triton has). It keeps every span
with the `service.name` of the resource that sent it."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from launcher.ports import free_ports


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    span: trace_pb2.Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def kind(self) -> int:
        return self.span.kind

    @property
    def attributes(self) -> dict[str, Any]:
        return {a.key: _value(a.value) for a in self.span.attributes}

    @property
    def events(self) -> list[str]:
        return [e.name for e in self.span.events]

    @property
    def links(self) -> list[tuple[str, str]]:
        return [(link.trace_id.hex(), link.span_id.hex()) for link in self.span.links]

    def __repr__(self) -> str:
        return f"<{self.service} {self.name!r} {self.span_id} parent={self.parent_id or '-'}>"


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.grpc_port, self.http_port = free_ports(2)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), _http_handler(self))

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    def start(self) -> None:
        self._server.start()
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def Export(self, request: Any, context: Any) -> Any:
        self.take(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope in resource_spans.scope_spans:
                received += [ReceivedSpan(service, span) for span in scope.spans]
        with self._lock:
            self.spans += received

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def linked_to(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if any(t == trace_id for t, _ in s.links)]

    def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


# OTLP/JSON writes ids as hex (not protobuf JSON's base64 for bytes); Triton sends JSON.
_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId"})


def _ids_as_base64(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode() if k in _ID_FIELDS and v else _ids_as_base64(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_ids_as_base64(v) for v in value]
    return value


def _http_handler(collector: Collector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path.rstrip("/").endswith("/v1/traces"):
                request = trace_service_pb2.ExportTraceServiceRequest()
                if "json" in self.headers.get("content-type", ""):
                    json_format.ParseDict(
                        _ids_as_base64(json.loads(body)), request, ignore_unknown_fields=True
                    )
                else:
                    request.ParseFromString(body)
                collector.take(request)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
