"""Every EngineFault the backend produces is built here, from what went wrong."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from backends.llamacpp.contract import EngineErrorCode, EngineFault

# How long a client should wait before retrying a request refused because the model is stopping.
RETRY_AFTER_SECONDS = 1.0


class FaultError(Exception):
    """Raised where a request cannot go on; carries the fault the client receives."""

    def __init__(self, fault: EngineFault) -> None:
        super().__init__(fault.message)
        self.fault = fault


def invalid_parameter(field: str, message: str) -> EngineFault:
    return EngineFault(code=EngineErrorCode.INVALID_PARAMETER, message=message, field=field)


def from_validation_error(exc: ValidationError, tensor: str) -> EngineFault:
    """The first problem of a refused `sampling_parameters` tensor, naming the contract field."""
    error = exc.errors()[0]
    loc = error["loc"]
    field = str(loc[0]) if loc else tensor
    where = ".".join(str(part) for part in loc) or tensor
    return invalid_parameter(field, f"{where}: {error['msg']}")


def prompt_too_long(prompt_tokens: int, context_length: int, limit: str) -> EngineFault:
    whose = "the model's context window" if limit == "model" else "the caller's prompt-token limit"
    return EngineFault(
        code=EngineErrorCode.PROMPT_TOO_LONG,
        message=f"the prompt has {prompt_tokens} tokens and does not fit in {whose} of {context_length}",
        prompt_tokens=prompt_tokens,
        context_length=context_length,
        limit="model" if limit == "model" else "caller",
    )


def model_unloading() -> EngineFault:
    return EngineFault(
        code=EngineErrorCode.MODEL_UNLOADING,
        message="the model is being unloaded; retry shortly",
        retry_after_seconds=RETRY_AFTER_SECONDS,
    )


def engine_failed(message: str) -> EngineFault:
    return EngineFault(code=EngineErrorCode.ENGINE_FAILED, message=message)


def from_engine_error(error: dict[str, Any], context_length: int) -> EngineFault:
    """A fault from the error object llama.cpp streams instead of a chunk."""
    if error.get("type") == "exceed_context_size_error":
        return prompt_too_long(
            int(error.get("n_prompt_tokens", 0)), int(error.get("n_ctx", context_length)), "model"
        )
    message = str(error.get("message", error))
    if error.get("code") == 400:
        # llama.cpp refused the request itself (a parameter it cannot honour). Its one 400 about the
        # grammar is a GBNF constraint that does not parse ("failed to parse grammar"); its details go
        # only to the engine's log.
        field = "constraint" if "grammar" in message else "sampling_parameters"
        return invalid_parameter(field, message)
    return engine_failed(message)
