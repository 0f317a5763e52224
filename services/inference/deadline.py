"""The caller's deadline: the gRPC deadline, or the edge's own timeout for REST callers.

A REST call through Envoy carries no gRPC deadline, but Envoy tells the upstream how long it will
wait (`x-envoy-expected-rq-timeout-ms`, the route timeout); past it Envoy answers 504 anyway, so
there is no point letting Triton generate longer. The earlier of the two wins.
"""

from __future__ import annotations

import time
from typing import Protocol

import grpc

from services.common.context import metadata_value

EDGE_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"


class RequestDeadline:
    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context
        self.edge_deadline: float | None = None
        raw = metadata_value(context.invocation_metadata(), EDGE_TIMEOUT_HEADER)
        if raw and raw.isdigit() and int(raw) > 0:
            self.edge_deadline = time.monotonic() + int(raw) / 1000

    def time_remaining(self) -> float | None:
        remaining = self.context.time_remaining()
        if self.edge_deadline is not None:
            edge = max(0.0, self.edge_deadline - time.monotonic())
            remaining = edge if remaining is None else min(remaining, edge)
        return remaining


class Deadline(Protocol):
    """Seconds the caller still waits; None when it waits forever."""

    def time_remaining(self) -> float | None: ...
