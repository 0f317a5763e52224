"""OTLP trace receivers in this process: the gRPC TraceService (what ferry's services and Envoy export
to) and OTLP/HTTP `POST /v1/traces` (the only exporter Triton has, which sends protobuf JSON).

`OtlpReceiver.take` gets every export request; `OtlpSink` (benchmarks) counts the spans and drops
them, so that tracing is measured against a collector that keeps up. tests/observability keeps them.
"""

from __future__ import annotations

import base64
import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from launcher.ports import free_ports

ExportRequest = trace_service_pb2.ExportTraceServiceRequest
# OTLP/JSON writes ids as hex (protobuf's JSON mapping would read base64 for bytes).
_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId"})


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.grpc_port, self.http_port = free_ports(2)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), _handler(self))

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

    def take(self, request: ExportRequest) -> None:
        """One export, from either protocol."""

    def Export(self, request: ExportRequest, context: Any) -> Any:
        self.take(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpSink(OtlpReceiver):
    def __init__(self) -> None:
        super().__init__()
        self.spans = 0
        self._lock = threading.Lock()

    def take(self, request: ExportRequest) -> None:
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += count


def parse_http_export(body: bytes, content_type: str) -> ExportRequest:
    request = ExportRequest()
    if "json" in content_type:
        json_format.ParseDict(_ids_as_base64(json.loads(body)), request, ignore_unknown_fields=True)
    else:
        request.ParseFromString(body)
    return request


def _ids_as_base64(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode() if k in _ID_FIELDS and v else _ids_as_base64(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_ids_as_base64(v) for v in value]
    return value


def _handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path.rstrip("/").endswith("/v1/traces"):
                receiver.take(parse_http_export(body, self.headers.get("content-type", "")))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
