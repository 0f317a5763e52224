"""What a response-cache hit costs through Envoy, with authentication on (the issue asks < 5 ms p50).

One stack on the trivial streaming model (bench/models/bench-stream, as the tier run; a hit never
reaches the engine, so the model does not matter to it). For each path, one deterministic request
(temperature 0) is sent once to fill the cache, then `--requests` identical ones are timed end to end
by a client in this process, one at a time over a kept-alive connection: REST `POST /v1/completions`
(unary and `stream: true` SSE) and native gRPC `Generate` / `GenerateStream`. Every timed answer must
say `x-ferry-cache: hit`. For comparison the same requests with `Cache-Control: no-cache` (generated
by the trivial model: the tier's whole cost with no engine time) are timed the same way, alternating
rounds of hits and misses.

Run: `python -P -m bench.cache [--requests 200] [--rounds 2] [--tokens 32]`;
results: bench/results/cache-<date>-<commit>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

from bench import platform, report
from bench.profile import PY_SPY, cpu_seconds, top
from launcher.setup import ensure_backend, ensure_model, model_path
from services.common.config import REPO_ROOT, get_settings

MODEL = "bench-stream"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PATHS = ("rest", "rest-stream", "grpc", "grpc-stream")
TARGET_P50_MS = 5.0
PROCESSES = ("envoy", "gateway", "inference", "transactions", "audit", "postgres")

# One timed request: returns the x-ferry-cache value its answer carried.
Call = Callable[[dict[str, str]], str]


def say(message: str) -> None:
    print(f"bench.cache: {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -P -m bench.cache", description=__doc__)
    p.add_argument("--requests", type=int, default=200, help="timed requests per path and round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (hits, then no-cache)")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens of the request (its answer's length)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--profile", type=int, default=0, help="then this many REST hits under py-spy (inference)")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=platform.READY_TIMEOUT_S,
        help="seconds the stack may take to start",
    )
    return p.parse_args(argv)


def calls(
    rest: httpx.Client, stub: inference_pb2_grpc.InferenceServiceStub, key: str, tokens: int
) -> dict[str, Call]:
    prompt = f"The response cache bench {os.getpid()}-{time.time_ns()}:"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    native = inference_pb2.GenerateRequest(
        model=f"models/{MODEL}",
        prompt=prompt,
        sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=tokens),
    )
    auth = [("authorization", f"Bearer {key}")]

    def rest_unary(headers: dict[str, str]) -> str:
        reply = rest.post("/v1/completions", json=body, headers=headers)
        reply.raise_for_status()
        return reply.headers.get("x-ferry-cache", "")

    def rest_stream(headers: dict[str, str]) -> str:
        reply = rest.post("/v1/completions", json={**body, "stream": True}, headers=headers)
        reply.raise_for_status()
        assert reply.text.endswith("data: [DONE]\n\n"), reply.text[-200:]
        return reply.headers.get("x-ferry-cache", "")

    def grpc_unary(headers: dict[str, str]) -> str:
        _, call = stub.Generate.with_call(native, metadata=[*auth, *headers.items()], timeout=30)
        return str(dict(call.initial_metadata()).get("x-ferry-cache", ""))

    def grpc_stream(headers: dict[str, str]) -> str:
        stream = stub.GenerateStream(native, metadata=[*auth, *headers.items()], timeout=30)
        for _ in stream:
            pass
        return str(dict(stream.initial_metadata()).get("x-ferry-cache", ""))

    return {"rest": rest_unary, "rest-stream": rest_stream, "grpc": grpc_unary, "grpc-stream": grpc_stream}


def timed(call: Call, headers: dict[str, str], count: int, expect: str) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        state = call(headers)
        seconds.append(time.perf_counter() - started)
        assert state == expect, f"expected x-ferry-cache {expect}, got {state!r}"
    return seconds


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {
        "requests": len(ms),
        "p50_ms": statistics.median(ms),
        "p90_ms": pick(0.9),
        "p99_ms": pick(0.99),
        "mean_ms": statistics.fmean(ms),
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Response cache: a hit through Envoy ({results['date']}, commit {results['commit']['sha']}"
        f"{' + local changes' if results['commit']['dirty'] else ''})",
        "",
        f"bench-stream model, max_tokens {results['tokens']}, authentication on, one request at a time over a "
        f"kept-alive connection, {results['requests']} timed requests per path and round, {results['rounds']} "
        f"rounds; load average {results['load_average']['min']:.1f}-{results['load_average']['max']:.1f} on "
        f"{results['machine']['cores']} cores. `miss` = the same request with `Cache-Control: no-cache` "
        "(generated by the trivial model: the tier without engine time).",
        "",
        "| path | hit p50 / p90 / p99 ms | no-cache p50 / p90 / p99 ms | hit p50 < 5 ms |",
        "|---|---|---|---|",
    ]
    for path in PATHS:
        hit, miss = results["paths"][path]["hit"], results["paths"][path]["no-cache"]
        lines.append(
            f"| {path} | {hit['p50_ms']:.2f} / {hit['p90_ms']:.2f} / {hit['p99_ms']:.2f} | "
            f"{miss['p50_ms']:.2f} / {miss['p90_ms']:.2f} / {miss['p99_ms']:.2f} | "
            f"{'yes' if hit['p50_ms'] < TARGET_P50_MS else '**no**'} |"
        )
    lines += [
        "",
        "CPU ms per hit by process (user + system, this client excluded):",
        "",
        "| path | " + " | ".join(PROCESSES) + " |",
        "|---|" + "---|" * len(PROCESSES),
    ]
    for path in PATHS:
        used = results["cpu_ms_per_hit"].get(path, {})
        lines.append(f"| {path} | " + " | ".join(f"{used.get(p, 0.0):.2f}" for p in PROCESSES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    say(ensure_model(settings))
    say(ensure_backend())
    loads = [os.getloadavg()[0]]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[float]]] = {path: {"hit": [], "no-cache": []} for path in PATHS}
    # CPU milliseconds per hit by process (less disturbed by a loaded machine than latency).
    cpu: dict[str, dict[str, float]] = {}
    say("starting a stack on bench-stream")
    platform.READY_TIMEOUT_S = args.ready_timeout
    with platform.running(model_path(settings).parent, **platform.bench_model_overrides()) as stack:
        key = platform.api_key(stack) or ""
        with (
            httpx.Client(
                base_url=stack.endpoints.rest, headers={"authorization": f"Bearer {key}"}, timeout=30
            ) as rest,
            grpc.insecure_channel(stack.endpoints.grpc) as channel,
        ):
            calls_made = calls(rest, inference_pb2_grpc.InferenceServiceStub(channel), key, args.tokens)
            for name, call in calls_made.items():
                assert call({}) in ("miss", "hit"), "the first request is not cacheable"
                timed(call, {}, 10, "hit")  # warm-up
                used: dict[str, float] = {}
                for rnd in range(args.rounds):
                    before = cpu_seconds(stack)
                    runs[name]["hit"] += timed(call, {}, args.requests, "hit")
                    after = cpu_seconds(stack)
                    for process, seconds in after.items():
                        used[process] = used.get(process, 0.0) + seconds - before.get(process, 0.0)
                    runs[name]["no-cache"] += timed(
                        call, {"cache-control": "no-cache"}, args.requests, "bypass"
                    )
                    loads.append(os.getloadavg()[0])
                    say(f"{name} round {rnd + 1}: hit p50 {summary(runs[name]['hit'])['p50_ms']:.2f} ms")
                hits = len(runs[name]["hit"])
                cpu[name] = {
                    process: round(1000 * seconds / hits, 3)
                    for process, seconds in used.items()
                    if seconds > 0
                }
            if args.profile:
                folded = args.results_dir / "cache-profile.folded"
                spy = subprocess.Popen(
                    [str(PY_SPY), "record", "--pid", str(stack.supervisor().pid("inference")), "--rate", "500",
                     "--format", "raw", "--output", str(folded), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )  # fmt: skip
                time.sleep(1)
                timed(calls_made["rest"], {}, args.profile, "hit")
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                spy.wait(60)
                if folded.exists():
                    print(top(folded, 40))
    commit = report.commit()
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": commit,
        "machine": report.machine(),
        "load_average": {"min": min(loads), "max": max(loads)},
        "requests": args.requests,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "cpu_ms_per_hit": cpu,
        "paths": {
            path: {kind: summary(values) for kind, values in kinds.items()} for path, kinds in runs.items()
        },
    }
    text = markdown(results)
    print(text)
    say(f"results in {report.write_side_results('cache', results, results, text, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
