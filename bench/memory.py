"""Memory growth of a process over a soak run: from its samples to a verdict and a table.

Pure functions over `Sample`s (no processes involved), so the arithmetic is unit-tested on its own.
Growth is judged as Triton's qa/L0_memory_growth judges it: from a point after the start (there the
middle of the run, here the end of the warm-up, when caches, pools and allocator arenas have filled)
to the end. A process that was restarted during the run cannot be judged (its memory started over).
A group of processes sharing memory (PostgreSQL's backends and its shared buffers) is judged on its
anonymous memory (heap, stacks: RssAnon): summed RSS counts a shared page once per process that
touched it, which is growth of nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MB = 1024 * 1024
# Host memory one saved slot state takes in llama.cpp's prompt cache: Gemma 3 270M, prompts of up to 400
# characters (its log "making room for prompt cache entry ... size = 1.195 MiB"; 1.22 MB per request
# with the cache unbounded). See backends/llamacpp/README.md, "Memory".
CACHED_STATE_MB = 1.2
# Requests per cached state a warm-up must see: states of short prompts are smaller than the average.
FILL_MARGIN = 2


@dataclass(frozen=True)
class Sample:
    """One reading of one process: seconds since the traffic started, resident bytes, and of those the
    anonymous ones (RssAnon: heap and stacks, neither file pages nor shared memory)."""

    t: float
    rss: int
    anon: int = 0


@dataclass(frozen=True)
class Growth:
    """One process's row of the soak table (MB = MiB)."""

    process: str
    warm_mb: float  # RSS at the end of the warm-up
    end_mb: float  # RSS at the last sample
    growth_mb: float  # end - warm
    max_mb: float  # largest RSS seen
    slope_mb_min: float  # least-squares RSS trend after the warm-up
    anon_growth_mb: float  # the same growth in anonymous memory
    restarted: bool = False
    by_anon: bool = False  # judged on anonymous growth instead of RSS growth (a group sharing memory)

    @property
    def judged_mb(self) -> float:
        """The growth the threshold applies to."""
        return self.anon_growth_mb if self.by_anon else self.growth_mb

    def exceeds(self, threshold_mb: float) -> bool:
        """True when this process fails the soak: grew more than the threshold, or was restarted."""
        return self.restarted or self.judged_mb > threshold_mb


def baseline(samples: Sequence[Sample], warmup_s: float) -> Sample:
    """The sample that ends the warm-up: the last one taken at or before `warmup_s` (else the first)."""
    if not samples:
        raise ValueError("no samples")
    before = [s for s in samples if s.t <= warmup_s]
    return before[-1] if before else samples[0]


def requests_to_fill_cache(prompt_cache_mib: int, slots: int) -> int:
    """Finished requests after which llama.cpp's prompt cache has reached its bound (with a margin).

    A slot's state is saved to the cache when the slot takes a new prompt, so the first request on each
    slot saves nothing; each later one saves about CACHED_STATE_MB.
    """
    return slots + FILL_MARGIN * math.ceil(prompt_cache_mib / CACHED_STATE_MB)


def warmup_end(min_s: float, need: int, finished: Sequence[tuple[float, int]]) -> float | None:
    """When the warm-up ends: `min_s`, or later if by then fewer than `need` requests had finished (the
    first reading of (seconds, finished requests) that has them). None when no reading has them: the
    run was too short to judge.
    """
    for t, count in finished:
        if count >= need:
            return max(t, min_s)
    return None


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute; 0 with fewer than two times."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


def growth(
    process: str,
    samples: Sequence[Sample],
    warmup_s: float,
    *,
    restarted: bool = False,
    by_anon: bool = False,
) -> Growth:
    """The table row of one process from its samples (in time order)."""
    warm = baseline(samples, warmup_s)
    end = samples[-1]
    after = [s for s in samples if s.t >= warm.t]
    return Growth(
        process=process,
        warm_mb=warm.rss / MB,
        end_mb=end.rss / MB,
        growth_mb=(end.rss - warm.rss) / MB,
        max_mb=max(s.rss for s in samples) / MB,
        slope_mb_min=slope_per_minute([(s.t, s.rss / MB) for s in after]),
        anon_growth_mb=(end.anon - warm.anon) / MB,
        restarted=restarted,
        by_anon=by_anon,
    )


def failures(rows: Iterable[Growth], threshold_mb: float) -> list[Growth]:
    """The processes that fail the soak (the run fails when there is any)."""
    return [row for row in rows if row.exceeds(threshold_mb)]


def table(rows: Sequence[Growth], threshold_mb: float) -> str:
    """A Markdown table: one line per process, the failing ones marked."""
    lines = [
        "| process | RSS end of warm-up (MB) | RSS end (MB) | growth after warm-up (MB) "
        "| trend (MB/min) | anon growth (MB) | max RSS (MB) | |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        mark = "RESTARTED" if row.restarted else ("FAIL" if row.exceeds(threshold_mb) else "ok")
        if row.by_anon and not row.restarted:
            mark += " (by anon)"
        lines.append(
            f"| {row.process} | {row.warm_mb:.1f} | {row.end_mb:.1f} | {row.growth_mb:+.1f} "
            f"| {row.slope_mb_min:+.2f} | {row.anon_growth_mb:+.1f} | {row.max_mb:.1f} | {mark} |"
        )
    return "\n".join(lines)
