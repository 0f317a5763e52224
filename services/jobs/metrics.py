"""The jobs' Prometheus metrics (workers and the bridge)."""

from prometheus_client import Counter, Gauge, Histogram

JOBS_ENDED = Counter(
    "ferry_jobs_ended",
    "Jobs a worker ended, by state (SUCCEEDED, FAILED).",
    ["state"],
)
ATTEMPTS = Counter(
    "ferry_jobs_attempts",
    "Job attempts by outcome: succeeded, retried (failed, another attempt follows), failed, cancelled,"
    " interrupted (the worker stopped).",
    ["outcome"],
)
DEFERRED = Counter(
    "ferry_jobs_deferred",
    "Times a job found no spare engine slot (interactive requests first) and waited.",
)
RUNNING = Gauge("ferry_jobs_running", "Jobs this worker is generating now.")
RUN_SECONDS = Histogram(
    "ferry_jobs_run_seconds",
    "Time of a job's successful attempt, from start to stored result.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
QUEUE_SECONDS = Histogram(
    "ferry_jobs_queue_seconds",
    "Time from a job's create to its end (succeeded or failed).",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
NATS_MESSAGES = Counter(
    "ferry_nats_bridge_messages",
    "Messages the NATS bridge answered, by subject kind (submit, create, generate) and outcome.",
    ["kind", "outcome"],
)
