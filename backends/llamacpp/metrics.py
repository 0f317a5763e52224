"""The backend's own metrics, on Triton's metrics endpoint (:8002/metrics) through pb_utils' custom metrics."""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from backends.llamacpp.config import ModelParameters
from backends.llamacpp.generation import Usage

MIB = 1 << 20


class EngineMetrics:
    """Prompt-cache bound and use, labelled with the model's name and version.

    Updates are serialised: a pb_utils Metric rewrites its own shared-memory message on every update,
    so two generation threads updating at once crashed tritonserver (SIGSEGV in the metric increment).
    """

    def __init__(self, model: str, version: str, params: ModelParameters) -> None:
        self._lock = threading.Lock()
        labels = {"model": model, "version": version}
        self._families = {
            "limit": pb_utils.MetricFamily(
                name="ferry_engine_prompt_cache_limit_bytes",
                description="Host memory llama.cpp may use for its prompt cache (parameter prompt_cache_mib)",
                kind=pb_utils.MetricFamily.GAUGE,
            ),
            "checkpoints": pb_utils.MetricFamily(
                name="ferry_engine_ctx_checkpoints_limit",
                description="Context checkpoints llama.cpp keeps per slot (parameter ctx_checkpoints)",
                kind=pb_utils.MetricFamily.GAUGE,
            ),
            "prompt": pb_utils.MetricFamily(
                name="ferry_engine_prompt_tokens_total",
                description="Prompt tokens of finished generations",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
            "cached": pb_utils.MetricFamily(
                name="ferry_engine_prompt_tokens_cached_total",
                description="Prompt tokens served from llama.cpp's caches instead of being evaluated",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
        }
        self._families["limit"].Metric(labels=labels).set(params.prompt_cache_mib * MIB)
        self._families["checkpoints"].Metric(labels=labels).set(params.ctx_checkpoints)
        self._prompt = self._families["prompt"].Metric(labels=labels)
        self._cached = self._families["cached"].Metric(labels=labels)

    def record(self, usage: Usage) -> None:
        with self._lock:
            self._prompt.increment(usage.prompt_tokens)
            if usage.cached_prompt_tokens:
                self._cached.increment(usage.cached_prompt_tokens)
