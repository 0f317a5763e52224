"""Every engine failure -> the error its caller gets, mapped once, to the error catalogue's reasons.

`FAULT_REASONS` maps each fault of the engine contract, `FAILURES` everything else (Triton's own
refusals, an upstream server's answers, the transport); `docs/errors.md` shows both as a table (`python -m
services.inference.engine_errors` prints it; a test keeps the two equal).

Fields are named as the caller spelled them (`request.spelling`): a prompt too long names `messages`,
`messages.messages` or `prompt`; a refused parameter `top_p`, `sampling.top_p` or
`max_completion_tokens`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

from backends.llamacpp.contract import EngineErrorCode, EngineFault
from services.common.errors import CATALOGUE, Reason, RpcError, http_status, invalid_argument, rpc_error
from services.inference.domain import FieldSpelling
from services.inference.engine_interface import (
    EngineBroken,
    EngineError,
    EngineFaulted,
    EngineRefused,
    EngineTimedOut,
    EngineUnreachable,
    UpstreamAuthFailed,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnreachable,
)

# The backend's faults (a TritonError whose message is the contract's JSON).
FAULT_REASONS: Mapping[EngineErrorCode, Reason] = {
    # BadRequest names the parameter (or the input tensor) as the caller spelled it.
    EngineErrorCode.INVALID_PARAMETER: Reason.INVALID_ARGUMENT,
    EngineErrorCode.PROMPT_TOO_LONG: Reason.PROMPT_TOO_LONG,
    # Retryable; the retry hint is the fault's `retry_after_seconds`.
    EngineErrorCode.MODEL_UNLOADING: Reason.ENGINE_UNAVAILABLE,
    EngineErrorCode.ENGINE_FAILED: Reason.ENGINE_ERROR,
}


@dataclass(frozen=True)
class Failure:
    """A failure that is not one of the backend's faults, and what its caller gets."""

    kind: type[EngineError]
    reason: Reason
    # The caller's message; `{}` is the failure's own text.
    message: str
    # How docs/errors.md describes it.
    described: str
    # For Triton's own refusals: whether the catalog (asked after the failure) says the model is ready.
    model_ready: bool | None = None

    def matches(self, err: EngineError, model_ready: bool) -> bool:
        return isinstance(err, self.kind) and self.model_ready in (None, model_ready)


# The first that matches applies; the last matches every EngineError.
FAILURES: tuple[Failure, ...] = (
    Failure(
        EngineRefused,
        Reason.MODEL_NOT_READY,
        "the model is not ready: {}",
        "Triton refused the request itself and the catalog says the model is not ready (unloading, unloaded)",
        model_ready=False,
    ),
    Failure(
        EngineRefused,
        Reason.ENGINE_ERROR,
        "engine error: {}",
        "Triton refused the request itself with the model ready",
        model_ready=True,
    ),
    Failure(
        UpstreamUnreachable,
        Reason.UPSTREAM_UNAVAILABLE,
        "the model's upstream server is unavailable: {}",
        "an upstream server unreachable, answering 5xx (after retries), or dropping the connection",
    ),
    Failure(
        UpstreamRateLimited,
        Reason.UPSTREAM_RATE_LIMITED,
        "the model's upstream server is busy: {}",
        "an upstream server answering 429 after ferry's retries (the hint is its Retry-After)",
    ),
    Failure(
        UpstreamAuthFailed,
        Reason.UPSTREAM_AUTH_FAILED,
        "the model's upstream server is misconfigured: {}",
        "an upstream server refusing ferry's API key (401/403), or the key not set",
    ),
    Failure(
        UpstreamRefused,
        Reason.ENGINE_ERROR,
        "the model's upstream server refused the request: {}",
        "an upstream server refusing with another 4xx (e.g. 404: it does not know the model name)",
    ),
    Failure(
        EngineUnreachable,
        Reason.ENGINE_UNAVAILABLE,
        "the engine stopped answering: {}",
        "Triton unreachable, or it ended the stream (gRPC UNAVAILABLE or CANCELLED: stopping, restarting)",
    ),
    Failure(
        EngineTimedOut,
        Reason.DEADLINE_EXCEEDED,
        "generation did not finish before the request deadline",
        "the request's deadline passed while generating (gRPC DEADLINE_EXCEEDED), or an upstream server"
        " sent nothing for longer than its read timeout",
    ),
    Failure(
        EngineBroken,
        Reason.ENGINE_ERROR,
        "engine error: {}",
        "Triton ended the stream without a final response",
    ),
    Failure(EngineError, Reason.ENGINE_ERROR, "engine error: {}", "any other engine failure"),
)


def caller_error(err: EngineError, spelling: FieldSpelling, *, model_ready: bool = True) -> RpcError:
    """The caller's error for an engine failure. `model_ready` (asked of the catalog after the failure)
    decides whether a refusal by Triton itself is worth retrying."""
    if isinstance(err, EngineFaulted):
        return _fault_error(err.fault, spelling)
    failure = next(f for f in FAILURES if f.matches(err, model_ready))
    retry_after = err.retry_after_seconds if CATALOGUE[failure.reason].retryable else None
    return rpc_error(failure.reason, failure.message.format(err.message), retry_after_seconds=retry_after)


def _fault_error(fault: EngineFault, spelling: FieldSpelling) -> RpcError:
    reason = FAULT_REASONS[fault.code]
    if reason is Reason.PROMPT_TOO_LONG:
        return _prompt_too_long(fault, spelling)
    if reason is Reason.INVALID_ARGUMENT:
        return invalid_argument(spelling.field(fault.field or "sampling_parameters"), fault.message)
    if CATALOGUE[reason].retryable:
        # The backend's message already says what happened and that a retry will do.
        return rpc_error(reason, fault.message, retry_after_seconds=fault.retry_after_seconds)
    return rpc_error(reason, f"engine error: {fault.message}")


def _prompt_too_long(fault: EngineFault, spelling: FieldSpelling) -> RpcError:
    tokens, limit = fault.prompt_tokens, fault.context_length
    if fault.limit == "caller":
        description = f"the prompt is {tokens} tokens, more than the {limit} allowed for this API key (max_prompt_tokens)"
    else:
        description = f"the prompt is {tokens} tokens, more than the model's context length of {limit} tokens"
    rpc = invalid_argument(spelling.input, description, Reason.PROMPT_TOO_LONG)
    rpc.metadata.update(prompt_tokens=str(tokens), context_length=str(limit))
    return rpc


def markdown_table() -> str:
    """The mapping as docs/errors.md shows it."""
    rows = [
        "| engine failure | in the service | reason | gRPC code | HTTP status | OpenAI type |",
        "|---|---|---|---|---|---|",
    ]

    def row(failure: str, kind: type[EngineError], reason: Reason) -> str:
        entry = CATALOGUE[reason]
        return (
            f"| {failure} | `{kind.__name__}` | `{reason}` | {entry.code.name} | {http_status(entry.code)}"
            f" | {entry.openai_type} |"
        )

    for code, reason in FAULT_REASONS.items():
        described = f"the backend's fault `{code}` (a Triton {code.triton_code} error, the fault as JSON)"
        rows.append(row(described, EngineFaulted, reason))
    for failure in FAILURES:
        rows.append(row(failure.described, failure.kind, failure.reason))
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
