"""Typed exceptions built from ferry's rich errors (google.rpc.Status with ErrorInfo, BadRequest and
RetryInfo details; the catalogue is docs/errors.md).

Every failed call made through `ferry_client.Client` / `AsyncClient` raises a `FerryError` subclass
chosen by the gRPC status code. `FerryError` is a `grpc.RpcError` and answers the `grpc.Call`
methods (`code()`, `details()`, `trailing_metadata()`...), so code written for plain gRPC errors keeps
working; the decoded details are attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

REQUEST_ID_HEADER = "x-request-id"
RETRY_AFTER_HEADER = "retry-after"
STATUS_DETAILS_HEADER = "grpc-status-details-bin"
DOMAIN = "ferry.dev"

Metadata = tuple[tuple[str, str | bytes], ...]


class FieldViolation(tuple[str, str]):
    """One `BadRequest.FieldViolation`: (field, description); also `.field`, `.description`."""

    __slots__ = ()

    def __new__(cls, field: str, description: str) -> FieldViolation:
        return super().__new__(cls, (field, description))

    @property
    def field(self) -> str:
        return self[0]

    @property
    def description(self) -> str:
        return self[1]


class FerryError(grpc.RpcError):
    """A failed ferry call.

    - `code()` / `status_code`: the grpc.StatusCode; `details()` / `message`: the message for people;
    - `reason`: the ErrorInfo reason for programs (`"RATE_LIMITED"`, `"MODEL_NOT_FOUND"`...), else the
      code's name; `domain`: ErrorInfo's domain (`ferry.dev` for ferry's own errors);
    - `metadata`: ErrorInfo's metadata; `field_violations`: BadRequest's (field, description) pairs;
    - `retry_delay`: seconds to wait before trying again (RetryInfo, else the `retry-after`
      trailer), None when the error is not worth retrying as it is;
    - `request_id`: the request id the server answered under (`x-request-id`), when it sent one.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_delay: float | None = None,
        request_id: str = "",
        trailing_metadata: Metadata = (),
        initial_metadata: Metadata = (),
        debug_error_string: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.status_code = code
        self.message = message
        self.reason = reason or code.name
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[FieldViolation] = [FieldViolation(f, d) for f, d in field_violations]
        self.retry_delay = retry_delay
        self.request_id = request_id
        self._trailing_metadata = trailing_metadata
        self._initial_metadata = initial_metadata
        self._debug_error_string = debug_error_string

    # grpc.Call's accessors, as every grpc.RpcError raised by a call has them.
    def code(self) -> grpc.StatusCode:
        return self.status_code

    def details(self) -> str:
        return self.message

    def trailing_metadata(self) -> Metadata:
        return self._trailing_metadata

    def initial_metadata(self) -> Metadata:
        return self._initial_metadata

    def debug_error_string(self) -> str:
        return self._debug_error_string

    @property
    def retryable(self) -> bool:
        """True when ferry said when to try again (its catalogue's retryable reasons)."""
        return self.retry_delay is not None

    @property
    def field(self) -> str | None:
        """The first violated request field, if any (`"sampling.temperature"`)."""
        return self.field_violations[0].field if self.field_violations else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.status_code.name}, reason={self.reason!r}, message={self.message!r})"


class Cancelled(FerryError): ...


class Unknown(FerryError): ...


class InvalidArgument(FerryError): ...


class DeadlineExceeded(FerryError): ...


class NotFound(FerryError): ...


class AlreadyExists(FerryError): ...


class PermissionDenied(FerryError): ...


class ResourceExhausted(FerryError): ...


class FailedPrecondition(FerryError): ...


class Aborted(FerryError): ...


class OutOfRange(FerryError): ...


class Unimplemented(FerryError): ...


class Internal(FerryError): ...


class Unavailable(FerryError): ...


class DataLoss(FerryError): ...


class Unauthenticated(FerryError): ...


ERROR_CLASSES: Mapping[grpc.StatusCode, type[FerryError]] = {
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: Unknown,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _retry_after(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def from_status(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Metadata = (),
    *,
    initial_metadata: Metadata = (),
    debug_error_string: str = "",
) -> FerryError:
    """The FerryError for a status and its trailers (where the rich details travel)."""
    reason = domain = request_id = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_delay: float | None = None
    retry_after: float | None = None
    for key, value in trailing_metadata:
        if key == STATUS_DETAILS_HEADER and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations.extend((v.field, v.description) for v in bad.field_violations)
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
        elif key == RETRY_AFTER_HEADER:
            retry_after = _retry_after(_text(value))
        elif key == REQUEST_ID_HEADER and not request_id:
            request_id = _text(value)
    if retry_delay is None:
        retry_delay = retry_after
    cls = ERROR_CLASSES.get(code, FerryError)
    return cls(
        code,
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        retry_delay=retry_delay,
        request_id=request_id,
        trailing_metadata=trailing_metadata,
        initial_metadata=initial_metadata,
        debug_error_string=debug_error_string,
    )


def _call_metadata(getter: object) -> Metadata:
    try:
        value = getter() if callable(getter) else None
    except Exception:
        return ()
    return tuple((str(k), v) for k, v in (value or ()))


def from_rpc_error(err: grpc.RpcError) -> FerryError:
    """The FerryError for a raised grpc.RpcError (sync or asyncio); a FerryError is returned as is."""
    if isinstance(err, FerryError):
        return err
    code_of = getattr(err, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(err, "details", None)
    message = (details_of() if callable(details_of) else None) or ""
    debug_of = getattr(err, "debug_error_string", None)
    debug = (debug_of() if callable(debug_of) else None) or ""
    return from_status(
        code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        str(message),
        _call_metadata(getattr(err, "trailing_metadata", None)),
        initial_metadata=_call_metadata(getattr(err, "initial_metadata", None)),
        debug_error_string=str(debug),
    )


__all__ = [
    "ERROR_CLASSES",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FerryError",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_rpc_error",
    "from_status",
]
