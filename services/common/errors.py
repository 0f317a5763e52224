"""Every error ferry answers, catalogued once, and rich gRPC errors (AIP-193) built from the catalogue.

Each `Reason` (the ErrorInfo reason, UPPER_SNAKE) has one entry: its gRPC code, whether it carries a
retry hint (RetryInfo and `retry-after`), the OpenAI error `type` and `code` its /v1/* callers see, and
when it happens. HTTP statuses follow from the gRPC code, the way Envoy's transcoder
(`convert_grpc_status`) maps them. A few reasons are the edge's own (Envoy refuses the request before
any service sees it; envoy/ferry.lua words them): they are listed so that every `code` a caller can get
is here. `docs/errors.md` is this catalogue as a table (`python -m services.common.errors`).

OpenAI callers get `openai_error(err)`: `{"error": {"message", "type", "param", "code"}}`. For /v1/*
the service sends it ready-made as trailing metadata (`OPENAI_ERROR_METADATA`, see
services/common/interceptor.py), which Envoy turns into a response header and ferry.lua into the body.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "ferry.dev"
# The retry hint of a retryable error whose constructor knows no better delay.
DEFAULT_RETRY_AFTER_SECONDS = 1.0

_Code = grpc.StatusCode

# Trailing metadata holding the OpenAI error JSON of a failed OpenAI-API call: Envoy passes it on as a
# response header; ferry.lua makes it the REST body and removes the header.
OPENAI_ERROR_METADATA = "x-ferry-openai-error"
# gRPC sends an error's message and details as trailers (headers through Envoy, which resets a stream
# whose headers pass ~60 KiB; gRPC clients refuse received metadata past 8 KiB at random, and always
# past 16 KiB): a message, field or metadata value that quotes the caller's input (a 100 KB role) is
# cut to this many bytes of UTF-8, so that an error's trailers stay under 8 KiB even when every text
# is cut and escaped (tests/hostile/test_error_size.py).
TEXT_LIMIT = 512


class Reason(StrEnum):
    """ErrorInfo reasons: what went wrong, for programs (the message is for people)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    FILTER_TOO_LONG = "FILTER_TOO_LONG"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    MODEL_CAPABILITY_MISSING = "MODEL_CAPABILITY_MISSING"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    SCOPE_MISSING = "SCOPE_MISSING"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    TRANSACTION_NOT_FOUND = "TRANSACTION_NOT_FOUND"
    GRAMMAR_NOT_FOUND = "GRAMMAR_NOT_FOUND"
    GRAMMAR_INVALID = "GRAMMAR_INVALID"
    GRAMMAR_ALREADY_EXISTS = "GRAMMAR_ALREADY_EXISTS"
    CONVERSATION_NOT_FOUND = "CONVERSATION_NOT_FOUND"
    CONVERSATION_MESSAGE_NOT_FOUND = "CONVERSATION_MESSAGE_NOT_FOUND"
    WEBHOOK_SOURCE_NOT_FOUND = "WEBHOOK_SOURCE_NOT_FOUND"
    WEBHOOK_SIGNATURE_INVALID = "WEBHOOK_SIGNATURE_INVALID"
    WEBHOOK_TIMESTAMP_STALE = "WEBHOOK_TIMESTAMP_STALE"
    WEBHOOK_REPLAYED = "WEBHOOK_REPLAYED"
    WEBHOOK_URL_REFUSED = "WEBHOOK_URL_REFUSED"
    WEBHOOK_SECRET_MISSING = "WEBHOOK_SECRET_MISSING"
    ETAG_MISMATCH = "ETAG_MISMATCH"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    BACKGROUND_DEFERRED = "BACKGROUND_DEFERRED"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    MODEL_NOT_MANAGED = "MODEL_NOT_MANAGED"
    KEY_COLLISION = "KEY_COLLISION"
    GENERATION_ABORTED = "GENERATION_ABORTED"
    RATE_LIMITED = "RATE_LIMITED"
    OVERLOADED = "OVERLOADED"
    UPSTREAM_RATE_LIMITED = "UPSTREAM_RATE_LIMITED"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"
    TRITON_UNAVAILABLE = "TRITON_UNAVAILABLE"
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    GRAMMARS_UNAVAILABLE = "GRAMMARS_UNAVAILABLE"
    AUTH_UNAVAILABLE = "AUTH_UNAVAILABLE"
    DRAINING = "DRAINING"
    ENGINE_ERROR = "ENGINE_ERROR"
    UPSTREAM_AUTH_FAILED = "UPSTREAM_AUTH_FAILED"
    CHAT_TEMPLATE_INVALID = "CHAT_TEMPLATE_INVALID"
    CHAT_TEMPLATE_FAILED = "CHAT_TEMPLATE_FAILED"
    INTERNAL = "INTERNAL"
    # The edge's own (Envoy, worded by envoy/ferry.lua for /v1/*): no service sees these requests.
    INVALID_JSON = "INVALID_JSON"
    INVALID_TYPE = "INVALID_TYPE"
    UNKNOWN_PARAMETER = "UNKNOWN_PARAMETER"
    UNKNOWN_URL = "UNKNOWN_URL"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    SERVICE_UNREACHABLE = "SERVICE_UNREACHABLE"


@dataclass(frozen=True)
class Entry:
    code: grpc.StatusCode
    retryable: bool
    openai_type: str
    # OpenAI's own `error.code` where it has one for this (context_length_exceeded), else the reason
    # in lower case.
    openai_code: str
    when: str
    # Only where the edge answers REST with another status than the code's (413).
    http_status: int | None = None

    @property
    def http(self) -> int:
        return self.http_status or http_status(self.code)


# gRPC code -> HTTP status, as Envoy's gRPC-JSON transcoder answers REST callers
# (Envoy's Grpc::Utility::grpcToHttpStatus; CANCELLED is nginx's 499 "client closed request").
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    _Code.OK: 200,
    _Code.CANCELLED: 499,
    _Code.UNKNOWN: 500,
    _Code.INVALID_ARGUMENT: 400,
    _Code.DEADLINE_EXCEEDED: 504,
    _Code.NOT_FOUND: 404,
    _Code.ALREADY_EXISTS: 409,
    _Code.PERMISSION_DENIED: 403,
    _Code.RESOURCE_EXHAUSTED: 429,
    _Code.FAILED_PRECONDITION: 400,
    _Code.ABORTED: 409,
    _Code.OUT_OF_RANGE: 400,
    _Code.UNIMPLEMENTED: 501,
    _Code.INTERNAL: 500,
    _Code.UNAVAILABLE: 503,
    _Code.DATA_LOSS: 500,
    _Code.UNAUTHENTICATED: 401,
}

# OpenAI error `type` by gRPC code, for errors whose reason is not ferry's (relayed, or none).
# OpenAI itself answers an unknown key (401) and an unknown model (404) as invalid_request_error.
OPENAI_TYPE: Mapping[grpc.StatusCode, str] = {
    _Code.INVALID_ARGUMENT: "invalid_request_error",
    _Code.FAILED_PRECONDITION: "invalid_request_error",
    _Code.OUT_OF_RANGE: "invalid_request_error",
    _Code.NOT_FOUND: "invalid_request_error",
    _Code.UNAUTHENTICATED: "invalid_request_error",
    _Code.PERMISSION_DENIED: "permission_error",
    _Code.RESOURCE_EXHAUSTED: "rate_limit_error",
    _Code.DEADLINE_EXCEEDED: "timeout",
}
SERVER_ERROR = "server_error"


# OpenAI's own `error.code` values, where one says what a ferry reason says.
OPENAI_CODE: Mapping[str, str] = {
    "INVALID_ARGUMENT": "invalid_value",
    "PROMPT_TOO_LONG": "context_length_exceeded",
    "UNAUTHENTICATED": "invalid_api_key",
    "RATE_LIMITED": "rate_limit_exceeded",
}


def _entry(
    code: grpc.StatusCode,
    when: str,
    *,
    retryable: bool = False,
    openai_type: str = "",
    http_status: int | None = None,
) -> Entry:
    # The OpenAI code is filled in by reason below (an entry does not know its own reason).
    return Entry(code, retryable, openai_type or OPENAI_TYPE.get(code, SERVER_ERROR), "", when, http_status)


_ENTRIES: Mapping[Reason, Entry] = {
    Reason.INVALID_ARGUMENT: _entry(
        _Code.INVALID_ARGUMENT, "a request field is missing or out of range (BadRequest names it)"
    ),
    Reason.INVALID_PAGE_TOKEN: _entry(
        _Code.INVALID_ARGUMENT, "`page_token` was not issued by this List RPC, or for another query"
    ),
    Reason.FILTER_TOO_LONG: _entry(
        _Code.INVALID_ARGUMENT, "`filter` is over 1024 characters or 16 comparisons"
    ),
    Reason.PROMPT_TOO_LONG: _entry(
        _Code.INVALID_ARGUMENT,
        "the prompt alone is longer than the model's context per slot, or than the key's `max_prompt_tokens`"
        "; an embeddings input longer than the model's maximum tokens (BadRequest names it: `input[3]`)",
    ),
    Reason.MODEL_CAPABILITY_MISSING: _entry(
        _Code.INVALID_ARGUMENT,
        "the model's `capabilities` lack what the request asks for: `chat` (messages), `completion`"
        " (a prompt), `logprobs` or `embedding` (embeddings); BadRequest names the field",
    ),
    Reason.UNAUTHENTICATED: _entry(
        _Code.UNAUTHENTICATED, "no API key, or one that is unknown, revoked or expired"
    ),
    Reason.SCOPE_MISSING: _entry(_Code.PERMISSION_DENIED, "the key lacks every scope the method accepts"),
    Reason.MODEL_NOT_FOUND: _entry(_Code.NOT_FOUND, "no model of that name in the repository"),
    Reason.KEY_NOT_FOUND: _entry(_Code.NOT_FOUND, "no API key of that name"),
    Reason.TRANSACTION_NOT_FOUND: _entry(_Code.NOT_FOUND, "no transaction with that request id"),
    Reason.GRAMMAR_NOT_FOUND: _entry(
        _Code.NOT_FOUND, "no grammar of that name (never created, or deleted); a request naming one too"
    ),
    Reason.GRAMMAR_INVALID: _entry(
        _Code.INVALID_ARGUMENT,
        "the engine cannot compile the grammar's definition (its message says why); nothing was stored",
    ),
    Reason.GRAMMAR_ALREADY_EXISTS: _entry(_Code.ALREADY_EXISTS, "a grammar with that `grammar_id` exists"),
    Reason.CONVERSATION_NOT_FOUND: _entry(
        _Code.NOT_FOUND,
        "no conversation of that name visible to the caller (never created, deleted, or another key's)",
    ),
    Reason.CONVERSATION_MESSAGE_NOT_FOUND: _entry(
        _Code.NOT_FOUND, "no message of that name in the conversation (the field named says which)"
    ),
    Reason.JOB_NOT_FOUND: _entry(
        _Code.NOT_FOUND, "no job of that name, or one another key created (only admin keys see every job)"
    ),
    Reason.BACKGROUND_DEFERRED: _entry(
        _Code.RESOURCE_EXHAUSTED,
        "a job's generation (`x-ferry-priority: background`) found no spare engine slot: interactive"
        " requests come first; the job's worker tries again later (callers never see it)",
        retryable=True,
    ),
    Reason.WEBHOOK_SOURCE_NOT_FOUND: _entry(
        _Code.NOT_FOUND, "`POST /api/v1/webhooks/{source}:ingest` names no source of `webhooks.sources`"
    ),
    Reason.WEBHOOK_SIGNATURE_INVALID: _entry(
        _Code.UNAUTHENTICATED,
        "an ingested webhook lacks the webhook-id/-timestamp/-signature headers, or no signature matches"
        " the source's secret",
    ),
    Reason.WEBHOOK_TIMESTAMP_STALE: _entry(
        _Code.UNAUTHENTICATED, "an ingested webhook's timestamp is outside the source's tolerance"
    ),
    Reason.WEBHOOK_REPLAYED: _entry(
        _Code.ALREADY_EXISTS,
        "an ingested webhook's id was ingested already (a replay); nothing was created",
        openai_type="invalid_request_error",
    ),
    Reason.WEBHOOK_URL_REFUSED: _entry(
        _Code.INVALID_ARGUMENT,
        "a job's `webhook.url` is not http(s), or resolves to a private, loopback, link-local, multicast"
        " or unspecified address that `webhooks.allowed_networks` does not allow",
    ),
    Reason.WEBHOOK_SECRET_MISSING: _entry(
        _Code.FAILED_PRECONDITION,
        "a job with a webhook was created with a key that has no webhook signing secret"
        " (an admin issues one: `POST /api/v1/keys/{id}:rotateWebhookSecret`)",
    ),
    Reason.ETAG_MISMATCH: _entry(
        _Code.ABORTED, "the `etag` sent is not the resource's current one: it changed since it was read"
    ),
    Reason.MODEL_LOAD_FAILED: _entry(_Code.FAILED_PRECONDITION, "Triton could not load the model"),
    Reason.MODEL_NOT_MANAGED: _entry(
        _Code.FAILED_PRECONDITION, "load or unload of a model an upstream server serves (not Triton)"
    ),
    Reason.KEY_COLLISION: _entry(
        _Code.ABORTED, "a new key's hash matched an existing one (never in practice)", retryable=True
    ),
    Reason.GENERATION_ABORTED: _entry(
        _Code.ABORTED, "the engine ended a generation early with the caller still there"
    ),
    Reason.RATE_LIMITED: _entry(
        _Code.RESOURCE_EXHAUSTED, "a key's or an address's request or token window is full", retryable=True
    ),
    Reason.OVERLOADED: _entry(
        _Code.RESOURCE_EXHAUSTED,
        "the model's slots and its wait queue are all taken; or, at the edge, those of every model on "
        "every replica (Envoy's generation limit, envoy.generation_max_requests; ErrorInfo metadata "
        "decided_by: edge)",
        retryable=True,
    ),
    Reason.UPSTREAM_RATE_LIMITED: _entry(
        _Code.RESOURCE_EXHAUSTED,
        "a model's upstream server kept answering 429 (too many requests) after ferry's retries",
        retryable=True,
    ),
    Reason.QUEUE_TIMEOUT: _entry(
        _Code.DEADLINE_EXCEEDED, "the deadline passed while waiting for a free slot of the model"
    ),
    Reason.DEADLINE_EXCEEDED: _entry(
        _Code.DEADLINE_EXCEEDED, "the deadline left no time to generate, or passed while generating"
    ),
    Reason.CANCELLED: _entry(
        _Code.CANCELLED, "the caller went away (recorded on its transaction; nobody receives it)"
    ),
    Reason.MODEL_NOT_READY: _entry(
        _Code.UNAVAILABLE, "the model is known but not loaded (loading, unloading, failed)", retryable=True
    ),
    Reason.ENGINE_UNAVAILABLE: _entry(
        _Code.UNAVAILABLE, "Triton or the model stopped answering (e.g. unloaded mid-stream)", retryable=True
    ),
    Reason.TRITON_UNAVAILABLE: _entry(
        _Code.UNAVAILABLE, "a service (Models, Inference, Grammars) cannot reach Triton", retryable=True
    ),
    Reason.UPSTREAM_UNAVAILABLE: _entry(
        _Code.UNAVAILABLE,
        "a model's upstream server is unreachable, answered 5xx, or dropped the connection mid-answer",
        retryable=True,
    ),
    Reason.DATABASE_UNAVAILABLE: _entry(
        _Code.UNAVAILABLE, "PostgreSQL is not reachable, or not migrated yet", retryable=True
    ),
    Reason.GRAMMARS_UNAVAILABLE: _entry(
        _Code.UNAVAILABLE,
        "a request names a stored grammar and the grammar registry did not answer",
        retryable=True,
    ),
    Reason.AUTH_UNAVAILABLE: _entry(
        _Code.UNAVAILABLE,
        "the gateway did not answer, or its key store (PostgreSQL) is not ready or unreachable and the "
        "key was not seen before the outage",
        retryable=True,
    ),
    Reason.DRAINING: _entry(_Code.UNAVAILABLE, "the service is shutting down", retryable=True),
    Reason.ENGINE_ERROR: _entry(_Code.INTERNAL, "the engine failed a generation"),
    Reason.UPSTREAM_AUTH_FAILED: _entry(
        _Code.INTERNAL,
        "a model's upstream server refused ferry's API key (401/403), or the key is not set: a config error",
    ),
    Reason.CHAT_TEMPLATE_INVALID: _entry(_Code.INTERNAL, "the model's chat template does not compile"),
    Reason.CHAT_TEMPLATE_FAILED: _entry(_Code.INTERNAL, "the model's chat template raised on these messages"),
    Reason.INTERNAL: _entry(_Code.INTERNAL, "a bug: an unexpected exception in a service"),
    Reason.INVALID_JSON: _entry(
        _Code.INVALID_ARGUMENT, "edge: a REST body is not JSON, or not a JSON object (Envoy's transcoder)"
    ),
    Reason.INVALID_TYPE: _entry(
        _Code.INVALID_ARGUMENT,
        "edge: a REST body field has the wrong JSON type (`param` names it; Envoy's transcoder)",
    ),
    Reason.UNKNOWN_PARAMETER: _entry(
        _Code.INVALID_ARGUMENT, "edge: a REST query parameter the method does not have (`param` names it)"
    ),
    Reason.UNKNOWN_URL: _entry(
        _Code.NOT_FOUND, "edge: no REST method has that path and HTTP method (OpenAI's `Invalid URL`)"
    ),
    Reason.REQUEST_TOO_LARGE: _entry(
        _Code.RESOURCE_EXHAUSTED,
        "edge: a request body beyond `envoy.max_request_bytes` (HTTP 413; gRPC RESOURCE_EXHAUSTED)",
        openai_type="invalid_request_error",
        http_status=413,
    ),
    Reason.SERVICE_UNREACHABLE: _entry(
        _Code.UNAVAILABLE,
        "edge: Envoy could not reach the service (no healthy instance, connection refused or reset)",
        retryable=True,
    ),
}
CATALOGUE: Mapping[Reason, Entry] = {
    reason: replace(entry, openai_code=OPENAI_CODE.get(reason, reason.lower()))
    for reason, entry in _ENTRIES.items()
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def openai_error_type(what: Reason | str | grpc.StatusCode) -> str:
    """OpenAI's error `type` for a reason (ferry's) or a bare gRPC code (anyone's)."""
    if isinstance(what, grpc.StatusCode):
        return OPENAI_TYPE.get(what, SERVER_ERROR)
    entry = catalogued(what)
    return entry.openai_type if entry else SERVER_ERROR


def catalogued(reason: str) -> Entry | None:
    """The catalogue's entry for a reason; None for one that is not ferry's (a relayed error)."""
    try:
        return CATALOGUE[Reason(reason)]
    except ValueError:
        return None


class RpcError(Exception):
    """Raised inside a servicer; the error interceptor turns it into a rich gRPC status.

    New code builds it with `rpc_error(Reason.X, ...)`, which takes the code from the catalogue; the
    explicit form remains for relayed errors (any code, any reason) and code not yet migrated.
    """

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
        message = _cut(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = {k: _cut(v) for k, v in (metadata or {}).items()}
        self.field_violations = [(_cut(f), _cut(d)) for f, d in field_violations]
        self.retry_after_seconds = retry_after_seconds

    @property
    def http_status(self) -> int:
        return http_status(self.code)

    @property
    def openai_type(self) -> str:
        """By the reason when it is ferry's, else by the code (a relayed error from elsewhere)."""
        entry = catalogued(self.reason)
        return entry.openai_type if entry else openai_error_type(self.code)

    @property
    def openai_code(self) -> str:
        """OpenAI's own code for the reason where it has one, else the reason in lower case."""
        entry = catalogued(self.reason)
        return entry.openai_code if entry else self.reason.lower()

    @property
    def param(self) -> str | None:
        """The request field the error is about, as the caller spelled it (the first violation's)."""
        return self.field_violations[0][0] if self.field_violations else None

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


def openai_error(err: RpcError) -> dict[str, dict[str, str | None]]:
    """OpenAI's error object for `err`: `{"error": {"message", "type", "param", "code"}}`."""
    return {
        "error": {
            "message": err.message,
            "type": err.openai_type,
            "param": err.param,
            "code": err.openai_code,
        }
    }


def openai_error_json(err: RpcError) -> str:
    """`openai_error(err)` as ASCII JSON, fit for a metadata value."""
    return json.dumps(openai_error(err), ensure_ascii=True, separators=(",", ":"))


def _cut(text: str) -> str:
    """At most TEXT_LIMIT bytes of UTF-8: a character takes up to 4, and the trailers carry a text
    several times, percent- or \\u-escaped (2000 emoji in a model name reset the stream at Envoy)."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= TEXT_LIMIT:
        return text
    return encoded[: TEXT_LIMIT - 3].decode("utf-8", "ignore") + "..."


def rpc_error(
    reason: Reason,
    message: str,
    *,
    metadata: Mapping[str, str] | None = None,
    field_violations: Sequence[tuple[str, str]] = (),
    retry_after_seconds: float | None = None,
) -> RpcError:
    """An error with the catalogue's code for `reason`. A retryable reason always carries a retry
    hint (one second unless told); any other never does."""
    entry = CATALOGUE[Reason(reason)]
    if not entry.retryable and retry_after_seconds is not None:
        raise ValueError(f"{reason} is not retryable: it carries no retry hint")
    if entry.retryable and retry_after_seconds is None:
        retry_after_seconds = DEFAULT_RETRY_AFTER_SECONDS
    return RpcError(
        entry.code,
        message,
        Reason(reason).value,
        metadata=metadata,
        field_violations=field_violations,
        retry_after_seconds=retry_after_seconds,
    )


def invalid_argument(
    field: str, description: str, reason: Reason | str = Reason.INVALID_ARGUMENT
) -> RpcError:
    """A validation failure naming the offending field (`BadRequest.FieldViolation`)."""
    return rpc_error(
        Reason(reason),
        f"{field}: {description}",
        metadata={"field": field},
        field_violations=[(field, description)],
    )


def not_found(resource: str, name: str) -> RpcError:
    """`<RESOURCE>_NOT_FOUND` for a resource kind the catalogue lists (`model`, `key`, `transaction`)."""
    return rpc_error(
        Reason(f"{resource.upper()}_NOT_FOUND"), f"{resource} '{name}' not found", metadata={"name": name}
    )


def unauthenticated(message: str = "a valid API key is required (Authorization: Bearer <key>)") -> RpcError:
    return rpc_error(Reason.UNAUTHENTICATED, message)


def permission_denied(method: str, scopes: frozenset[str]) -> RpcError:
    wanted = " or ".join(sorted(scopes))
    return rpc_error(
        Reason.SCOPE_MISSING,
        f"this key lacks the scope for {method}: needs {wanted}",
        metadata={"method": method, "required_scopes": ",".join(sorted(scopes))},
    )


def rate_limited(what: str, retry_after_seconds: float) -> RpcError:
    return rpc_error(
        Reason.RATE_LIMITED,
        f"rate limit reached: {what}; retry after {retry_after_seconds:.0f} s",
        metadata={"limit": what},
        retry_after_seconds=retry_after_seconds,
    )


def internal_error(exc: BaseException) -> RpcError:
    """An unexpected exception, named by its type only (its text may hold anything)."""
    return rpc_error(Reason.INTERNAL, f"internal error: {type(exc).__name__}")


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


def markdown_table() -> str:
    """The catalogue as docs/errors.md shows it."""
    rows = [
        "| reason | gRPC code | HTTP status | OpenAI type | OpenAI code | retryable | when |",
        "|---|---|---|---|---|---|---|",
    ]
    for reason, e in CATALOGUE.items():
        retry = "yes" if e.retryable else "no"
        rows.append(
            f"| `{reason}` | {e.code.name} | {e.http} | {e.openai_type} | `{e.openai_code}` | {retry}"
            f" | {e.when} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
