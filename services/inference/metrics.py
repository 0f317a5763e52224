"""Prometheus metrics of the generation path, `ferry_inference_*`.

Names follow vLLM's where one exists (time_to_first_token_seconds, e2e_request_latency_seconds,
prompt/generation token counters, running/waiting gauges) so dashboards built for it carry over. Latency histograms carry trace exemplars (services.common.metrics).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.common.metrics import TracedHistogram

# Requests by how they ended: ok, invalid_argument, not_found, unavailable, resource_exhausted
# (refused by admission), cancelled, deadline_exceeded, internal ...
REQUESTS = Counter(
    "ferry_inference_requests",
    "Generation requests finished, by model, API and outcome (lower-case gRPC code).",
    ["model", "api", "outcome"],
)
FINISHED = Counter(
    "ferry_inference_finish_reason",
    "Generations that completed, by finish reason (stop, length, cancelled).",
    ["model", "reason"],
)
TIME_TO_FIRST_TOKEN = TracedHistogram(
    "ferry_inference_time_to_first_token_seconds",
    "Seconds from receiving a request to its first generated piece (queueing and prefill included).",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 40, 80),
)
INTER_TOKEN_LATENCY = TracedHistogram(
    "ferry_inference_inter_token_latency_seconds",
    "Seconds between consecutive generated tokens of one request (vLLM: time_per_output_token).",
    ["model"],
    buckets=(0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5),
)
E2E_LATENCY = TracedHistogram(
    "ferry_inference_e2e_request_latency_seconds",
    "Seconds from receiving a request to its last piece.",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300),
)
QUEUE_DURATION = TracedHistogram(
    "ferry_inference_queue_duration_seconds",
    "Seconds a request waited for an admission slot.",
    ["model"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80),
)
PROMPT_TOKENS = Counter(
    "ferry_inference_prompt_tokens",
    "Prompt tokens processed.",
    ["model"],
)
COMPLETION_TOKENS = Counter(
    "ferry_inference_completion_tokens",
    "Tokens generated (vLLM: generation_tokens).",
    ["model"],
)
IN_FLIGHT = Gauge(
    "ferry_inference_requests_in_flight",
    "Generations holding an admission slot now (vLLM: num_requests_running).",
    ["model"],
)
QUEUED = Gauge(
    "ferry_inference_requests_queued",
    "Requests waiting for an admission slot (vLLM: num_requests_waiting).",
    ["model"],
)
ADMISSION_LIMIT = Gauge(
    "ferry_inference_admission_limit",
    "Configured admission bounds: kind=in_flight or queued.",
    ["model", "kind"],
)

# The response cache (services.inference.response_cache).
RESPONSE_CACHE_HITS = Counter(
    "ferry_inference_response_cache_hits",
    "Deterministic requests answered from the response cache.",
    ["model"],
)
RESPONSE_CACHE_MISSES = Counter(
    "ferry_inference_response_cache_misses",
    "Deterministic requests the response cache had no answer for (they generated).",
    ["model"],
)
RESPONSE_CACHE_BYPASSES = Counter(
    "ferry_inference_response_cache_bypasses",
    "Deterministic requests that opted out of the cache (Cache-Control no-cache / no-store, cache_policy).",
    ["model"],
)
RESPONSE_CACHE_STORES = Counter(
    "ferry_inference_response_cache_stores",
    "Fresh answers kept in the response cache.",
    ["model"],
)
RESPONSE_CACHE_ERRORS = Counter(
    "ferry_inference_response_cache_errors",
    "Failed calls to the shared response cache store (the request went on as a miss), by operation.",
    ["operation"],
)
RESPONSE_CACHE_ENTRIES = Gauge(
    "ferry_inference_response_cache_entries",
    "Answers in this process's response cache (the in-process LRU).",
)
RESPONSE_CACHE_BYTES = Gauge(
    "ferry_inference_response_cache_bytes",
    "Bytes of the answers in this process's response cache (the in-process LRU).",
)
