"""The tier run with tracing: what tracing every request costs, ratio 1.0 against the default (off).

Two stacks on the trivial streaming model (bench/models/bench-stream, as `make bench`'s tier run):
one with the default telemetry (exporter `none`: trace context only), one with tracing on at
`telemetry.sampling_ratio=1.0` (Envoy's tracer, every service's spans, Triton's own spans, the
record deliveries' linked spans) exporting to an OTLP sink in this process (gRPC and HTTP, each
export answered and dropped). Native gRPC and REST/SSE through Envoy at concurrency 1 (and `--levels`),
the two stacks alternating (off on off on ...), fresh prompts every run. Per request = Δ TTFT p50 and
Δ e2e p50 (on - off); per token = Δ ITL p50; and the CPU each stack's processes used per request
(bench.profile.cpu_seconds around every run), which a loaded machine disturbs less than latency.

Run: `python -m bench.tracing_cost [--requests N] [--rounds N] [--tokens N] [--levels 1,16]`;
results: bench/results/tracing-<date>-<commit>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import platform, prompts, report
from bench.clients import Client, GrpcClient, SseClient, run_load
from bench.metrics import Record, combine, summarize
from bench.otlp_sink import OtlpSink
from bench.profile import cpu_seconds
from launcher.setup import ensure_backend, ensure_model, model_path
from services.common.config import REPO_ROOT, get_settings

MODEL = "bench-stream"
SYSTEMS = ("ferry-grpc", "ferry-rest")
MODES = ("off", "on")
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# Each run's stack logs (off/, on/), kept for looking into errors.
RUNS_DIR = REPO_ROOT / "build" / "bench" / "runs"


def say(message: str) -> None:
    print(f"bench.tracing_cost: {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__)
    p.add_argument("--levels", default="1", help="concurrency levels")
    p.add_argument("--requests", type=int, default=200, help="measured requests per run (per level: x level)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (off on off on ...)")
    p.add_argument("--tokens", type=int, default=32, help="streamed tokens per request")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    return args


def traced_overrides(sink: OtlpSink) -> dict[str, Any]:
    return {
        "telemetry": {
            "exporter": "otlp",
            "otlp_endpoint": sink.grpc_endpoint,
            "sampling_ratio": 1.0,
            "triton_otlp_http_endpoint": sink.http_endpoint,
        }
    }


def client_maker(system: str, stack: Any) -> Callable[[], Client]:
    e, key = stack.endpoints, platform.api_key(stack)
    if system == "ferry-grpc":
        return lambda: GrpcClient(e.grpc, MODEL, key)
    return lambda: SseClient(e.rest, MODEL, api_key=key)


def run_client(make: Callable[[], Client], texts: list[str], level: int, tokens: int) -> list[Record]:
    async def go() -> list[Record]:
        client = make()
        try:
            return await run_load(client, texts, level, tokens, 2 * level)
        finally:
            await client.close()

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    settings = get_settings()
    say(ensure_model(settings))
    say(ensure_backend())
    model = model_path(settings)
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    loads: list[float] = [os.getloadavg()[0]]
    records: dict[tuple[str, int], list[tuple[list[Record], dict[str, Any]]]] = {}
    # (system/mode, level) -> CPU seconds by process over its runs, and the requests they served.
    cpu: dict[tuple[str, int], tuple[dict[str, float], int]] = {}
    logs = RUNS_DIR / f"tracing-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    sink = OtlpSink()
    sink.start()
    try:
        with ExitStack() as stacks:
            say("starting two stacks on bench-stream: tracing off (default) and on (ratio 1.0)")
            stack = {
                "off": stacks.enter_context(
                    platform.running(model.parent, logs / "off", **platform.bench_model_overrides())
                ),
                "on": stacks.enter_context(
                    platform.running(
                        model.parent,
                        logs / "on",
                        **platform.bench_model_overrides(),
                        **traced_overrides(sink),
                    )
                ),
            }
            for level in args.levels:
                count = args.requests * level
                for rnd in range(args.rounds):
                    for system in SYSTEMS:
                        for mode in MODES:
                            make = client_maker(system, stack[mode])
                            texts = prompts.unique(2 * level + count, rng, "short")
                            before = cpu_seconds(stack[mode])
                            recs = run_client(make, texts, level, args.tokens)
                            after = cpu_seconds(stack[mode])
                            summary = summarize(recs)
                            used, served = cpu.get((f"{system}/{mode}", level), ({}, 0))
                            for process, seconds in after.items():
                                if process != "load client":  # this process: clients and the sink
                                    used[process] = (
                                        used.get(process, 0.0) + seconds - before.get(process, 0.0)
                                    )
                            cpu[(f"{system}/{mode}", level)] = (used, served + summary["requests"])
                            loads.append(os.getloadavg()[0])
                            records.setdefault((f"{system}/{mode}", level), []).append((recs, summary))
                            if summary["errors"]:
                                say(f"  first error: {next(r.error for r in recs if r.error)}")
                            say(
                                f"c={level} round {rnd + 1} {system:<10} tracing {mode:<3} "
                                f"TTFT p50 {summary['ttft_ms']['p50']:6.2f} ms  ITL p50 {summary['itl_ms']['p50']:6.3f} ms  "
                                f"e2e p50 {summary['e2e_ms']['p50']:6.2f} ms  errors {summary['errors']}"
                            )
    finally:
        sink.stop()
    cells: dict[str, dict[str, Any]] = {}
    for (name, level), pairs in records.items():
        cells.setdefault(name, {})[str(level)] = combine(pairs)
    cost = {
        system: {
            str(level): {
                f"{metric}_p50_ms": cells[f"{system}/on"][str(level)][f"{metric}_ms"]["p50"]
                - cells[f"{system}/off"][str(level)][f"{metric}_ms"]["p50"]
                for metric in ("ttft", "itl", "e2e")
            }
            for level in args.levels
        }
        for system in SYSTEMS
    }
    cpu_ms = {
        name: {
            str(level): {
                **{process: 1000 * seconds / max(1, served) for process, seconds in sorted(used.items())},
                "total": 1000 * sum(used.values()) / max(1, served),
            }
        }
        for (name, level), (used, served) in cpu.items()
    }
    for system in SYSTEMS:
        for level in args.levels:
            on, off = cpu_ms[f"{system}/on"][str(level)], cpu_ms[f"{system}/off"][str(level)]
            cost[system][str(level)]["cpu_ms_per_request"] = on["total"] - off["total"]
    results = report.finite(
        {
            "cells": cells,
            "cpu_ms_per_request": cpu_ms,
            "cost": cost,
            "spans_exported": sink.spans,
            "meta": {
                "logs": str(logs),
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                "commit": report.commit(),
                "machine": report.machine(),
                "levels": args.levels,
                "requests": args.requests,
                "rounds": args.rounds,
                "tokens": args.tokens,
                "load": {"min": min(loads), "max": max(loads), "mean": sum(loads) / len(loads)},
                "duration_s": time.monotonic() - started,
            },
        }
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"tracing-{results['meta']['date']}-{results['meta']['commit'].get('sha', 'unknown')}"
    (args.results_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    (args.results_dir / f"{stem}.md").write_text(md)
    print(md)
    return 0


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    load = meta["load"]
    lines = [
        f"# Tracing cost — {meta['date']} ({meta['commit'].get('sha', '?')})",
        "",
        f"bench-stream, {meta['tokens']} tokens per request, {meta['requests']} requests x level per run, "
        f"{meta['rounds']} alternating rounds; load average {load['min']:.1f}-{load['max']:.1f} "
        f"(mean {load['mean']:.1f}); {results['spans_exported']} spans exported while tracing.",
        "",
        "| system | c | tracing | TTFT p50 ms | ITL p50 ms | e2e p50 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_level in results["cells"].items():
        system, mode = name.split("/")
        for level, cell in by_level.items():
            lines.append(
                f"| {system} | {level} | {mode} | {cell['ttft_ms']['p50']:.2f} | {cell['itl_ms']['p50']:.3f} "
                f"| {cell['e2e_ms']['p50']:.2f} | {cell.get('errors', 0)} |"
            )
    lines += ["", "CPU per request by process (ms, all of the stack's programs and PostgreSQL):", ""]
    processes = sorted(
        {p for by_level in results["cpu_ms_per_request"].values() for c in by_level.values() for p in c}
    )
    lines += [
        "| system | c | tracing | " + " | ".join(processes) + " |",
        "|---|---|---|" + "---|" * len(processes),
    ]
    for name, by_level in results["cpu_ms_per_request"].items():
        system, mode = name.split("/")
        for level, c in by_level.items():
            lines.append(
                f"| {system} | {level} | {mode} | "
                + " | ".join(f"{c.get(p, 0):.2f}" for p in processes)
                + " |"
            )
    lines += ["", "Cost of tracing at ratio 1.0 (on - off):", ""]
    lines += [
        "| system | c | Δ TTFT p50 ms (per request) | Δ e2e p50 ms | Δ ITL p50 ms (per token) | Δ CPU ms per request |",
        "|---|---|---|---|---|---|",
    ]
    for system, by_level in results["cost"].items():
        for level, d in by_level.items():
            lines.append(
                f"| {system} | {level} | {d['ttft_p50_ms']:+.2f} | {d['e2e_p50_ms']:+.2f} | {d['itl_p50_ms']:+.3f} "
                f"| {d['cpu_ms_per_request']:+.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
