"""The NATS bridge's message handling (unit tests: formats, errors, request ids)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from ferry.jobs.v1 import jobs_pb2
from google.rpc import status_pb2

from services.common.config import Settings
from services.jobs.bridge import (
    ERROR_HEADER,
    BadMessage,
    Bridge,
    _bad_status,
    _decode,
    _encode,
    _error_body,
    _message_request_id,
    _metadata,
    _reply_headers,
)


@dataclass
class Message:
    """What the bridge reads of a nats-py message."""

    data: bytes = b""
    headers: dict[str, str] | None = None
    metadata: Any = field(
        default_factory=lambda: SimpleNamespace(stream="FERRY_JOBS", sequence=SimpleNamespace(stream=42))
    )


REQUEST = jobs_pb2.CreateJobRequest(request_id="r1")


def test_json_is_the_default_and_protobuf_is_asked_for() -> None:
    as_json = Message(json.dumps({"request_id": "r1"}).encode())
    assert _decode(as_json, jobs_pb2.CreateJobRequest) == REQUEST  # type: ignore[arg-type]
    as_proto = Message(REQUEST.SerializeToString(), {"Content-Type": "application/protobuf"})
    assert _decode(as_proto, jobs_pb2.CreateJobRequest) == REQUEST  # type: ignore[arg-type]
    assert _reply_headers(as_proto, None) == {"Content-Type": "application/protobuf"}  # type: ignore[arg-type]
    assert json.loads(_encode(REQUEST, protobuf=False)) == {"request_id": "r1"}


@pytest.mark.parametrize("body", [b"{not json", b'{"nope": 1}', b"[]"])
def test_a_body_that_is_not_the_request_is_a_bad_message(body: bytes) -> None:
    with pytest.raises(BadMessage, match=r"ferry\.jobs\.v1\.CreateJobRequest"):
        _decode(Message(body), jobs_pb2.CreateJobRequest)  # type: ignore[arg-type]


def test_errors_are_google_rpc_status_with_the_http_code_in_json() -> None:
    status = status_pb2.Status(code=16, message="no key")
    body = json.loads(_error_body(status, protobuf=False))
    assert body == {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "no key"}}
    assert status_pb2.Status.FromString(_error_body(status, protobuf=True)) == status
    assert _reply_headers(Message(), "UNAUTHENTICATED")[ERROR_HEADER] == "UNAUTHENTICATED"  # type: ignore[arg-type]
    assert _bad_status("x").code == 3


def test_the_key_and_request_id_travel_as_grpc_metadata() -> None:
    msg = Message(headers={"Authorization": "Bearer fry_k", "X-Request-Id": "abc"})
    assert _metadata(msg) == [("authorization", "Bearer fry_k"), ("x-request-id", "abc")]  # type: ignore[arg-type]
    assert _metadata(Message()) == []  # type: ignore[arg-type]


def test_a_submit_without_request_id_is_keyed_by_its_message() -> None:
    assert _message_request_id(Message(headers={"Nats-Msg-Id": "batch-7"})) == "nats:batch-7"  # type: ignore[arg-type]
    assert _message_request_id(Message()) == "nats:FERRY_JOBS.42"  # type: ignore[arg-type]
    # An id a request id cannot hold falls back to the stream position.
    assert _message_request_id(Message(headers={"Nats-Msg-Id": "has space"})) == "nats:FERRY_JOBS.42"  # type: ignore[arg-type]


async def test_a_submits_answer_goes_only_to_an_inbox() -> None:
    """Ferry-Reply-To cannot make the bridge (ferry's internal NATS user) publish on ferry's subjects."""
    published: list[str] = []

    class Connection:
        async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
            published.append(subject)

    bridge = Bridge(Settings())
    bridge.nc = Connection()  # type: ignore[assignment]
    for reply_to in ("_INBOX.abc", "ferry.jobs.cancelled.job-1", "ferry.jobs.run", "_INBOX"):
        message = Message(headers={"Ferry-Reply-To": reply_to})
        await bridge._answer_submit(message, b"{}", None)  # type: ignore[arg-type]
    assert published == ["_INBOX.abc"]
