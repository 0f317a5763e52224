"""One set of metric definitions for every client (aiperf's records, the gRPC and Triton clients).

The definitions are the field's (aiperf, vLLM's benchmark): TTFT = time from sending the request to
the first chunk with content; ITL = (e2e - TTFT) / (output tokens - 1) per request; e2e = time to the
last chunk; output tokens/s and requests/s = totals over the span from the first request's start
to the last request's end. Percentiles are over requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

STATS = ("avg", "p50", "p90", "p99")
LATENCIES = ("ttft_ms", "itl_ms", "e2e_ms")
RATES = ("output_tok_s", "req_s")


@dataclass(frozen=True)
class Record:
    """One measured request; times in seconds on one monotonic clock."""

    start: float
    end: float
    ttft: float | None
    output_tokens: int
    error: str | None = None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itl(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def describe(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {stat: math.nan for stat in STATS}
    return {
        "avg": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """Metrics of one run (one system at one concurrency)."""
    ok = [r for r in records if r.error is None]
    span = (max(r.end for r in ok) - min(r.start for r in ok)) if ok else math.nan
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "output_tokens": tokens,
        "duration_s": span,
        "ttft_ms": describe([r.ttft * 1000 for r in ok if r.ttft is not None]),
        "itl_ms": describe([itl * 1000 for r in ok if (itl := r.itl) is not None]),
        "e2e_ms": describe([r.e2e * 1000 for r in ok]),
        "output_tok_s": tokens / span if span and span > 0 else math.nan,
        "req_s": len(ok) / span if span and span > 0 else math.nan,
    }


def combine(runs: Iterable[tuple[Sequence[Record], dict[str, Any]]]) -> dict[str, Any]:
    """Repeated runs of one cell: latency percentiles over all their requests, rates averaged."""
    runs = list(runs)
    pooled = [r for records, _ in runs for r in records]
    combined = summarize(pooled)
    for rate in RATES:
        values = [float(summary[rate]) for _, summary in runs]  # type: ignore[arg-type]
        combined[rate] = sum(values) / len(values) if values else math.nan
        combined[f"{rate}_runs"] = values
    return combined
