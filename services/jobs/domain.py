"""A job as the jobs service sees it: what a create asks (checked like the interactive request it
carries), the row it is kept as, and its proto."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from ferry.auth.v1 import auth_pb2
from ferry.jobs.v1 import jobs_pb2
from google.protobuf import json_format, struct_pb2

from services.common.database import nul_free
from services.common.errors import RpcError, invalid_argument
from services.common.names import JOBS, TRANSACTIONS
from services.common.timestamps import to_timestamp
from services.inference.native.generate import GenerateWire
from services.inference.openai_api.chat import ChatWire
from services.inference.openai_api.completions import CompletionWire
from services.inference.wire import WireRequest

JobProto = jobs_pb2.Job
# The caller's own labels: small, as labels are (the request itself is bounded by the API's limits).
MAX_METADATA_BYTES = 16 * 1024
MAX_WEBHOOK_URL = 2048
WIRES: dict[str, type[WireRequest[Any]]] = {
    "chat_completion": ChatWire,
    "completion": CompletionWire,
    "generate": GenerateWire,
}


class JobState(StrEnum):
    """A job's state, as the `jobs.state` column holds it."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def ended(self) -> bool:
        return self in ENDED

    def to_proto(self) -> jobs_pb2.Job.State.ValueType:
        return JobProto.State.Value(f"STATE_{self.value}")

    @classmethod
    def from_proto(cls, value: int, field: str) -> JobState:
        try:
            return cls(JobProto.State.Name(value).removeprefix("STATE_"))  # type: ignore[arg-type]
        except ValueError:
            raise invalid_argument(field, f"{value} is not a job state") from None


ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class JobSpec:
    """What a create asks for, checked: the request (parsed as the Inference service would parse it, so
    a request it would refuse is refused now, not after the queue), labels and webhook."""

    kind: str
    model: str
    request: jobs_pb2.JobRequest
    metadata: dict[str, Any]
    webhook_url: str

    @classmethod
    def from_proto(cls, job: JobProto, prefix: str = "job") -> JobSpec:
        kind = job.request.WhichOneof("request")
        if kind is None:
            raise invalid_argument(
                f"{prefix}.request", "is required: one of chat_completion, completion or generate"
            )
        message = getattr(job.request, kind)
        if kind != "generate" and message.HasField("stream") and message.stream:
            raise invalid_argument(
                f"{prefix}.request.{kind}.stream", "a job is not streamed: read its result when it ends"
            )
        wire = WIRES[kind](message, stream=False)
        try:
            parsed = wire.parse()
        except RpcError as err:
            raise _renamed(err, f"{prefix}.request.{kind}.") from None
        metadata = json_format.MessageToDict(job.metadata) if job.HasField("metadata") else {}
        if len(json.dumps(metadata).encode()) > MAX_METADATA_BYTES:
            raise invalid_argument(f"{prefix}.metadata", f"is larger than {MAX_METADATA_BYTES} bytes of JSON")
        url = job.webhook.url.strip() if job.HasField("webhook") else ""
        if job.HasField("webhook") and not url:
            raise invalid_argument(f"{prefix}.webhook.url", "is required when webhook is set")
        if len(url) > MAX_WEBHOOK_URL:
            raise invalid_argument(f"{prefix}.webhook.url", f"is longer than {MAX_WEBHOOK_URL} characters")
        return cls(kind=kind, model=parsed.model, request=job.request, metadata=metadata, webhook_url=url)


def _renamed(err: RpcError, prefix: str) -> RpcError:
    """The Inference parser's refusal, its fields named as the job's caller spells them."""
    violations = [(prefix + field, description) for field, description in err.field_violations]
    metadata = dict(err.metadata)
    if "field" in metadata:
        metadata["field"] = prefix + metadata["field"]
    message = err.message
    for field, _ in err.field_violations:
        if message.startswith(f"{field}:"):
            message = prefix + message
            break
    return RpcError(
        err.code,
        message,
        err.reason,
        metadata=metadata,
        field_violations=violations,
        retry_after_seconds=err.retry_after_seconds,
    )


@dataclass(frozen=True)
class StoredJob:
    """One row of `jobs` (with its result, when it has one)."""

    id: str
    creator: str
    principal: auth_pb2.Principal
    kind: str
    model: str
    request: jobs_pb2.JobRequest
    metadata: dict[str, Any]
    webhook_url: str
    state: JobState
    attempts: int
    error_code: str
    error_message: str
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    result: jobs_pb2.JobResult | None = None

    @property
    def name(self) -> str:
        return f"{JOBS}/{self.id}"

    def to_proto(self) -> JobProto:
        job = JobProto(
            name=self.name,
            request=self.request,
            state=self.state.to_proto(),
            error_code=self.error_code,
            error_message=self.error_message,
            attempts=self.attempts,
            creator=self.creator,
            create_time=to_timestamp(self.create_time),
        )
        if self.metadata:
            job.metadata.CopyFrom(json_format.ParseDict(self.metadata, struct_pb2.Struct()))
        if self.webhook_url:
            job.webhook.url = self.webhook_url
        if self.start_time is not None:
            job.start_time.CopyFrom(to_timestamp(self.start_time))
        if self.end_time is not None:
            job.end_time.CopyFrom(to_timestamp(self.end_time))
        if self.result is not None:
            job.result.CopyFrom(self.result)
        if self.attempts > 0:
            # The job's id is its generation's request id: one transaction record across attempts.
            job.transaction = f"{TRANSACTIONS}/{self.id}"
        return job

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StoredJob:
        result = row.get("result")
        return cls(
            id=row["id"],
            creator=row["creator"],
            principal=auth_pb2.Principal.FromString(bytes(row["principal"])),
            kind=row["kind"],
            model=row["model"],
            request=jobs_pb2.JobRequest.FromString(bytes(row["request"])),
            metadata=row["metadata"] or {},
            webhook_url=row["webhook_url"],
            state=JobState(row["state"]),
            attempts=row["attempts"],
            error_code=row["error_code"],
            error_message=row["error_message"],
            create_time=row["create_time"],
            start_time=row["start_time"],
            end_time=row["end_time"],
            result=jobs_pb2.JobResult.FromString(bytes(result)) if result is not None else None,
        )


def metadata_json(metadata: dict[str, Any]) -> str:
    return json.dumps(nul_free(metadata))
