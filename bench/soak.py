"""`make soak`: mixed traffic against the whole platform for N minutes, watching every process's memory.

Starts ferry as `make bench` does (bench.platform: the launcher's own Stack, free ports, a scratch
home, authentication on, the admin key), runs bench.soak_traffic's mix at a fixed concurrency, and
every ~10 s reads the resident memory (RSS, and its anonymous part) of every ferry process (bench.processes). At the
end it prints one row per process (RSS at the end of the warm-up and at the end, growth after the
warm-up, trend, max) and the requests by kind, writes the samples to
bench/results/soak-<date>-<commit>.json, and exits 1 when any process grew more than the threshold
after the warm-up (or was restarted). The warm-up is part of the N minutes: `--warmup-minutes`, or
longer until enough requests have finished to fill llama.cpp's prompt cache to its bound
(`prompt_cache_mib`), which may legitimately grow the model process until then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import platform, report
from bench.engine_params import MODEL_NAME, engine_params
from bench.memory import (
    MB,
    Growth,
    Sample,
    failures,
    growth,
    requests_to_fill_cache,
    table,
    warmup_end,
)
from bench.processes import discover, read
from bench.soak_traffic import KINDS, Traffic
from launcher.setup import ensure_backend, ensure_model, model_path
from launcher.stack import Stack
from services.common.config import get_settings

# Per process, over the 9 measured minutes of a 10-minute run: see bench/README.md ("Soak").
THRESHOLD_MB = 20.0
SAMPLE_EVERY_S = 10.0


def say(message: str) -> None:
    print(f"soak: {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0, help="traffic time, warm-up included")
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=1.0,
        help="growth is measured from its end (later if the prompt cache has not filled by then)",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument(
        "--threshold-mb", type=float, default=THRESHOLD_MB, help="largest growth allowed per process"
    )
    p.add_argument(
        "--sample-seconds", type=float, default=SAMPLE_EVERY_S, help="time between memory readings"
    )
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--seed", type=int, default=None, help="traffic seed (default: random)")
    args = p.parse_args(argv)
    if args.warmup_minutes >= args.minutes:
        p.error("--warmup-minutes must be shorter than --minutes")
    return args


class Sampler:
    """Reads every ferry process's memory every `every` seconds on a thread of its own, and with each
    reading how many requests had finished (`finished`).

    Processes are looked up again at each reading, so a restarted one is noticed (its pid changes).
    """

    def __init__(
        self,
        stack: Stack,
        every: float,
        finished: Callable[[], int],
        on_sample: Callable[[], None] | None = None,
    ) -> None:
        self.stack = stack
        self.every = every
        self.on_sample = on_sample
        self._finished = finished
        # (seconds, requests finished by then), one per reading.
        self.finished: list[tuple[float, int]] = []
        self.samples: dict[str, list[Sample]] = {}
        self.pids: dict[str, list[tuple[int, ...]]] = {}
        self.groups: set[str] = set()
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the last reading: the end of the run

    def sample(self) -> None:
        t = time.monotonic() - self.started
        self.finished.append((t, self._finished()))
        for name, role in discover(self.stack).items():
            reading = read(role.processes)
            if reading is None:
                continue
            if role.group:
                self.groups.add(name)
            self.samples.setdefault(name, []).append(Sample(t, reading.rss, reading.anon))
            seen = self.pids.setdefault(name, [])
            if not seen or seen[-1] != reading.pids:
                seen.append(reading.pids)

    def restarted(self, role: str) -> bool:
        """A single process seen under more than one pid (a group's members come and go)."""
        return role not in self.groups and len(self.pids.get(role, [])) > 1

    def _loop(self) -> None:
        next_at = self.started + self.every
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.sample()
            if self.on_sample is not None:
                self.on_sample()
            next_at += self.every


def progress(sampler: Sampler, traffic: Traffic) -> Callable[[], None]:
    """A line about once a minute: time, requests so far, the process that grew most since the start."""
    last = [0.0]

    def line() -> None:
        t = time.monotonic() - sampler.started
        if t - last[0] < 59:
            return
        last[0] = t
        sent = sum(c.sent for c in traffic.counts.values())
        failed = sum(c.failed for c in traffic.counts.values())
        grown = {name: (s[-1].rss - s[0].rss) / MB for name, s in sampler.samples.items() if s}
        top = max(grown, key=lambda name: grown[name], default="-")
        say(
            f"{t / 60:4.1f} min: {sent} requests, {failed} failed; most grown since the start: "
            f"{top} {grown.get(top, 0.0):+.1f} MB"
        )

    return line


def engine_requests(traffic: Traffic) -> int:
    """Requests finished that ran on the engine: answered or dropped mid-stream, not the invalid ones."""
    return sum(c.ok + c.dropped for kind, c in traffic.counts.items() if kind != "invalid")


def requests_table(traffic: Traffic) -> str:
    lines = ["| requests | sent | ok | dropped on purpose | failed |", "|---|---:|---:|---:|---:|"]
    total = [0, 0, 0, 0]
    for kind in KINDS:
        c = traffic.counts[kind]
        row = [c.sent, c.ok, c.dropped, c.failed]
        total = [a + b for a, b in zip(total, row, strict=True)]
        lines.append(f"| {kind} | " + " | ".join(str(v) for v in row) + " |")
    lines.append("| **all** | " + " | ".join(f"**{v}**" for v in total) + " |")
    return "\n".join(lines)


def results(
    args: argparse.Namespace,
    sampler: Sampler,
    traffic: Traffic,
    rows: list[Growth],
    seconds: float,
    seed: int,
    warmup_s: float | None,
    fill_requests: int,
) -> dict[str, Any]:
    return {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "time": datetime.now(UTC).strftime("%H:%M:%S"),
            "commit": report.commit(),
            "machine": report.machine(),
            "model": MODEL_NAME,
            "minutes": args.minutes,
            "warmup_minutes": args.warmup_minutes,
            # When the warm-up ended (None: never, too few requests), and the requests it waited for.
            "warmup_s": warmup_s,
            "cache_fill_requests": fill_requests,
            "concurrency": args.concurrency,
            "threshold_mb": args.threshold_mb,
            "sample_seconds": args.sample_seconds,
            "seed": seed,
            "traffic_seconds": seconds,
            "load_avg": os.getloadavg(),
        },
        "passed": warmup_s is not None and not failures(rows, args.threshold_mb),
        "growth": [{**row.__dict__, "judged_mb": row.judged_mb} for row in rows],
        "requests": {kind: c.__dict__ for kind, c in traffic.counts.items()},
        # [seconds, RSS MB, anonymous MB] per reading: small enough to keep with the results.
        "samples": {
            role: {
                "pids": [list(p) for p in sampler.pids[role]],
                "readings": [[round(s.t, 1), round(s.rss / MB, 2), round(s.anon / MB, 2)] for s in samples],
            }
            for role, samples in sampler.samples.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    say(ensure_model(settings))
    say(ensure_backend())
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    engine = engine_params()
    fill_requests = requests_to_fill_cache(engine.prompt_cache_mib, engine.n_parallel)
    say(
        f"starting ferry; then {args.minutes:g} min of traffic at concurrency {args.concurrency} (seed {seed})"
    )
    with platform.running(model_path(settings).parent) as stack:
        traffic = Traffic(
            stack.endpoints.rest, stack.endpoints.grpc, MODEL_NAME, platform.api_key(stack), seed
        )
        sampler = Sampler(stack, args.sample_seconds, lambda: engine_requests(traffic))
        sampler.on_sample = progress(sampler, traffic)
        sampler.start()
        started = time.monotonic()
        try:
            asyncio.run(traffic.run(args.concurrency, args.minutes * 60))
        finally:
            sampler.stop()
        seconds = time.monotonic() - started
        say(f"traffic done after {seconds / 60:.1f} min; stopping ferry")
    warmup_s = warmup_end(args.warmup_minutes * 60, fill_requests, sampler.finished)
    rows = [
        growth(
            name,
            s,
            warmup_s if warmup_s is not None else seconds,
            restarted=sampler.restarted(name),
            by_anon=name in sampler.groups,
        )
        for name, s in sorted(sampler.samples.items())
    ]
    failed = failures(rows, args.threshold_mb)
    data = results(args, sampler, traffic, rows, seconds, seed, warmup_s, fill_requests)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    meta = data["meta"]
    path = args.results_dir / f"soak-{meta['date']}-{meta['commit']['sha']}.json"
    path.write_text(json.dumps(report.finite(data), indent=1) + "\n")
    print()
    warmup = f"{warmup_s / 60:.1f} min" if warmup_s is not None else "a warm-up that never ended"
    print(f"Memory after {warmup} of warm-up, {args.minutes:g} min in all (MB = MiB):\n")
    print(table(rows, args.threshold_mb))
    print()
    print(requests_table(traffic))
    print()
    for kind, c in traffic.counts.items():
        for error in c.errors:
            say(f"{kind} failed: {error}")
    say(f"samples: {path}")
    if warmup_s is None:
        say(
            f"FAIL: the warm-up never ended: {engine_requests(traffic)} requests finished, fewer than the "
            f"{fill_requests} that fill the {engine.prompt_cache_mib} MiB prompt cache; run longer"
        )
        return 1
    if failed:
        names = ", ".join(
            f"{r.process} ({'restarted' if r.restarted else f'{r.growth_mb:+.1f} MB'})" for r in failed
        )
        say(f"FAIL: grew more than {args.threshold_mb:g} MB after the warm-up: {names}")
        return 1
    say(f"pass: every process grew less than {args.threshold_mb:g} MB after the warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
