"""Error paths of the `ferry` command that the running stack cannot be made to show on demand: a
broken audit chain (exit 5) and the one-line wording of typed errors (exit codes by status)."""

from __future__ import annotations

import argparse
from typing import Any

import grpc
import pytest
from ferry.audit.v1 import audit_pb2
from ferry_client.cli import records
from ferry_client.cli.base import CliError, Exit, describe_error
from ferry_client.errors import FerryError


class BrokenChain:
    """An AuditService stub whose chain is broken at event 7 (a fake: only the answer matters here)."""

    def ListEvents(self, request: Any, **_: Any) -> audit_pb2.ListEventsResponse:
        return audit_pb2.ListEventsResponse(events=[audit_pb2.AuditEvent(sequence=12)])

    def VerifyChain(self, request: Any, **_: Any) -> audit_pb2.VerifyChainResponse:
        return audit_pb2.VerifyChainResponse(
            valid=False,
            checked_count=7,
            broken_sequence=7,
            broken_event="audit/events/e7",
            problem=audit_pb2.VerifyChainResponse.PROBLEM_CONTENT_MODIFIED,
            description="event 7 was edited",
            head_sequence=12,
            head_hash="ab" * 32,
        )


def test_a_broken_chain_exits_5_naming_the_link(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CliError) as caught:
        records.verify(BrokenChain(), argparse.Namespace(json=False, timeout=30.0))
    assert caught.value.code == Exit.UNHEALTHY and "#7" in str(caught.value)
    out, err = capsys.readouterr()
    assert "content modified" in out and "audit/events/e7" in out and "event 7 was edited" in out
    assert "verifying the audit chain (12 events)" in err

    assert records.verify(BrokenChain(), argparse.Namespace(json=True, timeout=30.0)) == Exit.UNHEALTHY
    out, _ = capsys.readouterr()
    assert '"valid": false' in out and '"problem": "PROBLEM_CONTENT_MODIFIED"' in out


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, Exit.ERROR),
        (grpc.StatusCode.NOT_FOUND, Exit.ERROR),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.ERROR),
        (grpc.StatusCode.UNAVAILABLE, Exit.UNAVAILABLE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, Exit.UNAVAILABLE),
        (grpc.StatusCode.UNAUTHENTICATED, Exit.DENIED),
        (grpc.StatusCode.PERMISSION_DENIED, Exit.DENIED),
    ],
)
def test_exit_code_by_status(code: grpc.StatusCode, exit_code: Exit) -> None:
    assert describe_error(FerryError(code, "no"), "t:1").code == exit_code


def test_one_line_with_reason_fields_and_retry_delay() -> None:
    err = FerryError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate limit reached",
        reason="RATE_LIMITED",
        field_violations=[("model", "is busy")],
        retry_delay=3.0,
    )
    line = str(describe_error(err, "t:1"))
    assert "\n" not in line
    assert line == "RESOURCE_EXHAUSTED: rate limit reached [RATE_LIMITED] (model: is busy) retry in 3 s"
    said = FerryError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_k: must be >= 0",
        field_violations=[("sampling.top_k", "must be >= 0")],
    )
    assert str(describe_error(said, "t:1")) == "INVALID_ARGUMENT: sampling.top_k: must be >= 0"


def test_did_not_answer_is_said_only_when_ferry_did_not() -> None:
    silent = describe_error(FerryError(grpc.StatusCode.UNAVAILABLE, "connection refused"), "t:1")
    assert "did not answer at t:1" in str(silent)
    loading = FerryError(
        grpc.StatusCode.UNAVAILABLE, "the model is loading", reason="MODEL_NOT_READY", domain="ferry.dev"
    )
    said = str(describe_error(loading, "t:1"))
    assert "did not answer" not in said and "MODEL_NOT_READY" in said
