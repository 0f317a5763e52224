"""Rich gRPC errors (AIP-193): a canonical code, one ErrorInfo, and BadRequest / RetryInfo details."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "ferry.dev"


class RpcError(Exception):
    """Raised inside a servicer; the error interceptor turns it into a rich gRPC status."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.retry_after_seconds = retry_after_seconds

    def to_status(self) -> grpc.Status:
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        details.append(_pack(info))
        if self.field_violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.field_violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_after_seconds is not None:
            seconds = max(0.0, self.retry_after_seconds)
            delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        status = status_pb2.Status(code=_CODE_VALUE[self.code], message=self.message, details=details)
        converted = rpc_status.to_status(status)
        if self.retry_after_seconds is None:
            return converted
        # Also as plain `retry-after` metadata (whole seconds, like HTTP's header), for gRPC clients
        # that do not decode RetryInfo; Envoy passes it on as the REST answer's Retry-After header.
        retry_after = ("retry-after", str(max(1, math.ceil(self.retry_after_seconds))))
        return converted._replace(trailing_metadata=(*converted.trailing_metadata, retry_after))  # type: ignore[attr-defined, no-any-return]


def invalid_argument(field: str, description: str, reason: str = "INVALID_ARGUMENT") -> RpcError:
    """A validation failure naming the offending field (`BadRequest.FieldViolation`)."""
    return RpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{field}: {description}",
        reason,
        metadata={"field": field},
        field_violations=[(field, description)],
    )


def not_found(resource: str, name: str) -> RpcError:
    return RpcError(
        grpc.StatusCode.NOT_FOUND,
        f"{resource} '{name}' not found",
        f"{resource.upper()}_NOT_FOUND",
        metadata={"name": name},
    )


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


_CODE_VALUE = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}


def error_details(err: grpc.aio.AioRpcError | grpc.RpcError) -> dict[str, object]:
    """Decode the rich details of a received error (used by clients and tests)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out: dict[str, object] = {}
    if status is None:
        return out
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                msg = kind()
                detail.Unpack(msg)
                out[kind.DESCRIPTOR.name] = msg
    return out


def relay_error(err: grpc.aio.AioRpcError | grpc.RpcError) -> RpcError:
    """A received rich error, re-raised unchanged to this service's own caller (code, message,
    ErrorInfo reason and metadata, field violations, retry delay)."""
    details = error_details(err)
    info = details.get("ErrorInfo")
    bad = details.get("BadRequest")
    retry = details.get("RetryInfo")
    return RpcError(
        err.code(),  # type: ignore[attr-defined]
        err.details() or "",  # type: ignore[attr-defined]
        info.reason if isinstance(info, error_details_pb2.ErrorInfo) else err.code().name,  # type: ignore[attr-defined]
        metadata=dict(info.metadata) if isinstance(info, error_details_pb2.ErrorInfo) else None,
        field_violations=[(v.field, v.description) for v in bad.field_violations]
        if isinstance(bad, error_details_pb2.BadRequest)
        else (),
        retry_after_seconds=retry.retry_delay.ToTimedelta().total_seconds()
        if isinstance(retry, error_details_pb2.RetryInfo)
        else None,
    )
