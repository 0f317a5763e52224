"""Overload: how fast a burst beyond capacity is refused, and what it does to the requests being served.

`python -P -m bench.overload` starts the whole platform with Gemma (4 engine slots; authentication
on, Envoy, every service, as `make bench` does). Per variant (`rest`, then `grpc`):

1. 4 streaming REST completions keep Gemma's 4 slots busy; their inter-token latency (the gap between
   two stream events, as the client sees it) is measured for `--before` seconds;
2. a burst of `--burst` concurrent generations (max_tokens 8) is sent over connections opened
   beforehand: REST `POST /v1/completions` over that many kept-alive HTTP/1.1 connections, or native
   gRPC `Generate` over one HTTP/2 channel. Each answer's latency (sent -> answer complete), status
   and whether Envoy decided it (`x-envoy-overloaded`) is recorded; refusals (429 /
   RESOURCE_EXHAUSTED) are what the issue bounds (p99 <= 100 ms);
3. the streams' ITL is measured again from the burst until its last refusal ("during");
4. the streams are cancelled, which lets the admitted part of the burst (queued at the service) run.

Envoy refuses what is beyond the fleet's admission capacity (its generation cluster's max_requests:
replicas x every generation model's slots + queue, 72 with Gemma and SmolLM2 at 4 + 32 each), the
inference service refuses a full model below that. `--edge-limit N` sets envoy.generation_max_requests
(e.g. 36: Gemma alone, when no other model will be loaded). Results:
bench/results/overload-<date>-<commit>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

from bench import platform, report
from bench.clients import sse_events
from bench.engine_params import MODEL_NAME, engine_params, engine_summary
from bench.metrics import percentile
from launcher.setup import ensure_backend, ensure_model, model_path
from services.common.config import get_settings

TARGET_P99_MS = 100.0
STREAMS = 4
STREAM_TOKENS = 3000  # outlasts the measurement; the streams are cancelled after it
BURST_TOKENS = 8
QUIET_S = 3.0  # no new answer for this long: the burst's refusals are all in


def say(message: str) -> None:
    print(f"bench.overload: {message}", flush=True)


def stats(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
    }


class Streams:
    """STREAMS streaming completions kept running; each event's arrival time is recorded."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.times: list[list[float]] = [[] for _ in range(STREAMS)]
        self.tasks: list[asyncio.Task[None]] = []

    async def _one(self, index: int) -> None:
        body = {
            "model": MODEL_NAME,
            "prompt": f"Story {index}: once upon a time",
            "max_tokens": STREAM_TOKENS,
            "ignore_eos": True,
            "stream": True,
        }
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"stream {index}: HTTP {response.status_code}")
            async for event in sse_events(response):
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    self.times[index].append(time.perf_counter())

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._one(i)) for i in range(STREAMS)]

    async def until_flowing(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(len(t) >= 3 for t in self.times):
            for task in self.tasks:
                if task.done():
                    task.result()
            if time.monotonic() > deadline:
                raise RuntimeError("the streams did not start")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def stream_process(rest: str, key: str | None, flowing: Any, stop: Any, out: Any) -> None:
    """The served streams in a process of their own, so that the burst's client work (this machine's
    Python, 200 requests at once) does not delay when their events are read; perf_counter is the
    system's monotonic clock, the same in both processes."""

    async def run() -> list[list[float]]:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(base_url=rest, headers=headers, timeout=httpx.Timeout(900.0)) as http:
            streams = Streams(http)
            streams.start()
            await streams.until_flowing()
            flowing.set()
            await asyncio.to_thread(stop.wait)
            await streams.stop()
            return streams.times

    out.put(asyncio.run(run()))


def itl_ms(times: list[list[float]], start: float, end: float) -> list[float]:
    """Gaps between consecutive events whose later event falls in [start, end)."""
    return [1000 * (b - a) for ts in times for a, b in itertools.pairwise(ts) if start <= b < end]


def edge_refusals_ms(access_log: Path, skip: int) -> tuple[list[float], int]:
    """Envoy's own time (%DURATION%, first byte in to last byte out) of each overflow refusal (flag UO)
    logged after the first `skip` lines; and the lines read."""
    lines = access_log.read_text().splitlines() if access_log.exists() else []
    durations = []
    for line in lines[skip:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "UO" in str(entry.get("flags", "")):
            durations.append(float(entry["duration_ms"]))
    return durations, len(lines)


async def rest_burst(http: aiohttp.ClientSession, size: int) -> list[asyncio.Task[dict[str, Any]]]:
    async def one() -> dict[str, Any]:
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": BURST_TOKENS}
        sent = time.perf_counter()
        async with http.post("/v1/completions", json=body) as response:
            await response.read()
        done = time.perf_counter()
        return {
            "status": str(response.status),
            "ms": 1000 * (done - sent),
            "done": done,
            "edge": response.headers.get("x-envoy-overloaded") == "true",
            "refused": response.status == 429,
        }

    return [asyncio.create_task(one()) for _ in range(size)]


async def grpc_burst(
    stub: inference_pb2_grpc.InferenceServiceStub, size: int, metadata: tuple[tuple[str, str], ...]
) -> list[asyncio.Task[dict[str, Any]]]:
    request = inference_pb2.GenerateRequest(
        model=f"models/{MODEL_NAME}",
        prompt="Hello",
        sampling=inference_pb2.SamplingParams(max_tokens=BURST_TOKENS),
    )

    async def one() -> dict[str, Any]:
        sent = time.perf_counter()
        call = stub.Generate(request, metadata=metadata, timeout=600)
        try:
            await call
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            code = err.code()
        done = time.perf_counter()
        initial = dict(await call.initial_metadata() or ())
        trailing = dict(await call.trailing_metadata() or ())
        return {
            "status": code.name,
            "ms": 1000 * (done - sent),
            "done": done,
            "edge": (initial.get("x-envoy-overloaded") or trailing.get("x-envoy-overloaded")) == "true",
            "refused": code == grpc.StatusCode.RESOURCE_EXHAUSTED,
        }

    return [asyncio.create_task(one()) for _ in range(size)]


async def quiet(tasks: list[asyncio.Task[dict[str, Any]]]) -> float:
    """Waits until every task is done or none finished for QUIET_S (the rest wait for a slot); returns
    when the last one so far finished."""
    last = time.perf_counter()
    seen = 0
    while True:
        done = sum(t.done() for t in tasks)
        if done == len(tasks):
            break
        if done != seen:
            seen, last = done, time.perf_counter()
        elif time.perf_counter() - last > QUIET_S:
            break
        await asyncio.sleep(0.05)
    finished = [t.result()["done"] for t in tasks if t.done()]
    return max(finished) if finished else time.perf_counter()


async def warm(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/models") as response:
        await response.read()


async def healthz_burst(http: aiohttp.ClientSession, size: int) -> list[float]:
    """The floor: the same client's burst of GET /healthz, which Envoy answers itself (no filter work,
    no upstream), timed the same way."""

    async def one() -> float:
        sent = time.perf_counter()
        async with http.get("/healthz") as response:
            await response.read()
        return 1000 * (time.perf_counter() - sent)

    return list(await asyncio.gather(*(one() for _ in range(size))))


async def take_lease(http: aiohttp.ClientSession) -> None:
    """A key check of the burst's method just before it, as steady traffic keeps one: the edge lease
    (auth.edge_lease_requests) then admits the burst's key without asking the gateway. A model that
    does not exist: allowed by the key check, answered at once by the service (no slot needed)."""
    body = {"model": "no-such-model", "prompt": "x", "max_tokens": 1}

    async def one() -> None:
        async with http.post("/v1/completions", json=body) as response:
            await response.read()

    await asyncio.gather(*(one() for _ in range(8)))


async def grpc_take_lease(
    stub: inference_pb2_grpc.InferenceServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    request = inference_pb2.GenerateRequest(model="models/no-such-model", prompt="x")
    for _ in range(2):
        try:
            await stub.Generate(request, metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError:
            pass


async def variant(
    name: str, rest: str, grpc_target: str, key: str | None, access_log: Path, args: argparse.Namespace
) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    size = args.burst
    # aiohttp: a lighter client than httpx for 200 requests at once (httpx's pool alone took seconds).
    connector = aiohttp.TCPConnector(limit=size, limit_per_host=size)
    timeout = aiohttp.ClientTimeout(total=900)
    context = multiprocessing.get_context("spawn")
    flowing, stop, out = context.Event(), context.Event(), context.Queue()
    child = context.Process(target=stream_process, args=(rest, key, flowing, stop, out), daemon=True)
    async with (
        aiohttp.ClientSession(rest, headers=headers, connector=connector, timeout=timeout) as http,
        grpc.aio.insecure_channel(grpc_target) as channel,
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        # Connections opened before the burst: a burst over warm ones.
        floor: dict[str, float] = {}
        if name == "rest":
            await asyncio.gather(*(warm(http) for _ in range(size)))
            floor = stats(await healthz_burst(http, size))
        else:
            await channel.channel_ready()
            await grpc_burst_warm(stub, metadata)
        child.start()
        while not flowing.wait(0):
            if not child.is_alive():
                raise RuntimeError("the streams' process ended")
            await asyncio.sleep(0.1)
        before_start = time.perf_counter()
        await asyncio.sleep(args.before)
        if args.lease:
            await (take_lease(http) if name == "rest" else grpc_take_lease(stub, metadata))
        _, skip = edge_refusals_ms(access_log, 0)
        burst_start = time.perf_counter()
        load_at_burst = os.getloadavg()[0]
        tasks = await (rest_burst(http, size) if name == "rest" else grpc_burst(stub, size, metadata))
        burst_end = await quiet(tasks)
        stop.set()
        times: list[list[float]] = await asyncio.to_thread(out.get, True, 120)
        child.join(30)
        rows = await asyncio.gather(*tasks)
    await asyncio.sleep(1.5)  # Envoy flushes its access log every second
    envoy_ms, _ = edge_refusals_ms(access_log, skip)
    itl_before = itl_ms(times, before_start, burst_start)
    itl_during = itl_ms(times, burst_start, max(burst_end, burst_start + 1.0))
    refusals = [r for r in rows if r["refused"]]
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    result = {
        "burst": size,
        "healthz_burst_ms": floor,
        "statuses": statuses,
        "refusal_ms": stats([r["ms"] for r in refusals]),
        "edge_refusal_ms": stats([r["ms"] for r in refusals if r["edge"]]),
        "service_refusal_ms": stats([r["ms"] for r in refusals if not r["edge"]]),
        "envoy_refusal_ms": stats(envoy_ms),
        "admitted": sum(1 for r in rows if not r["refused"]),
        "itl_before_ms": stats(itl_before),
        "itl_during_ms": stats(itl_during),
        "during_s": burst_end - burst_start,
        "load_at_burst": load_at_burst,
    }
    r, e = result["refusal_ms"], result["envoy_refusal_ms"]
    say(
        f"{name}: {len(refusals)} refused ({result['edge_refusal_ms']['count']} by Envoy) "
        f"p50 {r['p50']:.1f} p99 {r['p99']:.1f} max {r['max']:.1f} ms (Envoy's own time p50 {e['p50']:.2f} "
        f"p99 {e['p99']:.2f} ms); statuses {statuses}; ITL p50 "
        f"{result['itl_before_ms']['p50']:.1f} -> {result['itl_during_ms']['p50']:.1f} ms, p99 "
        f"{result['itl_before_ms']['p99']:.1f} -> {result['itl_during_ms']['p99']:.1f} ms"
    )
    return result


async def grpc_burst_warm(
    stub: inference_pb2_grpc.InferenceServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    request = inference_pb2.GenerateRequest(
        model=f"models/{MODEL_NAME}", prompt="Hi", sampling=inference_pb2.SamplingParams(max_tokens=1)
    )
    await stub.Generate(request, metadata=metadata, timeout=600)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Overload — {results['date']}, commit `{results['commit']['sha']}`"
        f"{' (uncommitted changes)' if results['commit']['dirty'] else ''}",
        "",
        f"Gemma 3 270M ({STREAMS} engine slots; engine {results['engine']}) through ferry with authentication "
        f"on. {STREAMS} streaming completions keep every slot busy; then a burst of {results['burst']} "
        f"concurrent generations (max_tokens {BURST_TOKENS}) over connections opened beforehand. Envoy's "
        f"generation limit (fleet admission capacity): **{results['edge_limit']}**. "
        f"{'The key was checked for the method just before the burst (its edge lease live, as steady traffic keeps it). ' if results['lease'] else 'No key check of the method before the burst (each request waits for the gateway). '}"
        f"Machine: "
        f"{results['machine']['cores']} cores, shared and loaded (load average "
        f"{results['load']['min']:.1f}-{results['load']['max']:.1f} during the run).",
        "",
        "| burst | answers | refusals | by Envoy | refusal p50 ms | p99 ms | max ms | Envoy-refused p50 / p99 ms | "
        "service-refused p50 / p99 ms | Envoy's own time per refusal p50 / p99 / max ms | "
        "stream ITL p50 before → during ms | ITL p99 before → during ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        r, e, s = v["refusal_ms"], v["edge_refusal_ms"], v["service_refusal_ms"]
        own, b, d = v["envoy_refusal_ms"], v["itl_before_ms"], v["itl_during_ms"]
        answers = ", ".join(f"{k}: {n}" for k, n in sorted(v["statuses"].items()))
        lines.append(
            f"| {name} | {answers} | {r['count']} | {e['count']} | {r['p50']:.1f} | **{r['p99']:.1f}** | "
            f"{r['max']:.1f} | {e['p50']:.1f} / {e['p99']:.1f} | {s['p50']:.1f} / {s['p99']:.1f} | "
            f"{own['p50']:.2f} / {own['p99']:.2f} / {own['max']:.2f} | "
            f"{b['p50']:.1f} → {d['p50']:.1f} | {b['p99']:.1f} → {d['p99']:.1f} |"
        )
    healthz = results["variants"].get("rest", {}).get("healthz_burst_ms") or {}
    floor = (
        f"p50 {healthz['p50']:.1f} / p99 {healthz['p99']:.1f} / max {healthz['max']:.1f} ms"
        if healthz
        else "not measured"
    )
    lines += [
        "",
        f"Refusal latency: sent → answer complete, as the client sees it (target p99 ≤ {TARGET_P99_MS:.0f} ms). "
        "`by Envoy`: the answer carried `x-envoy-overloaded` (the generation cluster's circuit breaker); the "
        "others were refused by the inference service's own admission (a full model below the fleet "
        "limit). Floor (REST): the same client's burst of `GET /healthz`, which Envoy answers itself: "
        f"{floor}. Envoy's own time: %DURATION% of each UO line of its access log (first byte in to last "
        "byte out, no client in it). ITL: gap between two stream events of the 4 served streams (read by a "
        "process of their own), before the burst and from it to its last refusal. Raw numbers in the JSON "
        "file beside this one.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -P -m bench.overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--burst", type=int, default=200, help="concurrent generations in the burst")
    p.add_argument("--before", type=float, default=6.0, help="seconds of ITL measured before the burst")
    p.add_argument("--variants", default="rest,grpc", help="rest, grpc or both")
    p.add_argument(
        "--no-lease",
        dest="lease",
        action="store_false",
        help="no key check of the method just before the burst",
    )
    p.add_argument("--edge-limit", type=int, default=0, help="envoy.generation_max_requests (0: derived)")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    args = p.parse_args(argv)
    settings = get_settings()
    ensure_model(settings)
    ensure_backend()
    started = time.monotonic()
    loads = [os.getloadavg()[0]]
    overrides: dict[str, Any] = (
        {"envoy": {"generation_max_requests": args.edge_limit}} if args.edge_limit else {}
    )
    with platform.running(model_path(settings).parent, **overrides) as stack:
        from launcher.envoy import generation_limits

        edge_limit = generation_limits(stack.settings).max_requests
        e = stack.endpoints
        key = platform.api_key(stack)
        variants: dict[str, Any] = {}
        for name in args.variants.split(","):
            access_log = stack.settings.log_dir / "envoy-access.log"
            variants[name] = asyncio.run(variant(name, e.rest, e.grpc, key, access_log, args))
            loads.append(os.getloadavg()[0])
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": report.commit(),
        "machine": report.machine(),
        "engine": engine_summary(engine_params()),
        "burst": args.burst,
        "edge_limit": edge_limit,
        "lease": args.lease,
        "load": {"min": min(loads), "max": max(loads)},
        "wall_s": time.monotonic() - started,
        "variants": variants,
    }
    # A set limit is a run of its own beside the derived one.
    limit = f"-limit{args.edge_limit}" if args.edge_limit else ""
    text = markdown(results)
    say(f"results: {report.write_side_results('overload', results, results, text, args.results_dir, limit)}")
    print(text)


if __name__ == "__main__":
    main()
