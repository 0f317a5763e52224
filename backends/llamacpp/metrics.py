"""The backend's own metrics, on Triton's metrics endpoint (:8002/metrics) through pb_utils' custom metrics."""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from backends.llamacpp.config import ModelParameters
from backends.llamacpp.generation import Usage

MIB = 1 << 20


# name -> (kind, description) of each metric family the backend exports.
_FAMILIES = {
    "ferry_engine_prompt_cache_limit_bytes": (
        "GAUGE",
        "Host memory llama.cpp may use for its prompt cache (parameter prompt_cache_mib)",
    ),
    "ferry_engine_ctx_checkpoints_limit": (
        "GAUGE",
        "Context checkpoints llama.cpp keeps per slot (parameter ctx_checkpoints)",
    ),
    "ferry_engine_prompt_tokens_total": ("COUNTER", "Prompt tokens of finished generations"),
    "ferry_engine_prompt_tokens_cached_total": (
        "COUNTER",
        "Prompt tokens served from llama.cpp's caches instead of being evaluated",
    ),
}


class EngineMetrics:
    """The bounds of llama.cpp's caches and the prompt tokens they served, labelled with the model's name
    and version.

    How much of the prompt cache is in use is not exported: llama.cpp reports it only in its log ("cache
    state: N prompts, X MiB"), and xllamacpp's metrics handler has tokens, timings and requests but not
    the cache's size; so the cache's memory is held by its bound, not measured.

    Updates are serialised: a pb_utils Metric rewrites its own shared-memory message on every update,
    so two generation threads updating at once crashed tritonserver (SIGSEGV in the metric increment).
    """

    def __init__(self, model: str, version: str, params: ModelParameters) -> None:
        self._lock = threading.Lock()
        labels = {"model": model, "version": version}
        self._families = {
            name: pb_utils.MetricFamily(
                name=name, description=description, kind=getattr(pb_utils.MetricFamily, kind)
            )
            for name, (kind, description) in _FAMILIES.items()
        }
        metrics = {name: family.Metric(labels=labels) for name, family in self._families.items()}
        metrics["ferry_engine_prompt_cache_limit_bytes"].set(params.prompt_cache_mib * MIB)
        metrics["ferry_engine_ctx_checkpoints_limit"].set(params.ctx_checkpoints)
        self._prompt = metrics["ferry_engine_prompt_tokens_total"]
        self._cached = metrics["ferry_engine_prompt_tokens_cached_total"]

    def record(self, usage: Usage) -> None:
        with self._lock:
            self._prompt.increment(usage.prompt_tokens)
            if usage.cached_prompt_tokens:
                self._cached.increment(usage.cached_prompt_tokens)
