"""`make bench`: ferry against the raw engine in one run, plus the tier overhead on a trivial model.

1. Engine comparison, Gemma 3 270M, completions streaming, fixed prompts and output lengths:
   - raw: llama.cpp's own server for the same GGUF with the model's slots/context/threads (aiperf);
   - ferry-rest: ferry's /v1/completions through Envoy (aiperf);
   - ferry-grpc: ferry's native InferenceService/GenerateStream on Envoy's port (bench.clients).
   Per concurrency level, the systems alternate (A B C A B C ...), each run with fresh prompts.
2. Tier overhead: a second stack serving bench/models/bench-stream (N tokens, no compute): Triton
   called directly vs ferry through Envoy (gRPC and REST), at concurrency 1 and 16.
3. Results to bench/results/ (JSON, Markdown, PNG); see bench/report.py.

Everything it starts it stops. `python -m bench --help` lists the knobs (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import aiperf_run, platform, prompts, raw_engine, report, sidecar
from bench.clients import Client, GrpcClient, SseClient, TritonClient, run_load
from bench.engine_params import MODEL_NAME, engine_params, engine_summary
from bench.metrics import Record, combine, summarize
from launcher.setup import ensure_backend, ensure_model, model_path
from services.common.config import REPO_ROOT, get_settings

RUNS_DIR = REPO_ROOT / "build" / "bench" / "runs"
ENGINE_SYSTEMS = ("raw", "ferry-rest", "ferry-grpc")
TIER_SYSTEMS = ("triton", "ferry-grpc", "ferry-rest")
TIER_MODEL = "bench-stream"


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


class Loads:
    """1-minute load averages seen around the runs (the machine is shared; noise shows up here)."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def sample(self) -> float:
        value = os.getloadavg()[0]
        self.samples.append(value)
        return value

    def summary(self) -> dict[str, float]:
        s = self.samples or [math.nan]
        return {"min": min(s), "max": max(s), "mean": sum(s) / len(s)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--levels", default="1,4,8", help="concurrency levels of the engine comparison")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per level (A B C A B C)")
    p.add_argument("--requests", default="1:6,4:12,8:16", help="measured requests per run, by level")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--prompt-length", default="medium", choices=prompts.LENGTHS)
    p.add_argument(
        "--cross-check", action="store_true", help="also measure the raw engine with the httpx client"
    )
    p.add_argument(
        "--with-triton",
        action="store_true",
        help="also call ferry's Triton directly (splits engine from tiers)",
    )
    p.add_argument("--tier-levels", default="1,16")
    p.add_argument("--tier-tokens", type=int, default=32)
    p.add_argument("--tier-requests", default="1:200,16:640")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-tier", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, few requests, c=1,4")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    args = p.parse_args(argv)
    if args.quick:
        # A smoke run must not replace the committed results.
        if args.results_dir == report.RESULTS_DIR:
            args.results_dir = RUNS_DIR / "quick-results"
        args.levels, args.rounds, args.requests = "1,4", 1, "1:3,4:8"
        args.tier_requests = "1:50,16:160"
    args.levels = [int(x) for x in args.levels.split(",")]
    args.tier_levels = [int(x) for x in args.tier_levels.split(",")]
    args.requests = {int(k): int(v) for k, v in (kv.split(":") for kv in args.requests.split(","))}
    args.tier_requests = {int(k): int(v) for k, v in (kv.split(":") for kv in args.tier_requests.split(","))}
    return args


def run_client(
    make: Callable[[], Client], texts: list[str], concurrency: int, max_tokens: int, warmup: int
) -> list[Record]:
    async def go() -> list[Record]:
        client = make()  # inside the loop: grpc.aio channels belong to the loop that made them
        try:
            return await run_load(client, texts, concurrency, max_tokens, warmup)
        finally:
            await client.close()

    return asyncio.run(go())


def engine_comparison(args: argparse.Namespace, model: Path, run_dir: Path, loads: Loads) -> dict[str, Any]:
    aiperf = sidecar.aiperf_binary()
    tokenizer = sidecar.tokenizer_dir(get_settings().home, model)
    systems = [
        *ENGINE_SYSTEMS,
        *(["raw-httpx"] if args.cross_check else []),
        *(["triton"] if args.with_triton else []),
    ]
    runs: list[dict[str, Any]] = []
    records: dict[tuple[str, int], list[tuple[list[Record], dict[str, Any]]]] = {}
    isl: list[float] = []
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    say("starting the raw engine and ferry (Triton + services + Envoy)")
    with (
        raw_engine.serving(model, run_dir / "raw-engine.log") as raw_url,
        platform.running(model.parent, keep_logs=run_dir / "ferry-logs") as stack,
    ):
        endpoints = stack.endpoints
        key = platform.api_key(stack)
        for level in args.levels:
            count = args.requests.get(level, 4 * level)
            for rnd in range(args.rounds):
                for system in systems:
                    texts = prompts.unique(level + count, rng, args.prompt_length)
                    before = loads.sample()
                    started = time.monotonic()
                    entry: dict[str, Any] = {"system": system, "concurrency": level, "round": rnd}
                    if system in ("raw", "ferry-rest"):
                        url = raw_url if system == "raw" else endpoints.rest
                        result = aiperf_run.run(
                            aiperf, url, MODEL_NAME, tokenizer, texts, level, level, args.max_tokens,
                            rng.randrange(1 << 31), run_dir / f"c{level}-r{rnd}-{system}",
                            api_key=None if system == "raw" else key,
                        )  # fmt: skip
                        recs = result.records
                        s = result.summary
                        entry["aiperf"] = {
                            "ttft_p50_ms": s["time_to_first_token"]["p50"],
                            "itl_p50_ms": s["inter_token_latency"]["p50"],
                            "output_tok_s": s["output_token_throughput"]["avg"],
                            "prompt_cache_read_tokens": result.prompt_cache_read_tokens,
                        }
                        isl.append(float(s.get("input_sequence_length", {}).get("avg", math.nan)))
                    elif system == "ferry-grpc":
                        recs = run_client(
                            lambda: GrpcClient(endpoints.grpc, MODEL_NAME, key),
                            texts,
                            level,
                            args.max_tokens,
                            level,
                        )
                    else:
                        recs = run_client(
                            lambda: SseClient(raw_url, MODEL_NAME), texts, level, args.max_tokens, level
                        )
                    summary = summarize(recs)
                    entry.update(summary=summary, load_before=before, load_after=loads.sample(),
                                 wall_s=time.monotonic() - started)  # fmt: skip
                    runs.append(entry)
                    records.setdefault((system, level), []).append((recs, summary))
                    say(
                        f"c={level} round {rnd + 1} {system:<10} TTFT p50 {summary['ttft_ms']['p50']:7.1f} ms  "
                        f"ITL p50 {summary['itl_ms']['p50']:6.2f} ms  {summary['output_tok_s']:6.1f} tok/s  "
                        f"errors {summary['errors']}  load {before:.2f}->{entry['load_after']:.2f}"
                    )
                    if summary["errors"]:
                        first = next(r.error for r in recs if r.error)
                        say(f"  first error: {first}")
    cells = by_system(records)
    return {"runs": runs, "cells": cells, "isl_avg": sum(isl) / len(isl) if isl else math.nan}


def by_system(
    records: dict[tuple[str, int], list[tuple[list[Record], dict[str, Any]]]],
) -> dict[str, dict[str, Any]]:
    """Each system's rounds at each level, combined: {system: {level: cell}}."""
    cells: dict[str, dict[str, Any]] = {}
    for (system, level), pairs in records.items():
        cells.setdefault(system, {})[str(level)] = combine(pairs)
    return cells


def tier_overhead(args: argparse.Namespace, model: Path, run_dir: Path, loads: Loads) -> dict[str, Any]:
    say("starting ferry on the trivial streaming model (bench/models/bench-stream)")
    records: dict[tuple[str, int], list[tuple[list[Record], dict[str, Any]]]] = {}
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    with platform.running(
        model.parent, keep_logs=run_dir / "tier-logs", **platform.bench_model_overrides()
    ) as stack:
        e = stack.endpoints
        key = platform.api_key(stack)
        for level in args.tier_levels:
            count = args.tier_requests.get(level, 20 * level)
            for rnd in range(args.rounds):
                for system in TIER_SYSTEMS:
                    make: Callable[[], Client] = (
                        (lambda: TritonClient(e.triton_grpc, TIER_MODEL, stack.settings.triton)) if system == "triton"
                        else (lambda: GrpcClient(e.grpc, TIER_MODEL, key)) if system == "ferry-grpc"
                        else (lambda: SseClient(e.rest, TIER_MODEL, api_key=key))
                    )  # fmt: skip
                    texts = prompts.unique(2 * level + count, rng, "short")
                    loads.sample()
                    recs = run_client(make, texts, level, args.tier_tokens, 2 * level)
                    summary = summarize(recs)
                    loads.sample()
                    records.setdefault((system, level), []).append((recs, summary))
                    say(
                        f"tier c={level} round {rnd + 1} {system:<10} TTFT p50 {summary['ttft_ms']['p50']:6.2f} ms  "
                        f"ITL p50 {summary['itl_ms']['p50']:6.3f} ms  e2e p50 {summary['e2e_ms']['p50']:6.2f} ms  "
                        f"{summary['req_s']:7.1f} req/s  errors {summary['errors']}"
                    )
                    if summary["errors"]:
                        say(f"  first error: {next(r.error for r in recs if r.error)}")
    cells = by_system(records)
    overhead: dict[str, dict[str, Any]] = {}
    for system in TIER_SYSTEMS[1:]:
        for level in args.tier_levels:
            mine, base = cells[system][str(level)], cells["triton"][str(level)]
            overhead.setdefault(system, {})[str(level)] = {
                "ttft_p50_ms": mine["ttft_ms"]["p50"] - base["ttft_ms"]["p50"],
                "itl_p50_ms": mine["itl_ms"]["p50"] - base["itl_ms"]["p50"],
                "e2e_p50_ms": mine["e2e_ms"]["p50"] - base["e2e_ms"]["p50"],
            }
    return {"tokens": args.tier_tokens, "levels": args.tier_levels, "cells": cells, "overhead": overhead}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    engine, ratios, deltas = results.get("engine"), results.get("ratios"), results.get("deltas")
    if engine and ratios:
        for level in (4, 8):
            r = ratios.get("ferry-rest", {}).get(str(level))
            if r:
                out.append({"target": f"Envoy REST output tok/s ≥ 0.95 x raw at c={level}",
                            "measured": f"{r['output_tok_s']:.3f} x", "met": r["output_tok_s"] >= 0.95})  # fmt: skip
        d = deltas.get("ferry-rest", {}).get("1") if deltas else None
        if d:
            out.append({"target": "TTFT p50 ≤ raw + 10 ms at c=1 (REST)", "measured": f"{d['ttft_p50_ms']:+.1f} ms",
                        "met": d["ttft_p50_ms"] <= 10})  # fmt: skip
            out.append({"target": "ITL p50 ≤ raw + 1 ms at c=1 (REST)", "measured": f"{d['itl_p50_ms']:+.2f} ms",
                        "met": d["itl_p50_ms"] <= 1})  # fmt: skip
    tier = results.get("tier")
    if tier:
        for system in ("ferry-grpc", "ferry-rest"):
            o = tier["overhead"].get(system, {}).get("1")
            if o:
                out.append({"target": f"tier overhead ≤ 2 ms p50 per request at c=1 ({system}, Δ TTFT p50)",
                            "measured": f"{o['ttft_p50_ms']:+.2f} ms", "met": o["ttft_p50_ms"] <= 2})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    settings = get_settings()
    say(ensure_model(settings))
    say(ensure_backend())
    model = model_path(settings)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = RUNS_DIR / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    loads = Loads()
    loads.sample()
    results: dict[str, Any] = {}
    engine_meta = engine_summary(engine_params())
    if not args.skip_engine:
        comparison = engine_comparison(args, model, run_dir, loads)
        results["engine"] = comparison["cells"]
        results["engine_runs"] = comparison["runs"]
        raw = comparison["cells"]["raw"]
        results["ratios"] = {}
        results["deltas"] = {}
        for system in report.FERRY_SYSTEMS:
            for level, cell in comparison["cells"].get(system, {}).items():
                results["ratios"].setdefault(system, {})[level] = report.ratios(cell, raw[level])
                results["deltas"].setdefault(system, {})[level] = {
                    "ttft_p50_ms": cell["ttft_ms"]["p50"] - raw[level]["ttft_ms"]["p50"],
                    "itl_p50_ms": cell["itl_ms"]["p50"] - raw[level]["itl_ms"]["p50"],
                    "e2e_p50_ms": cell["e2e_ms"]["p50"] - raw[level]["e2e_ms"]["p50"],
                }
        isl_avg = comparison["isl_avg"]
        # Kept at once: a failure in the tier phase must not lose a long comparison.
        (run_dir / "engine.json").write_text(json.dumps(report.finite(results), indent=1, default=str))
    else:
        isl_avg = math.nan
    if not args.skip_tier:
        try:
            results["tier"] = tier_overhead(args, model, run_dir, loads)
        except Exception as err:  # report what was measured; say why the rest is missing
            say(f"tier overhead failed: {err!r}")
            results["tier_error"] = repr(err)
    results["targets"] = targets(results)
    results["meta"] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": report.commit(),
        "machine": report.machine(),
        "engine": engine_meta,
        "levels": args.levels,
        "rounds": args.rounds,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "prompt_length": args.prompt_length,
        "isl_avg": isl_avg,
        "load": loads.summary(),
        "duration_s": time.monotonic() - started,
        "argv": sys.argv[1:] if argv is None else argv,
        "scratch": str(run_dir),
    }
    paths = report.write(results, args.results_dir)
    print(paths["md"].read_text())
    say(f"results: {', '.join(str(p) for p in paths.values())}")
    say(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
