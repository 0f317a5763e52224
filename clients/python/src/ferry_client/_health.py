"""Typed stubs of grpc.health.v1 (grpcio-health-checking's own stubs are untyped)."""

from __future__ import annotations

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

_CHECK = "/grpc.health.v1.Health/Check"
_WATCH = "/grpc.health.v1.Health/Watch"
_Req = health_pb2.HealthCheckRequest
_Resp = health_pb2.HealthCheckResponse


class HealthStub:
    """`grpc.health.v1.Health`: `Check` (SERVING / NOT_SERVING of a service, "" for the server) and
    `Watch` (a stream of changes)."""

    Check: grpc.UnaryUnaryMultiCallable[_Req, _Resp]
    Watch: grpc.UnaryStreamMultiCallable[_Req, _Resp]

    def __init__(self, channel: grpc.Channel) -> None:
        self.Check = channel.unary_unary(
            _CHECK, request_serializer=_Req.SerializeToString, response_deserializer=_Resp.FromString
        )
        self.Watch = channel.unary_stream(
            _WATCH, request_serializer=_Req.SerializeToString, response_deserializer=_Resp.FromString
        )


class AsyncHealthStub:
    """`HealthStub` for grpc.aio channels."""

    Check: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp]
    Watch: grpc.aio.UnaryStreamMultiCallable[_Req, _Resp]

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Check = channel.unary_unary(
            _CHECK, request_serializer=_Req.SerializeToString, response_deserializer=_Resp.FromString
        )
        self.Watch = channel.unary_stream(
            _WATCH, request_serializer=_Req.SerializeToString, response_deserializer=_Resp.FromString
        )
