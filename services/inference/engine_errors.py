"""Every engine failure -> the error its caller gets, mapped once, to the error catalogue's reasons.

Fields are named as the caller spelled them (`request.spelling`): a prompt too long names `messages`,
`messages.messages` or `prompt`; a refused parameter `top_p`, `sampling.top_p` or
`max_completion_tokens`.
"""

from __future__ import annotations

from backends.llamacpp.contract import EngineErrorCode, EngineFault
from services.common.errors import Reason, RpcError, invalid_argument, rpc_error
from services.inference.domain import FieldSpelling
from services.inference.engine_interface import (
    EngineError,
    EngineFaulted,
    EngineRefused,
    EngineTimedOut,
    EngineUnreachable,
)


def caller_error(err: EngineError, spelling: FieldSpelling, *, model_ready: bool = True) -> RpcError:
    """The caller's error for an engine failure. `model_ready` (asked of the catalog after the failure)
    decides whether a refusal by Triton itself is worth retrying."""
    if isinstance(err, EngineFaulted):
        return _fault_error(err.fault, spelling)
    if isinstance(err, EngineUnreachable):
        return rpc_error(Reason.ENGINE_UNAVAILABLE, f"the engine stopped answering: {err.message}")
    if isinstance(err, EngineTimedOut):
        return rpc_error(Reason.DEADLINE_EXCEEDED, "generation did not finish before the request deadline")
    if isinstance(err, EngineRefused) and not model_ready:
        return rpc_error(Reason.MODEL_NOT_READY, f"the model is not ready: {err.message}")
    return rpc_error(Reason.ENGINE_ERROR, f"engine error: {err.message}")


def _fault_error(fault: EngineFault, spelling: FieldSpelling) -> RpcError:
    if fault.code is EngineErrorCode.PROMPT_TOO_LONG:
        return _prompt_too_long(fault, spelling)
    if fault.code is EngineErrorCode.INVALID_PARAMETER:
        return invalid_argument(spelling.field(fault.field or "sampling_parameters"), fault.message)
    if fault.code is EngineErrorCode.MODEL_UNLOADING:
        # The backend's message already says what happened and that a retry will do.
        return rpc_error(
            Reason.ENGINE_UNAVAILABLE, fault.message, retry_after_seconds=fault.retry_after_seconds
        )
    return rpc_error(Reason.ENGINE_ERROR, f"engine error: {fault.message}")


def _prompt_too_long(fault: EngineFault, spelling: FieldSpelling) -> RpcError:
    tokens, limit = fault.prompt_tokens, fault.context_length
    if fault.limit == "caller":
        description = f"the prompt is {tokens} tokens, more than the {limit} allowed for this API key (max_prompt_tokens)"
    else:
        description = f"the prompt is {tokens} tokens, more than the model's context length of {limit} tokens"
    rpc = invalid_argument(spelling.input, description, Reason.PROMPT_TOO_LONG)
    rpc.metadata.update(prompt_tokens=str(tokens), context_length=str(limit))
    return rpc
