"""What every answer to hostile input must look like, REST and gRPC."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2

# Never an answer to bad input: they say ferry broke (or lost data), not that the request was wrong.
BROKEN_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS})
OPENAI_PREFIX = "/v1/"
API_PREFIX = "/api/v1/"


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def is_openai_error(body: Any) -> bool:
    """OpenAI's error object: `{"error": {"message": str, "type": str, "param": str|null, "code": ...}}`."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    error = body["error"]
    return (
        isinstance(error.get("message"), str)
        and bool(error["message"])
        and isinstance(error.get("type"), str)
        and "param" in error
        and (error["param"] is None or isinstance(error["param"], str))
        and "code" in error
        and (error["code"] is None or isinstance(error["code"], str | int))
    )


def is_status_json(body: Any) -> bool:
    """google.rpc.Status as JSON: `{"code": int, "message": str, "details": [...]}`."""
    return (
        isinstance(body, dict)
        and isinstance(body.get("code"), int)
        and isinstance(body.get("message"), str)
        and isinstance(body.get("details", []), list)
    )


def rest_problems(path: str, status: int, headers: Any, content: bytes) -> list[str]:
    """What is wrong with a REST answer to a hostile request (empty: nothing)."""
    problems = []
    if status >= 500 and status != 503:
        problems.append(f"HTTP {status}")
    if status < 400:
        return problems
    body = _json(content)
    if path.startswith(OPENAI_PREFIX):
        if not is_openai_error(body):
            problems.append(f"HTTP {status} without OpenAI's error object: {content[:300]!r}")
    elif path.startswith(API_PREFIX):
        # ferry's API: google.rpc.Status JSON; the edge's own refusals (key, size, rate) are
        # OpenAI's error object on every path (README: the gateway's refusals).
        if not (is_status_json(body) or is_openai_error(body)):
            problems.append(f"HTTP {status} without a google.rpc.Status body: {content[:300]!r}")
    if status in (429, 503) and body is not None and "retry-after" not in headers and status == 429:
        problems.append("429 without Retry-After")
    return problems


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in `grpc-status-details-bin`, None when there is none; raises when the
    trailer is there but is not a Status."""
    for name, value in error.trailing_metadata() or ():
        if name == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


def grpc_problems(error: grpc.RpcError) -> list[str]:
    """What is wrong with a gRPC error answer to a hostile request (empty: nothing)."""
    code = error.code()
    problems = []
    if code in BROKEN_CODES:
        problems.append(f"{code.name}: {error.details()}")
    try:
        status = rich_status(error)
    except message.DecodeError:
        return [*problems, "grpc-status-details-bin is not a google.rpc.Status"]
    if status is not None:
        if status.code != code.value[0]:
            problems.append(f"status details say code {status.code}, the call {code.name}")
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if not info.reason or not info.domain:
                    problems.append(f"ErrorInfo without reason or domain: {info}")
    if code == grpc.StatusCode.UNAVAILABLE and (status is None or not status.details):
        # Honest: ferry says what is unavailable (ErrorInfo) and when to come back (RetryInfo).
        problems.append(f"UNAVAILABLE without details (the stack is up): {error.details()}")
    return problems


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rich_status(error)
    except message.DecodeError:
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
