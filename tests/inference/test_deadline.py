"""The caller's deadline (pure logic): the gRPC deadline, Envoy's expected timeout, the earlier wins."""

from __future__ import annotations

from typing import Any

import pytest

from services.inference.deadline import RequestDeadline


class Context:
    def __init__(self, grpc_remaining: float | None, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.grpc_remaining = grpc_remaining
        self.metadata = metadata

    def time_remaining(self) -> float | None:
        return self.grpc_remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


def deadline(grpc_remaining: float | None, edge_ms: str | None = None) -> RequestDeadline:
    metadata = (("x-envoy-expected-rq-timeout-ms", edge_ms),) if edge_ms is not None else ()
    context: Any = Context(grpc_remaining, metadata)
    return RequestDeadline(context)


def test_no_deadline_at_all() -> None:
    assert deadline(None).time_remaining() is None


def test_grpc_deadline_alone() -> None:
    assert deadline(3.0).time_remaining() == 3.0


def test_edge_timeout_for_rest_callers() -> None:
    remaining = deadline(None, "120000").time_remaining()
    assert remaining is not None and 119.0 < remaining <= 120.0


@pytest.mark.parametrize(
    ("grpc_remaining", "edge_ms", "expected"), [(2.0, "120000", 2.0), (300.0, "5000", 5.0)]
)
def test_the_earlier_wins(grpc_remaining: float, edge_ms: str, expected: float) -> None:
    remaining = deadline(grpc_remaining, edge_ms).time_remaining()
    assert remaining is not None and expected - 0.5 < remaining <= expected


@pytest.mark.parametrize("edge_ms", ["0", "abc", ""])
def test_meaningless_edge_values_are_ignored(edge_ms: str) -> None:
    assert deadline(None, edge_ms).time_remaining() is None
