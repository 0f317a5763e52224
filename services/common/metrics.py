"""Prometheus metrics shared by every service: RPCs handled by method and code, and their latency.

Latency histograms are `TracedHistogram`s: with tracing on, each observation made inside a sampled
span carries its trace id as an exemplar, which the OpenMetrics exposition shows (the metrics port
answers OpenMetrics to `Accept: application/openmetrics-text`, Prometheus' default with exemplar
storage on), so a spike on a dashboard leads to a trace.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from services.common.telemetry import exemplar

Metric = TypeVar("Metric", bound=MetricWrapperBase)
# Labelled children already looked up, by metric and label values (`child`).
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Metric, *values: str) -> Metric:
    """`metric.labels(*values)`, looked up once: `labels` validates and locks on every call, which on
    the request and token paths adds up. The label values must be bounded (as every label's are)."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found  # type: ignore[no-any-return]


class TracedHistogram(Histogram):
    """A Histogram whose observations carry the current trace as their exemplar (when tracing is on)."""

    def observe(self, amount: float, exemplar_labels: dict[str, str] | None = None) -> None:  # type: ignore[override]
        super().observe(amount, exemplar_labels or exemplar())


# Named after go-grpc-prometheus so existing dashboards and habits carry over.
RPC_HANDLED = Counter(
    "ferry_grpc_server_handled",
    "RPCs completed on the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_LATENCY = TracedHistogram(
    "ferry_grpc_server_handling_seconds",
    "Time from receiving an RPC to finishing it, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RPC_IN_FLIGHT = Gauge(
    "ferry_grpc_server_in_flight",
    "RPCs being handled now.",
    ["grpc_service"],
)


def start_metrics_server(host: str, port: int) -> None:
    start_http_server(port, addr=host)
