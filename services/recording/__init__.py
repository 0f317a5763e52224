"""Loss-free recording: every process spools its transaction records and audit events locally and a
background task delivers them to the Transactions and Audit services, at least once; their writes are
idempotent (request id, event id), so each record takes effect exactly once.

Usage (the Inference service; any process that produces records does the same):

    from services.recording import Recorder

    recorder = Recorder(settings, "inference")        # spool: <home>/spool/inference.db
    await recorder.start(runtime)                     # in the service's setup; `runtime` optional

    # Before generation starts (after validation), for every accepted request:
    recorder.transaction_started(
        request_id, model="gemma-3-270m", principal=call_principal, operation="/ferry.inference.v1.InferenceService/Generate",
        prompt=prompt,                                # or messages=[(role, content), ...] / ChatMessage protos / dicts
        parameters={"temperature": 0.7, "max_tokens": 64}, trace_id=trace_id_hex,
    )
    # When it ends, BEFORE the last response is sent (so an answered request is always recorded):
    recorder.transaction_finished(
        request_id, status="succeeded",               # "succeeded" | "failed" | "cancelled"
        output=text, finish_reason="stop",            # "stop" | "length" | "cancelled" | "error"
        prompt_tokens=12, completion_tokens=40, ttft=0.21, latency=1.3,   # seconds
        error_code="", error_message="",              # canonical code name + message when failed
    )
    recorder.audit(audit_pb2.AuditEvent(...))         # any event; event_id/event_time/source filled in
    recorder.operational("model.load", resource="models/gemma-3-270m", principal=key_id)

    await recorder.stop()                             # done for you at drain when start() got a runtime

Contract:
- The `transaction_*`, `audit` and `operational` calls are synchronous, local and cheap (one SQLite
  insert, tens of microseconds, no network); call them on the event loop thread (other threads work
  too). They never fail because Transactions, Audit or PostgreSQL are down.
- A request started and never finished (the process was killed) becomes a `STATUS_INCOMPLETE`
  record when the process starts again with the same spool (`Recorder(settings, same name)`).
- Delivery saves calls: a start waits up to `recording.merge_window_seconds` (1 s) for its outcome,
  so a request that finishes within it arrives as one complete record; one that runs longer shows
  `STATUS_IN_PROGRESS` from then until it finishes. A delivery loop woken by a new record waits
  `recording.batch_delay_seconds` (0.1 s) to send what arrives meanwhile in the same batch.
  `flush()` sends everything at once.
- The first start and the first finish of a request id win; repeats are ignored (logged).
- Spool durability: `recording.synchronous=NORMAL` (default) survives a killed process;
  `FULL` also a power cut, at the price of an fsync per record.
- Health: with a runtime, the service `ferry.recording` in grpc.health.v1 turns NOT_SERVING while the
  spool backs up (more than `recording.degraded_depth` records or the oldest older than
  `recording.degraded_lag_seconds`); the process's overall health ("") stays SERVING: records are
  safe on disk, only late. Metrics: `ferry_recording_spool_depth`, `ferry_recording_delivery_lag_seconds`,
  `ferry_recording_delivery_failures_total`, `ferry_recording_delivered_total`,
  `ferry_recording_dead_letters_total`, `ferry_recording_spool_write_seconds`, `ferry_recording_degraded`.
- One process per spool: a second Recorder of the same name on the same home raises `SpoolLocked`.
"""

from services.recording.recorder import HEALTH_NAME, Recorder
from services.recording.spool import SpoolLocked

__all__ = ["HEALTH_NAME", "Recorder", "SpoolLocked"]
