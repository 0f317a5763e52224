"""Prometheus metrics of embeddings beyond the generation path's shared ones (`ferry_inference_requests`
with api="embedding", `ferry_inference_e2e_request_latency_seconds`, `ferry_inference_prompt_tokens`)."""

from __future__ import annotations

from prometheus_client import Histogram

INPUTS = Histogram(
    "ferry_inference_embedding_inputs",
    "Inputs (texts) per embeddings request.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
