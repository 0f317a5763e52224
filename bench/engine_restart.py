"""Triton killed (SIGKILL) under streaming load, on the real models: how long until ferry answers again.

A stack of its own with `make run`'s models (Gemma 3 270M, SmolLM2 135M, all-MiniLM-L6-v2), auth on.
`--streams` streaming completions (REST, SSE) run on the default model; once each has its first chunk,
Triton is killed. Measured from the kill: when the streams ended (and with what), when /readyz turned
503, the first successful answer (a 1-token completion asked every 0.2 s), /readyz 200 again, and every
model READY again (the models service restores what Triton had loaded). Repeated `--rounds` times on
the same stack. Results are printed and written to build/bench/engine-restart-<date>.json.

Run: `python -P -m bench.engine_restart [--streams 4] [--rounds 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from bench import platform
from launcher.setup import ensure_backend, ensure_model
from services.common.config import REPO_ROOT, Settings

POLL_SECONDS = 0.2
LIMIT_SECONDS = 300.0


async def _stream(http: httpx.AsyncClient, model: str, started: asyncio.Event) -> str:
    """A long streaming completion; what ended it (`error ...`, `status ...` or `finished`)."""
    body = {"model": model, "prompt": "Write a long story about a ferry.", "max_tokens": 2000, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return f"status {response.status_code}"
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                started.set()
                if '"error"' in line:
                    return f"error {line[6:200]}"
    return "finished"


async def _until(check: Any, started: float) -> float:
    while not await check():
        if time.monotonic() - started > LIMIT_SECONDS:
            raise TimeoutError("not within the limit")
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic() - started


async def one_round(stack: Any, streams: int) -> dict[str, Any]:
    settings: Settings = stack.settings
    model = settings.triton.default_model
    key = platform.api_key(stack)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=stack.endpoints.rest, headers=headers, timeout=300) as http:
        events = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.create_task(_stream(http, model, e)) for e in events]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 300)
        os.kill(stack.supervisor().pid("triton"), signal.SIGKILL)
        killed = time.monotonic()
        endings = await asyncio.gather(*tasks)
        streams_ended = time.monotonic() - killed

        async def readyz(code: int) -> bool:
            try:
                return (await http.get("/readyz", timeout=2)).status_code == code
            except httpx.HTTPError:
                return False

        async def answers() -> bool:
            try:
                response = await http.post(
                    "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}, timeout=30
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        async def all_ready() -> bool:
            for name in settings.triton.load_models:
                response = await http.get(f"/api/v1/models/{name}", timeout=10)
                if response.status_code != 200 or response.json().get("state") != "STATE_READY":
                    return False
            return True

        readyz_503 = await _until(lambda: readyz(503), killed)
        first_answer = await _until(answers, killed)
        readyz_200 = await _until(lambda: readyz(200), killed)
        models_ready = await _until(all_ready, killed)
    return {
        "streams": streams,
        "stream_endings": endings,
        "streams_ended_s": round(streams_ended, 2),
        "readyz_503_s": round(readyz_503, 2),
        "first_answer_s": round(first_answer, 2),
        "readyz_200_s": round(readyz_200, 2),
        "all_models_ready_s": round(models_ready, 2),
        "load_average": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -P -m bench.engine_restart", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ready-timeout", type=float, default=platform.READY_TIMEOUT_S)
    args = parser.parse_args(argv)
    # A loaded machine loads the three models slowly (seen: 3 min at load average 50).
    platform.READY_TIMEOUT_S = args.ready_timeout
    home = Settings()
    ensure_model(home)
    ensure_backend()
    results = []
    logs = REPO_ROOT / "build" / "bench" / "engine-restart-logs"
    with platform.running(home.model_dir, keep_logs=logs) as stack:
        for i in range(args.rounds):
            result = asyncio.run(one_round(stack, args.streams))
            print(f"round {i + 1}: {json.dumps(result)}", flush=True)
            results.append(result)
    out = REPO_ROOT / "build" / "bench" / f"engine-restart-{datetime.now(UTC):%Y-%m-%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
