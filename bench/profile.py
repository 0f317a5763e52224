"""Where a ferry process (the Inference service by default) spends its time under load: py-spy.

`python -m bench.profile [--model bench-stream|gemma-3-270m] [--path grpc,rest] [-c 1,16] [--seconds S]`
starts a stack (the trivial model by default, so only the serving path shows), and for each path and
concurrency keeps `c` requests in flight through Envoy while py-spy samples the Inference service, and
prints the functions with the most samples (inclusive and own time). The folded stacks are kept for a
flame graph. `--native` shows what grpc's Cython and C core do inside `Handle._run`; `--gil` keeps only
samples holding the GIL (what competes for the one core the event loop has).

`python -m bench.profile --floor` starts no stack: it measures what a bare grpc.aio relay costs on this
machine (a server stream fed by a bidirectional stream, as the Inference service is fed by Triton,
with nothing of ferry's in between): CPU per request at 2 and 32 messages, hence per message. The
difference to the service's own figures is what ferry's code adds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import platform, prompts
from bench.clients import Client, GrpcClient, SseClient, TritonClient
from bench.engine_params import MODEL_NAME
from bench.metrics import Record, summarize
from launcher.setup import ensure_backend, ensure_model, model_path
from launcher.stack import Stack
from services.common.config import REPO_ROOT, get_settings

PY_SPY = Path(sys.executable).with_name("py-spy")


async def _load(make: Callable[[], Client], concurrency: int, seconds: float, tokens: int) -> list[Record]:
    client = make()
    records: list[Record] = []
    stop = time.monotonic() + seconds
    rng = random.Random()

    async def worker() -> None:
        while time.monotonic() < stop:
            records.append(await client(prompts.unique(1, rng, "short")[0], tokens))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return records


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each of the stack's programs, children included,
    by its PostgreSQL, and by this process (the load client)."""
    out: dict[str, float] = {}

    def total(proc: psutil.Process) -> float:
        seconds = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                times = p.cpu_times()
                seconds += times.user + times.system
            except psutil.Error:
                pass
        return seconds

    for name, info in stack.supervisor().processes().items():
        if info["pid"]:
            out[name] = total(psutil.Process(info["pid"]))
    home = str(stack.settings.home)
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "postgres" and any(home in part for part in proc.info["cmdline"] or ()):
                out["postgres"] = out.get("postgres", 0.0) + total(proc)
                break  # the postmaster; its backends are its children
        except psutil.Error:
            pass
    me = psutil.Process()
    out["load client"] = me.cpu_times().user + me.cpu_times().system
    return out


def top(folded: Path, limit: int = 25) -> str:
    """Inclusive and own sample counts per function from py-spy's folded ('raw') output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        # Skip the process/thread header frames py-spy puts first.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    lines = [f"{total} samples"]
    lines.append("-- inclusive --")
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(limit)]
    lines.append("-- own --")
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(limit)]
    return "\n".join(lines)


FLOOR_TOKENS = (2, 32)


def _floor_upstream(port: int, ready: multiprocessing.Queue[int]) -> None:
    """Triton's part: a bidirectional stream answering each request with `id` messages of one token."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    class Model(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def ModelStreamInfer(self, requests: Any, context: Any) -> Any:
            async for request in requests:
                for _ in range(int(request.id)):
                    response = service_pb2.ModelInferResponse(model_name="m")
                    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
                    response.raw_output_contents.append(b"\x03\x00\x00\x00 hi")
                    yield service_pb2.ModelStreamInferResponse(infer_response=response)

    async def serve() -> None:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Model(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


def _floor_relay(port: int, upstream: int, ready: multiprocessing.Queue[int]) -> None:
    """The Inference service's part, bare: GenerateStream relaying the upstream stream's messages."""
    import grpc
    from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    async def serve() -> None:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(f"127.0.0.1:{upstream}"))

        class Relay(inference_pb2_grpc.InferenceServiceServicer):
            async def GenerateStream(self, request: Any, context: Any) -> Any:
                call = stub.ModelStreamInfer()
                await call.write(service_pb2.ModelInferRequest(id=str(request.sampling.max_tokens)))
                for _ in range(request.sampling.max_tokens):
                    response = await call.read()
                    text = response.infer_response.raw_output_contents[0][4:].decode()
                    yield inference_pb2.GenerateStreamResponse(text=text, token_count=1)
                await call.done_writing()
                await call.read()

        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(Relay(), server)  # type: ignore[abstract]
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


async def _floor_requests(port: int, requests: int, tokens: int) -> None:
    import grpc
    from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(sampling=inference_pb2.SamplingParams(max_tokens=tokens))
        for _ in range(requests):
            async for _message in stub.GenerateStream(request):
                pass


def floor(requests: int = 600, rounds: int = 2) -> None:
    """Prints the bare relay's CPU per request (best of `rounds`) at each of FLOOR_TOKENS, and per message."""
    from launcher.ports import free_ports

    ready: multiprocessing.Queue[int] = multiprocessing.Queue()
    upstream_port, relay_port = free_ports(2)
    upstream = multiprocessing.Process(target=_floor_upstream, args=(upstream_port, ready), daemon=True)
    upstream.start()
    ready.get(timeout=30)
    relay = multiprocessing.Process(target=_floor_relay, args=(relay_port, upstream_port, ready), daemon=True)
    relay.start()
    ready.get(timeout=30)
    measured = psutil.Process(relay.pid)
    best: dict[int, float] = {}
    try:
        for _ in range(rounds):
            for tokens in FLOOR_TOKENS:
                asyncio.run(_floor_requests(relay_port, 50, tokens))  # warm-up
                before = sum(measured.cpu_times()[:2])
                asyncio.run(_floor_requests(relay_port, requests, tokens))
                used = 1000 * (sum(measured.cpu_times()[:2]) - before) / requests
                best[tokens] = min(best.get(tokens, used), used)
    finally:
        relay.kill()
        upstream.kill()
    low, high = FLOOR_TOKENS
    per_message = 1000 * (best[high] - best[low]) / (high - low)
    print(
        f"bare grpc.aio relay (load average {os.getloadavg()[0]:.2f}): "
        + ", ".join(f"{best[t]:.3f} ms CPU per request at {t} messages" for t in FLOOR_TOKENS)
        + f"; {per_message:.0f} µs per message"
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--model", default="bench-stream", choices=("bench-stream", MODEL_NAME))
    p.add_argument("--path", default="grpc", help="grpc, rest or triton; several comma-separated")
    p.add_argument("-c", "--concurrency", default="1", help="requests in flight; several comma-separated")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--tokens", default="32", help="tokens per request; several comma-separated")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument(
        "--stop", default="", help="programs to stop first, e.g. transactions,audit (what they cost)"
    )
    p.add_argument("--process", default="inference", help="the program py-spy samples (e.g. gateway)")
    p.add_argument("--native", action="store_true", help="also sample native frames (Cython, C)")
    p.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    p.add_argument("--floor", action="store_true", help="measure a bare grpc.aio relay instead (no stack)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench" / "profile")
    args = p.parse_args()
    if args.floor:
        floor()
        return
    paths = [path for path in args.path.split(",") if path]
    if unknown := set(paths) - {"grpc", "rest", "triton"}:
        p.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    settings = get_settings()
    ensure_model(settings)
    ensure_backend()
    overrides = platform.bench_model_overrides() if args.model == "bench-stream" else {}
    args.out.mkdir(parents=True, exist_ok=True)
    with platform.running(model_path(settings).parent, **overrides) as stack:
        for name in filter(None, args.stop.split(",")):
            stack.supervisor().stop(name)
        for path in paths:
            for concurrency in levels:
                for tokens in [int(t) for t in args.tokens.split(",") if t]:
                    _profile(stack, args, path, concurrency, tokens)


def _profile(stack: Stack, args: argparse.Namespace, path: str, concurrency: int, tokens: int) -> None:
    e = stack.endpoints
    key = platform.api_key(stack)
    folded = args.out / f"{args.process}-{args.model}-{path}-c{concurrency}-t{tokens}.folded"
    folded.unlink(missing_ok=True)
    make: Callable[[], Client] = (
        (lambda: GrpcClient(e.grpc, args.model, key)) if path == "grpc"
        else (lambda: SseClient(e.rest, args.model, api_key=key)) if path == "rest"
        else (lambda: TritonClient(e.triton_grpc, args.model, stack.settings.triton))
    )  # fmt: skip
    asyncio.run(_load(make, concurrency, 2, tokens))  # warm-up
    pid = stack.supervisor().pid(args.process)
    command = [str(PY_SPY), "record", "--pid", str(pid), "--rate", str(args.rate), "--duration",
               str(int(args.seconds)), "--format", "raw", "--output", str(folded)]  # fmt: skip
    # py-spy reads native stacks only from a stopped process (each sample pauses it: slower then).
    command += ["--native"] if args.native else ["--nonblocking"]
    command += ["--gil"] if args.gil else []
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    cpu_before = cpu_seconds(stack)
    records = asyncio.run(_load(make, concurrency, args.seconds, tokens))
    cpu_after = cpu_seconds(stack)
    spy.wait(60)
    s = summarize(records)
    print(
        f"{path} c={concurrency} tokens={tokens}: {s['requests']} requests, TTFT p50 {s['ttft_ms']['p50']:.2f} ms, "
        f"ITL p50 {s['itl_ms']['p50']:.3f} ms, e2e p50 {s['e2e_ms']['p50']:.2f} ms, {s['req_s']:.1f} req/s, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    ok = max(int(s["requests"]), 1)
    print("CPU per request (ms) by process; py-spy's own sampling is charged to nobody here:")
    for name in sorted(cpu_after, key=lambda n: cpu_before.get(n, 0.0) - cpu_after[n]):
        used = cpu_after[name] - cpu_before.get(name, 0.0)
        print(f"  {name:<14} {1000 * used / ok:7.3f}")
    if folded.exists():
        print(top(folded))
        print(f"folded stacks: {folded}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
