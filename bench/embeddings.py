"""`make bench` (embeddings): all-MiniLM-L6-v2 through ferry vs the same ONNX model in-process.

Systems, one input (a sentence) per request:
- in-process: backends.onnx.encoder.Encoder (onnxruntime + tokenizers, the very files and settings of
  triton_models/all-minilm-l6-v2) called in this process by N threads, one sentence per call;
- in-process-batched: the same encoder given N sentences per ONNX Runtime run (what a perfect batcher
  of N callers would run);
- ferry-rest: POST /v1/embeddings through Envoy (base64, as the OpenAI SDK asks);
- ferry-grpc: native InferenceService/Embed on Envoy's port.
Concurrency 1 and 16; per level the systems alternate (A B C A B C ...). ferry runs on a stack of its
own that loads only the embedding model (the generation models would only add noise), with
authentication and recording on, as users run it. Results: bench/results/embeddings-<date>-<commit>.{json,md}.

Run: `python -m bench.embeddings [--requests-c1 N] [--requests-c16 N] [--rounds N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import tritonclient.grpc as triton_grpc
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

from backends.onnx.encoder import Encoder
from bench import platform, prompts, report
from launcher.setup import ensure_backend, ensure_model, onnx_models
from services.common.config import REPO_ROOT, Settings
from services.common.triton_client import with_access

MODEL = "all-minilm-l6-v2"
SYSTEMS = ("in-process", "in-process-batched", "ferry-rest", "ferry-grpc")
LEVELS = (1, 16)
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def say(message: str) -> None:
    print(f"bench.embeddings: {message}", flush=True)


def sentences() -> list[str]:
    """Sentences of the committed prompts (5 to 60 words each), in a fixed order."""
    out: list[str] = []
    for length in ("short", "medium"):
        for text in prompts.load(length):
            for part in text.replace("\n", " ").split(". "):
                words = part.split()
                if 5 <= len(words) <= 60:
                    out.append(" ".join(words))
    return out


# One request: embeds one sentence; returns its latency in seconds.
Call = Callable[[str], Awaitable[float]]


def summary(inputs: int, wall: float, latencies: Sequence[float]) -> dict[str, float]:
    return {
        "inputs": inputs,
        "seconds": wall,
        "embeddings_per_s": inputs / wall,
        "latency_p50_ms": 1000 * statistics.median(latencies),
    }


async def run_load(call: Call, texts: Sequence[str], concurrency: int) -> dict[str, float]:
    queue = list(texts)
    latencies: list[float] = []
    errors: list[str] = []

    async def worker() -> None:
        while queue:
            try:
                latencies.append(await call(queue.pop()))
            except (httpx.HTTPError, grpc.RpcError) as err:
                errors.append(_describe(err))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if errors:
        say(f"  {len(errors)} errors; the first: {errors[0]}")
    cell = summary(len(latencies), time.perf_counter() - started, latencies or [math.nan])
    cell["errors"] = len(errors)
    return cell


def _describe(err: Exception) -> str:
    if isinstance(err, httpx.HTTPStatusError):
        return f"HTTP {err.response.status_code}: {err.response.text[:300]}"
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return repr(err)


def in_process(encoder: Encoder, texts: Sequence[str], concurrency: int) -> dict[str, float]:
    """`concurrency` threads, each embedding one sentence per call (ONNX Runtime and tokenizers release
    the GIL), as `concurrency` callers of the model in this process would."""
    queue = list(texts)
    latencies: list[float] = []

    def worker() -> None:
        while True:
            try:
                text = queue.pop()
            except IndexError:
                return
            t0 = time.perf_counter()
            encoder.encode([text])
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    cell = summary(len(texts), time.perf_counter() - started, latencies)
    cell["errors"] = 0
    return cell


def in_process_batched(encoder: Encoder, texts: Sequence[str], concurrency: int) -> dict[str, float]:
    """`concurrency` sentences per ONNX Runtime run, one run after another (what a perfect batcher of
    `concurrency` callers would run)."""
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(0, len(texts), concurrency):
        t0 = time.perf_counter()
        encoder.encode(texts[i : i + concurrency])
        latencies.append(time.perf_counter() - t0)
    cell = summary(len(texts), time.perf_counter() - started, latencies)
    cell["errors"] = 0
    return cell


class RestClient:
    def __init__(self, base_url: str, key: str | None) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=64)
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60, limits=limits)

    async def __call__(self, text: str) -> float:
        t0 = time.perf_counter()
        body = {"model": MODEL, "input": text, "encoding_format": "base64"}
        reply = await self.http.post("/v1/embeddings", json=body)
        reply.raise_for_status()
        return time.perf_counter() - t0

    async def close(self) -> None:
        await self.http.aclose()


class GrpcClient:
    def __init__(self, address: str, key: str | None) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()

    async def __call__(self, text: str) -> float:
        t0 = time.perf_counter()
        request = inference_pb2.EmbedRequest(model=f"models/{MODEL}", inputs=[text])
        await self.stub.Embed(request, metadata=self.metadata, timeout=60)
        return time.perf_counter() - t0

    async def close(self) -> None:
        await self.channel.close()


async def ferry_run(
    make: Callable[[], RestClient | GrpcClient], texts: Sequence[str], level: int
) -> dict[str, float]:
    client = make()
    try:
        await run_load(client, texts[: 2 * level], level)  # warm-up: connections, the admission gate
        return await run_load(client, texts, level)
    finally:
        await client.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__.split("\n")[0])
    parser.add_argument("--requests-c1", type=int, default=200, help="requests per run at concurrency 1")
    parser.add_argument("--requests-c16", type=int, default=800, help="requests per run at concurrency 16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Embeddings: ferry vs the same ONNX model in-process — {meta['date']}, commit `{meta['commit']['sha']}`",
        "",
        f"all-MiniLM-L6-v2 (int8 ONNX, 384 dimensions), one sentence per request; {meta['machine']['cores']} cores "
        f"({meta['machine']['cpu']}); load average during the runs {meta['load']['min']:.1f}-{meta['load']['max']:.1f}.",
        "in-process: N threads each embedding one sentence per call; in-process-batched: N sentences per"
        " ONNX Runtime run. ratio = embeddings/s / in-process's at the same concurrency.",
        "",
        "| concurrency | system | embeddings/s | latency p50 (ms) | ratio | errors |",
        "|---|---|---|---|---|---|",
    ]
    for level in results["levels"]:
        cells = results["cells"][str(level)]
        base = cells["in-process"]["embeddings_per_s"]
        for system in SYSTEMS:
            cell = cells[system]
            lines.append(
                f"| {level} | {system} | {cell['embeddings_per_s']:.1f} | {cell['latency_p50_ms']:.2f} |"
                f" {cell['embeddings_per_s'] / base:.2f} | {cell['errors']:.0f} |"
            )
    lines += ["", f"Triton executions / inferences during the ferry runs: {results['triton_batching']}", ""]
    return "\n".join(lines)


def mean_cell(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.mean(run[key] for run in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = Settings()
    ensure_model(home)
    ensure_backend()
    texts = sentences()
    encoder = Encoder.load(onnx_models(REPO_ROOT / "triton_models")[MODEL], home.home)
    encoder.encode(texts[:16])  # warm-up
    loads: list[float] = []
    runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    overrides: dict[str, Any] = {"triton": {"load_models": [MODEL], "default_model": MODEL}}
    say("starting ferry with only the embedding model loaded")
    logs = REPO_ROOT / "build" / "bench" / "embeddings-logs"
    with platform.running(home.model_dir, keep_logs=logs, **overrides) as stack:
        e = stack.endpoints
        key = platform.api_key(stack)
        makers: dict[str, Callable[[], RestClient | GrpcClient]] = {
            "ferry-rest": lambda: RestClient(e.rest, key),
            "ferry-grpc": lambda: GrpcClient(e.grpc, key),
        }
        triton = with_access(triton_grpc.InferenceServerClient(e.triton_grpc), stack.settings.triton)
        before = triton.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        for level in LEVELS:
            count = args.requests_c1 if level == 1 else args.requests_c16
            for rnd in range(args.rounds):
                for system in SYSTEMS:
                    batch = [texts[(rnd * count + i) % len(texts)] for i in range(count)]
                    loads.append(os.getloadavg()[0])
                    if system == "in-process":
                        cell = in_process(encoder, batch, level)
                    elif system == "in-process-batched":
                        cell = in_process_batched(encoder, batch, level)
                    else:
                        cell = asyncio.run(ferry_run(makers[system], batch, level))
                    loads.append(os.getloadavg()[0])
                    runs.setdefault((level, system), []).append(cell)
                    say(
                        f"c={level} round {rnd + 1} {system:<10} {cell['embeddings_per_s']:7.1f} embeddings/s"
                        f"  p50 {cell['latency_p50_ms']:6.2f} ms"
                    )
        after = triton.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        triton.close()
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    inferences = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "commit": report.commit(),
            "machine": report.machine(),
            "load": {"min": min(loads), "max": max(loads), "mean": statistics.mean(loads)},
            "rounds": args.rounds,
        },
        "levels": list(LEVELS),
        "cells": {
            str(level): {system: mean_cell(runs[(level, system)]) for system in SYSTEMS} for level in LEVELS
        },
        "runs": {f"{level}/{system}": cells for (level, system), cells in runs.items()},
        "triton_batching": f"{executions} executions for {inferences} inferences",
    }
    text = markdown(results)
    written = report.write_side_results("embeddings", results["meta"], results, text, args.results_dir)
    say(f"wrote {written} and its .json")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
