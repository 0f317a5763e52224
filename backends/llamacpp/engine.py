"""The llama.cpp engine (xllamacpp.Server) built from a model directory's parameters."""

from __future__ import annotations

import json
import os
import secrets
import urllib.request
from pathlib import Path
from typing import Any

from backends.llamacpp.config import ModelParameters


def engine_settings(params: ModelParameters, gguf: Path) -> Any:
    """llama.cpp's settings (xllamacpp.CommonParams) for a model directory; bench's raw-engine peer runs
    the same ones, with its HTTP listener opened instead of locked."""
    # llama.cpp's OpenMP threads spin while they wait by default. On a CPU shared with Triton, the
    # services and Envoy, that collapses decoding (measured 4 vs 25 tok/s under load). OpenMP reads
    # this when the library loads, so xllamacpp is imported only after it is set.
    os.environ["OMP_WAIT_POLICY"] = params.omp_wait_policy
    import xllamacpp

    engine = xllamacpp.CommonParams()
    engine.model.path = str(gguf)
    engine.n_parallel = params.n_parallel
    engine.n_ctx = params.ctx_size
    # Each slot gets an equal share of the context, so context_length is what every request can use.
    engine.kv_unified = False
    engine.cont_batching = True
    engine.n_gpu_layers = params.n_gpu_layers
    engine.cpuparams.n_threads = params.n_threads
    engine.cpuparams_batch.n_threads = params.n_threads
    # Bounded caches (see README.md, "Memory"): the host-memory prompt cache (llama.cpp's default
    # 8192 MiB grew the model process by ~1.2 MB per distinct prompt) and the per-slot checkpoints.
    engine.cache_ram_mib = params.prompt_cache_mib
    engine.n_ctx_checkpoints = params.ctx_checkpoints
    # xllamacpp also serves llama.cpp's HTTP API on a random port: keep it on loopback.
    engine.hostnames = ["127.0.0.1"]
    engine.port = 0
    # Only this process uses that listener (EngineTokenizer; requests go through handle_completions):
    # lock it with a key no one else knows.
    engine.api_keys = [secrets.token_urlsafe(32)]
    engine.cors_origins = ""
    engine.verbosity = params.log_verbosity
    return engine


def start_engine(params: ModelParameters, gguf: Path) -> tuple[Any, EngineTokenizer]:
    """Load the GGUF file into a llama.cpp server with continuous batching over `n_parallel` slots;
    also its tokenizer."""
    settings = engine_settings(params, gguf)
    import xllamacpp

    server = xllamacpp.Server(settings)
    return server, EngineTokenizer(server.listening_address, settings.api_keys[0])


class EngineTokenizer:
    """The engine's own tokenizer. xllamacpp has no tokenize method: llama.cpp's `/tokenize` route on
    the engine's loopback listener is the only way to it, with the key that locks that listener."""

    TIMEOUT_SECONDS = 10.0

    def __init__(self, address: str, key: str) -> None:
        self.url = address.rstrip("/") + "/tokenize"
        self.key = key

    def count(self, text: str) -> int:
        """How many tokens the engine reads for `text` as a prompt (special tokens parsed and the
        model's BOS added, as a completion's prompt is)."""
        body = json.dumps({"content": text, "add_special": True}).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=self.TIMEOUT_SECONDS) as response:
            return len(json.loads(response.read())["tokens"])
