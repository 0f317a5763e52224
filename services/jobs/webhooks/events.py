"""The job-end event a webhook receives: Standard Webhooks' payload shape, `{"type", "timestamp", "data"}`,
with the job (as GetJob shows it, without its delivery tries) as `data`."""

from __future__ import annotations

import json
from datetime import datetime

from ferry.jobs.v1 import jobs_pb2
from google.protobuf import json_format

from services.common.timestamps import iso

State = jobs_pb2.Job.State
EVENT_TYPES: dict[int, str] = {
    State.STATE_SUCCEEDED: "job.succeeded",
    State.STATE_FAILED: "job.failed",
    State.STATE_CANCELLED: "job.cancelled",
}


def event_type(job: jobs_pb2.Job) -> str | None:
    """The event of a job that has ended; None for one that has not."""
    return EVENT_TYPES.get(job.state)


def event_payload(job: jobs_pb2.Job, kind: str, at: datetime) -> str:
    """The exact JSON body (field names as in ferry's REST answers)."""
    data = jobs_pb2.Job()
    data.CopyFrom(job)
    data.ClearField("webhook_attempts")
    body = {
        "type": kind,
        "timestamp": iso(at),
        "data": json_format.MessageToDict(data, preserving_proto_field_name=True),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)
