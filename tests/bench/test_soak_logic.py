"""The soak's arithmetic and decisions (bench/memory.py, bench/processes.py, bench/soak_traffic.py),
without a stack: growth from samples, the threshold verdict, naming Triton's stubs, fresh prompts.

`make soak` itself (a real stack under traffic for minutes) is run by hand; see bench/README.md.
"""

from __future__ import annotations

import random

import pytest

from bench.memory import (
    MB,
    Sample,
    baseline,
    failures,
    growth,
    requests_to_fill_cache,
    slope_per_minute,
    table,
    warmup_end,
)
from bench.processes import stub_instance
from bench.soak_traffic import PROMPT_CHARS, prompt


def steady(start_mb: float, per_minute_mb: float, minutes: int, every_s: float = 10.0) -> list[Sample]:
    """Samples of a process growing linearly, one every `every_s` seconds."""
    count = int(minutes * 60 / every_s) + 1
    return [
        Sample(t=i * every_s, rss=int((start_mb + per_minute_mb * i * every_s / 60) * MB))
        for i in range(count)
    ]


def test_growth_is_measured_from_the_end_of_the_warm_up() -> None:
    # 100 MB in the first minute (model load, caches filling), then flat: no growth after warm-up.
    samples = [Sample(0, 400 * MB), Sample(30, 480 * MB), Sample(60, 500 * MB)]
    samples += [Sample(60 + 10 * i, 500 * MB + i * 1024) for i in range(1, 55)]
    row = growth("stub", samples, warmup_s=60)
    assert row.warm_mb == pytest.approx(500)
    assert row.growth_mb == pytest.approx(54 * 1024 / MB)
    assert row.max_mb == pytest.approx(samples[-1].rss / MB)
    assert not row.exceeds(20)


def test_a_steady_leak_fails_and_its_trend_is_reported_per_minute() -> None:
    # The stub: ~24 MB a minute for 10 minutes.
    row = growth("triton stub gemma-3-270m_0_0", steady(1030, 24, 10), warmup_s=60)
    assert row.growth_mb == pytest.approx(24 * 9)
    assert row.slope_mb_min == pytest.approx(24)
    assert row.exceeds(20)
    assert [r.process for r in failures([row], 20)] == ["triton stub gemma-3-270m_0_0"]


def test_growth_at_the_threshold_passes_and_above_fails() -> None:
    flat = [Sample(0, 100 * MB), Sample(60, 100 * MB)]
    assert not growth("p", [*flat, Sample(600, 120 * MB)], 60).exceeds(20)
    assert growth("p", [*flat, Sample(600, 120 * MB + 1)], 60).exceeds(20)


def test_shrinking_memory_is_negative_growth() -> None:
    row = growth("inference", [Sample(0, 90 * MB), Sample(60, 88 * MB), Sample(600, 85 * MB)], 60)
    assert row.growth_mb == pytest.approx(-3)
    assert row.max_mb == pytest.approx(90)
    assert not row.exceeds(20)


def test_a_restarted_process_fails_whatever_its_memory() -> None:
    row = growth(
        "models", [Sample(0, 80 * MB), Sample(60, 80 * MB), Sample(600, 60 * MB)], 60, restarted=True
    )
    assert row.exceeds(20)
    assert "RESTARTED" in table([row], 20)


def test_a_group_sharing_memory_is_judged_on_anonymous_memory() -> None:
    # PostgreSQL's backends touching more shared buffers: summed RSS grows, their heaps do not.
    samples = [Sample(0, 120 * MB, 40 * MB), Sample(60, 125 * MB, 40 * MB), Sample(600, 160 * MB, 41 * MB)]
    row = growth("postgres children", samples, 60, by_anon=True)
    assert row.growth_mb == pytest.approx(35)
    assert row.judged_mb == pytest.approx(1)
    assert not row.exceeds(20)
    assert growth("postgres children", samples, 60).exceeds(20)  # by RSS it would fail


def test_the_baseline_is_the_last_sample_of_the_warm_up() -> None:
    samples = [Sample(0, 1), Sample(9.8, 2), Sample(20.1, 3), Sample(59.9, 4), Sample(70, 5)]
    assert baseline(samples, 60).rss == 4
    # A warm-up shorter than the first interval falls back to the first sample.
    assert baseline([Sample(5, 7), Sample(15, 8)], 1).rss == 7
    with pytest.raises(ValueError):
        baseline([], 60)


def test_slope_of_too_few_points_is_zero() -> None:
    assert slope_per_minute([]) == 0
    assert slope_per_minute([(10.0, 5.0)]) == 0
    assert slope_per_minute([(10.0, 5.0), (10.0, 9.0)]) == 0
    assert slope_per_minute([(0.0, 0.0), (30.0, 1.0)]) == pytest.approx(2)


def test_the_table_has_a_row_per_process_with_its_verdict() -> None:
    rows = [growth("envoy", steady(70, 0.01, 10), 60), growth("triton stub x_0_0", steady(500, 24, 10), 60)]
    lines = table(rows, 20).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| envoy |") and lines[2].endswith("| ok |")
    assert (
        lines[3].startswith("| triton stub x_0_0 |")
        and "+216.0" in lines[3]
        and lines[3].endswith("| FAIL |")
    )


def test_the_warm_up_waits_for_enough_requests_to_fill_the_prompt_cache() -> None:
    # gemma-3-270m: 4 slots, 32 MiB of ~1.2 MiB states, twice over.
    need = requests_to_fill_cache(prompt_cache_mib=32, slots=4)
    assert need == 4 + 2 * 27
    # A slow machine: 20 requests a minute, so the cache is still filling after one minute.
    slow = [(t, t // 3) for t in range(0, 601, 10)]
    end = warmup_end(60, need, slow)
    assert end is not None and end > 60 and end // 3 >= need
    # Baseline at that reading: the growth up to it (the cache filling) is not judged.
    cache_filling = [Sample(t, int((500 + min(t, end) * 32 / end) * MB)) for t, _ in slow]
    assert growth("triton stub x_0_0", cache_filling, end).growth_mb == pytest.approx(0)
    assert growth("triton stub x_0_0", cache_filling, 60).growth_mb > 20, "a 1-minute warm-up would fail"


def test_a_fast_machine_keeps_the_one_minute_warm_up() -> None:
    fast = [(t, t * 2) for t in range(0, 601, 10)]
    assert warmup_end(60, requests_to_fill_cache(32, 4), fast) == 60


def test_a_run_that_never_fills_the_cache_has_no_end_of_warm_up() -> None:
    assert warmup_end(60, requests_to_fill_cache(32, 4), [(t, 1) for t in range(0, 121, 10)]) is None
    assert requests_to_fill_cache(prompt_cache_mib=0, slots=4) == 4, "cache off: the slots only"


def test_a_backend_stub_is_named_by_its_model_instance() -> None:
    argv = [
        "/work/build/triton/backends/python/triton_python_backend_stub",
        "/work/build/triton/backends/llamacpp/model.py",
        "triton_python_backend_shm_region_ferry1_abc",
        "1048576",
        "1048576",
        "4242",
        "/work/build/triton/backends/python",
        "336",
        "gemma-3-270m_0_0",
        "/work/build/triton/backends/llamacpp",
    ]
    assert stub_instance(argv) == "gemma-3-270m_0_0"
    assert stub_instance(["/bin/sh", "-c", "sleep 1"]) is None
    assert stub_instance([]) is None


def test_prompts_are_fresh_and_of_every_length() -> None:
    rng = random.Random(7)
    texts = [prompt(rng, serial) for serial in range(1, 2001)]
    lengths = [len(t) for t in texts]
    assert min(lengths) >= PROMPT_CHARS[0] and max(lengths) <= PROMPT_CHARS[1]
    assert min(lengths) < 20 and max(lengths) > 380
    long_enough = [t for t in texts if len(t) >= 8]
    assert len(set(long_enough)) == len(long_enough)
