"""Prometheus metrics of the recording spool (label `kind`: `transaction` or `audit`)."""

from prometheus_client import Counter, Gauge, Histogram

SPOOL_DEPTH = Gauge(
    "ferry_recording_spool_depth",
    "Records written to the local spool and not yet delivered.",
    ["kind"],
)
DELIVERY_LAG = Gauge(
    "ferry_recording_delivery_lag_seconds",
    "Age of the oldest record still waiting in the spool (0 when it is empty).",
    ["kind"],
)
DELIVERED = Counter(
    "ferry_recording_delivered",
    "Records delivered to their service.",
    ["kind"],
)
DELIVERY_FAILURES = Counter(
    "ferry_recording_delivery_failures",
    "Delivery attempts that failed and will be retried.",
    ["kind"],
)
DEAD_LETTERS = Counter(
    "ferry_recording_dead_letters",
    "Records the service refused as invalid; kept in the spool's `dead` table, not retried.",
    ["kind"],
)
SPOOL_WRITE = Histogram(
    "ferry_recording_spool_write_seconds",
    "Time to write one record to the spool (on the request path).",
    buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)
DEGRADED = Gauge(
    "ferry_recording_degraded",
    "1 while the spool is backing up beyond its thresholds (health `ferry.recording` NOT_SERVING).",
)
