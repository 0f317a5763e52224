"""The error catalogue: one entry per reason, documented, and the constructors that read it."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from services.common.errors import (
    CATALOGUE,
    Reason,
    RpcError,
    invalid_argument,
    not_found,
    openai_error_type,
    rpc_error,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def test_every_reason_is_upper_snake_and_catalogued() -> None:
    for reason in Reason:
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", reason), reason
        assert reason.value == reason.name
        assert reason in CATALOGUE


def test_docs_list_every_reason_and_no_other() -> None:
    text = DOCS.read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", text, re.MULTILINE))
    assert documented == {r.value for r in Reason}


def test_docs_table_is_the_catalogue() -> None:
    from services.common.errors import markdown_table

    assert markdown_table() in DOCS.read_text(), "regenerate: python -m services.common.errors"


def test_rpc_error_takes_the_code_and_retry_hint_from_the_catalogue() -> None:
    err = rpc_error(Reason.ENGINE_UNAVAILABLE, "the model is being unloaded")
    assert (err.code, err.reason, err.retry_after_seconds) == (
        grpc.StatusCode.UNAVAILABLE,
        "ENGINE_UNAVAILABLE",
        1.0,
    )
    assert err.http_status == 503
    assert rpc_error(Reason.RATE_LIMITED, "slow down", retry_after_seconds=7).retry_after_seconds == 7
    assert rpc_error(Reason.ENGINE_ERROR, "boom").retry_after_seconds is None
    with pytest.raises(ValueError, match="not retryable"):
        rpc_error(Reason.ENGINE_ERROR, "boom", retry_after_seconds=1)


def test_a_retryable_error_carries_retry_info_and_retry_after() -> None:
    status = rpc_error(Reason.DRAINING, "server is shutting down").to_status()
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert ("retry-after", "1") in status.trailing_metadata  # type: ignore[attr-defined]


def test_shortcuts_use_catalogued_reasons() -> None:
    assert invalid_argument("page_token", "bad", Reason.INVALID_PAGE_TOKEN).reason == "INVALID_PAGE_TOKEN"
    missing = not_found("model", "models/x")
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    with pytest.raises(ValueError):
        not_found("spaceship", "spaceships/x")


def test_openai_type_by_reason_or_by_code() -> None:
    assert openai_error_type(Reason.PROMPT_TOO_LONG) == "invalid_request_error"
    assert openai_error_type(Reason.OVERLOADED) == "rate_limit_error"
    assert openai_error_type(Reason.QUEUE_TIMEOUT) == "timeout"
    assert openai_error_type(Reason.ENGINE_ERROR) == "server_error"
    assert openai_error_type(grpc.StatusCode.PERMISSION_DENIED) == "permission_error"
    relayed = RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "elsewhere", "SOMEONE_ELSES")
    assert relayed.openai_type == "rate_limit_error"
