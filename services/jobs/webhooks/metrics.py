"""Prometheus metrics of job webhooks (the Jobs service process: delivery and ingestion)."""

from prometheus_client import Counter, Histogram

DELIVERY_TRIES = Counter(
    "ferry_webhook_delivery_tries",
    "Delivery tries of job-end events, by outcome: delivered (2xx), retry (failed, another try follows),"
    " failed (failed, retries used up).",
    ["outcome"],
)
DELIVERY_SECONDS = Histogram(
    "ferry_webhook_delivery_seconds",
    "Time of one delivery try, from claim to the receiver's answer (or the failure).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DELIVERY_LAG_SECONDS = Histogram(
    "ferry_webhook_delivery_lag_seconds",
    "Time from an event's creation to its delivery (retries included).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 14400, 86400),
)
INGESTIONS = Counter(
    "ferry_webhook_ingestions",
    "Webhooks received on /api/v1/webhooks/{source}:ingest, by source and outcome (ErrorInfo reason, or OK).",
    ["source", "outcome"],
)
