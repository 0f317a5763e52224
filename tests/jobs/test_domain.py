"""A job's checks at create and its proto (unit tests)."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from ferry.auth.v1 import auth_pb2
from ferry.jobs.v1 import jobs_pb2
from google.protobuf import json_format

from services.common.errors import RpcError
from services.jobs.domain import MAX_METADATA_BYTES, JobSpec, JobState, StoredJob


def _job(body: dict[str, object]) -> jobs_pb2.Job:
    return json_format.ParseDict(body, jobs_pb2.Job())


def _refusal(body: dict[str, object]) -> RpcError:
    with pytest.raises(RpcError) as refused:
        JobSpec.from_proto(_job(body))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return refused.value


CHAT = {"chat_completion": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}


def test_a_valid_request_is_kept_as_sent() -> None:
    spec = JobSpec.from_proto(_job({"request": CHAT, "metadata": {"batch": 7}}))
    assert (spec.kind, spec.model, spec.metadata) == ("chat_completion", "m", {"batch": 7})
    native = JobSpec.from_proto(_job({"request": {"generate": {"model": "models/m", "prompt": "x"}}}))
    assert (native.kind, native.model) == ("generate", "m")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "job.request"),
        (
            {"request": {"chat_completion": {"model": "m", "messages": []}}},
            "job.request.chat_completion.messages",
        ),
        (
            {"request": {"completion": {"model": "m", "prompt": "x", "stream": True}}},
            "job.request.completion.stream",
        ),
        (
            {"request": {"completion": {"model": "m", "prompt": "x", "top_p": 7}}},
            "job.request.completion.top_p",
        ),
        ({"request": {"generate": {"model": "m"}}}, "job.request.generate.prompt"),
        ({"request": CHAT, "webhook": {"url": " "}}, "job.webhook.url"),
        ({"request": CHAT, "metadata": {"x": "y" * MAX_METADATA_BYTES}}, "job.metadata"),
    ],
)
def test_refusals_name_the_field_as_the_job_spells_it(body: dict[str, object], field: str) -> None:
    err = _refusal(body)
    assert field in [f for f, _ in err.field_violations], err.field_violations
    assert err.message.startswith(field), err.message


def test_a_stored_job_reads_back_as_its_proto() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    spec = JobSpec.from_proto(
        _job({"request": CHAT, "metadata": {"a": "b"}, "webhook": {"url": "https://x/y"}})
    )
    row = {
        "id": "abc",
        "creator": "keys/k1",
        "principal": auth_pb2.Principal(name="keys/k1", scopes=["inference"]).SerializeToString(),
        "request": spec.request.SerializeToString(),
        "kind": spec.kind,
        "model": spec.model,
        "metadata": spec.metadata,
        "webhook_url": spec.webhook_url,
        "state": "SUCCEEDED",
        "attempts": 2,
        "error_code": "",
        "error_message": "",
        "create_time": now,
        "start_time": now,
        "end_time": now,
        "result": jobs_pb2.JobResult().SerializeToString(),
    }
    job = StoredJob.from_row(row).to_proto()
    assert job.name == "jobs/abc" and job.state == jobs_pb2.Job.STATE_SUCCEEDED
    assert job.transaction == "transactions/abc" and job.attempts == 2
    assert job.webhook.url == "https://x/y" and json_format.MessageToDict(job.metadata) == {"a": "b"}
    assert job.request == spec.request and job.HasField("result")
    assert StoredJob.from_row(row).principal.scopes == ["inference"]


def test_states() -> None:
    assert [s for s in JobState if s.ended] == [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
    assert JobState.from_proto(jobs_pb2.Job.STATE_RUNNING, "state") is JobState.RUNNING
    with pytest.raises(RpcError):
        JobState.from_proto(99, "state")
