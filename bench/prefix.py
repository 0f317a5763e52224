"""Prompt prefix reuse: time-to-first-token of requests that share a long system prompt, with the
engine's cached prefix and without it.

`python -m bench.prefix` starts the whole platform with Gemma (as `make bench` does: authentication
on, Envoy, every service) and sends OpenAI completions through Envoy's REST listener, streaming, one
at a time (and, with `--levels 1,4`, also in waves of 4). Each prompt is the same ~1,000-token
system prompt followed by a short, never-repeated question:

- `shared`: the prompt as it is, so llama.cpp's slot prompt cache (`cache_prompt`, always on in the
  backend, `backends/llamacpp/request.py`) can serve the system prompt from the KV cache of the slot
  that last held it (llama.cpp picks the slot whose cached prompt shares the most with the new one,
  `slot_prompt_similarity`) or from its host-memory prompt cache (`prompt_cache_mib`);
- `fresh`: the same prompt with a never-used number in front, so nothing of it is cached (what every
  request would cost without reuse; there is no per-request switch to turn the cache off).

Per concurrency level, `--rounds` waves of `shared` requests (after one wave, not measured, that puts
the system prompt in the slots), then `--rounds` waves of `fresh` ones. A wave is `c` requests sent
together. (Alternating the kinds would measure something else at c > 1: each fresh wave takes over
every slot, so the next shared wave finds the prefix in none of them, and the 32 MiB host prompt cache
holds about one such state.) The engine's own counters (`ferry_engine_prompt_tokens_total` and
`..._cached_total` on Triton's metrics endpoint) say how many prompt tokens came from cache per kind.
Results: `bench/results/prefix-<date>-<commit>.{json,md}`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import platform, report
from bench.clients import sse_events
from bench.engine_params import MODEL_NAME, engine_params, engine_summary
from bench.metrics import percentile
from launcher.setup import ensure_backend, ensure_model, model_path
from services.common.config import get_settings

WORDS = (
    "account balance river stone cloud paper lamp orange violet quiet rapid window garden policy "
    "customer refund invoice order shipping delivery warranty product support ticket answer polite "
    "concise verify identity never share private data escalate manager hours weekend holiday store"
).split()
CACHED_METRIC = "ferry_engine_prompt_tokens_cached_total"
PROMPT_METRIC = "ferry_engine_prompt_tokens_total"


def say(message: str) -> None:
    print(f"bench.prefix: {message}", flush=True)


def system_prompt(words: int) -> str:
    """A fixed system prompt of `words` words (~1.05 Gemma tokens each)."""
    rng = random.Random(20261130)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are the support assistant of a small shop. Follow these rules exactly: {body}\n\n"


def question(rng: random.Random, serial: int) -> str:
    return f"Customer #{serial} ({rng.randrange(10**9)}): what about my {rng.choice(WORDS)}?\nAssistant:"


async def one(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft: float | None = None
    prompt_tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for event in sse_events(response):
            if event.get("error"):
                raise RuntimeError(f"stream error: {event['error']}")
            choices = event.get("choices") or []
            if ttft is None and choices and choices[0].get("text"):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
    return {"ttft_ms": None if ttft is None else 1000 * ttft, "prompt_tokens": prompt_tokens}


def engine_counters(metrics_url: str) -> tuple[float, float]:
    """(prompt tokens, prompt tokens from cache) the engine has processed so far."""
    text = httpx.get(metrics_url, timeout=10).text
    totals = {PROMPT_METRIC: 0.0, CACHED_METRIC: 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals[PROMPT_METRIC], totals[CACHED_METRIC]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [r["ttft_ms"] for r in rows if r["ttft_ms"] is not None]
    out: dict[str, Any] = {"requests": len(rows), "prompt_tokens": rows[0]["prompt_tokens"] if rows else 0}
    for q in (50, 90):
        out[f"ttft_p{q}_ms"] = percentile(ttfts, q)
    out["ttft_mean_ms"] = sum(ttfts) / len(ttfts) if ttfts else float("nan")
    cached = sum(r.get("cached_tokens", 0.0) for r in rows)
    total = sum(r.get("engine_prompt_tokens", 0.0) for r in rows)
    out["engine_cached_share"] = cached / total if total else float("nan")
    return out


async def measure(
    args: argparse.Namespace, rest: str, key: str | None, metrics_url: str, loads: list[float]
) -> dict[str, Any]:
    """The waves of every level; `loads` gets the 1-minute load average after each wave."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    system = system_prompt(args.words)
    rng = random.Random()
    serial = iter(range(10**9))
    results: dict[str, Any] = {"levels": {}}
    async with httpx.AsyncClient(base_url=rest, headers=headers, timeout=httpx.Timeout(900.0)) as http:
        for level in args.levels:
            rows: dict[str, list[dict[str, Any]]] = {"shared": [], "fresh": []}
            for kind in ("shared", "fresh"):
                # Shared: a first wave, not measured, puts the system prompt in the slots it lands on.
                for wave in range(args.rounds + (kind == "shared")):
                    prefix = (lambda: f"{rng.randrange(10**12)} ") if kind == "fresh" else (lambda: "")
                    prompts = [prefix() + system + question(rng, next(serial)) for _ in range(level)]
                    before = engine_counters(metrics_url)
                    got = await asyncio.gather(*(one(http, MODEL_NAME, p, args.max_tokens) for p in prompts))
                    after = engine_counters(metrics_url)
                    for row in got:
                        row["engine_prompt_tokens"] = (after[0] - before[0]) / level
                        row["cached_tokens"] = (after[1] - before[1]) / level
                    warm = kind == "shared" and wave == 0
                    if not warm:
                        rows[kind] += got
                    loads.append(os.getloadavg()[0])
                    ttfts = ", ".join(f"{r['ttft_ms']:.0f}" for r in got)
                    label = "warm-up" if warm else f"wave {wave + (kind == 'fresh')}"
                    say(f"c={level} {kind:<6} {label}: TTFT ms {ttfts}; load {os.getloadavg()[0]:.1f}")
            results["levels"][str(level)] = {
                kind: {"summary": summary(r), "requests": r} for kind, r in rows.items()
            }
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Prompt prefix reuse — {results['date']}, commit `{results['commit']['sha']}`",
        "",
        f"Gemma 3 270M through ferry (Envoy REST `/v1/completions`, streaming, temperature 0, "
        f"{results['max_tokens']} output tokens); engine {results['engine']}. Every prompt = the same "
        f"system prompt of ~{results['system_prompt_tokens']} tokens + a never-repeated question; `fresh` puts a "
        "never-used number in front (nothing cached). Per level: a warm-up wave of shared requests, then the shared waves, then the fresh ones. "
        f"Load average during the run: {results['load']['min']:.1f}-{results['load']['max']:.1f}.",
        "",
        "| c | prompt | requests | prompt tokens | TTFT p50 ms | TTFT p90 ms | TTFT mean ms | engine: prompt tokens from cache |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, kinds in results["levels"].items():
        for kind, data in kinds.items():
            s = data["summary"]
            lines.append(
                f"| {level} | {kind} | {s['requests']} | {s['prompt_tokens']} | {s['ttft_p50_ms']:,.0f} | "
                f"{s['ttft_p90_ms']:,.0f} | {s['ttft_mean_ms']:,.0f} | {100 * s['engine_cached_share']:.0f} % |"
            )
        shared, fresh = kinds["shared"]["summary"], kinds["fresh"]["summary"]
        lines.append(
            f"| {level} | **fresh / shared** | | | **{fresh['ttft_p50_ms'] / shared['ttft_p50_ms']:.1f}x** | | | |"
        )
    lines += [
        "",
        "TTFT = request sent → first chunk with text (bench/metrics.py's definition). The engine column is "
        "`ferry_engine_prompt_tokens_cached_total` / `ferry_engine_prompt_tokens_total` over each batch "
        "(Triton's metrics endpoint). Raw numbers in the JSON file beside this one.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--words", type=int, default=950, help="system prompt words (~1.05 tokens each)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (shared, fresh) per level")
    p.add_argument("--levels", default="1", help="concurrency levels, e.g. 1,4")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    settings = get_settings()
    ensure_model(settings)
    ensure_backend()
    started = time.monotonic()
    loads: list[float] = []
    with platform.running(model_path(settings).parent) as stack:
        e = stack.endpoints
        metrics_url = f"http://127.0.0.1:{stack.settings.triton.metrics_port}/metrics"
        loads.append(os.getloadavg()[0])
        measured = asyncio.run(measure(args, e.rest, platform.api_key(stack), metrics_url, loads))
        loads.append(os.getloadavg()[0])
    first = next(iter(measured["levels"].values()))
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": report.commit(),
        "machine": report.machine(),
        "engine": engine_summary(engine_params()),
        "max_tokens": args.max_tokens,
        "system_prompt_tokens": first["shared"]["summary"]["prompt_tokens"],
        "load": {"min": min(loads), "max": max(loads)},
        "wall_s": time.monotonic() - started,
        **measured,
    }
    text = markdown(results)
    say(f"results: {report.write_side_results('prefix', results, results, text, args.results_dir)}")
    print(text)


if __name__ == "__main__":
    main()
