"""The raw-engine peer: llama.cpp's own OpenAI-compatible server (xllamacpp) for ferry's GGUF file.

`python -m bench.raw_engine --model FILE --port N` serves /v1/completions on 127.0.0.1:N with the
slots, context and threads of ferry's model config, prints `ready` and serves until SIGTERM/SIGINT.
With `$RAW_ENGINE_API_KEY` set it requires that key (tests of ferry's upstream providers).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from backends.llamacpp.engine import engine_settings
from bench.engine_params import MODEL_NAME, engine_params, engine_summary

# The API key the server requires (none when unset); an environment variable keeps it off the command line.
API_KEY_ENV = "RAW_ENGINE_API_KEY"


def build_params(model: Path, port: int) -> Any:
    """The model's own engine settings (backends.llamacpp.engine), with llama.cpp's OpenAI listener open."""
    params = engine_settings(engine_params(), model)
    params.port = port
    key = os.environ.get(API_KEY_ENV, "")
    params.api_keys = [key] if key else []
    # A set: a plain string would become a set of its characters.
    params.model_alias = {MODEL_NAME}
    return params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # build_params sets OpenMP's wait policy before xllamacpp is imported (it is read at load).
    params = build_params(args.model, args.port)
    import xllamacpp

    server = xllamacpp.Server(params)
    print(json.dumps({"ready": True, "engine": engine_summary(engine_params())}), flush=True)
    stop.wait()
    del server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(model: Path, log: Path, timeout_s: float = 120, api_key: str = "") -> Iterator[str]:
    """Runs the peer in its own process (as a real server would be); yields its base URL. With
    `api_key` it answers only requests that bear it."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.raw_engine", "--model", str(model), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_WAIT_POLICY": engine_params().omp_wait_policy, API_KEY_ENV: api_key},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"raw engine exited with {proc.returncode}; see {log}")
            try:
                headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
                if httpx.get(f"{url}/v1/models", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw engine not ready after {timeout_s} s; see {log}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
