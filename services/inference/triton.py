"""Streaming generation against Triton's decoupled LLM model over gRPC (`ModelStreamInfer`).

One gRPC stream per generation: cancelling it is how Triton learns the caller went away (the model
polls `is_cancelled()` and frees its engine slot), and its deadline is the caller's deadline.
Errors the model reports in a known form become typed exceptions; the caller maps them to API errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import grpc
import numpy as np
from opentelemetry import propagate
from tritonclient.grpc import InferInput, InferResult
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.inference.generation import Piece, TokenLogprob, TopLogprob

log = logging.getLogger(__name__)

_PROMPT_TOO_LONG = re.compile(r"\[PROMPT_TOO_LONG prompt_tokens=(\d+) context_length=(\d+)\]")
_INVALID_ARGUMENT = re.compile(r"\[INVALID_ARGUMENT field=([A-Za-z0-9_.\[\]]+)\]\s*(.*)", re.S)


class EngineError(Exception):
    """Generation failed in Triton or the engine; `code` is the gRPC code to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PromptTooLong(EngineError):
    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the prompt is {prompt_tokens} tokens, more than the model's context length of "
            f"{context_length} tokens",
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class EngineRejected(EngineError):
    """The model refused a sampling parameter; `field` names it as in `sampling_parameters`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.field = field


def classify_model_error(message: str) -> EngineError:
    """An error response of the model -> typed exception (its message format is the model contract)."""
    too_long = _PROMPT_TOO_LONG.search(message)
    if too_long:
        return PromptTooLong(int(too_long.group(1)), int(too_long.group(2)))
    invalid = _INVALID_ARGUMENT.search(message)
    if invalid:
        return EngineRejected(invalid.group(1), invalid.group(2).strip() or "is not valid")
    if "unknown model" in message or "is not ready" in message or "not found" in message:
        return EngineError(grpc.StatusCode.UNAVAILABLE, f"model not available in Triton: {message}")
    return EngineError(grpc.StatusCode.INTERNAL, f"engine error: {message}")


def classify_rpc_error(err: grpc.aio.AioRpcError) -> EngineError:
    code = err.code()
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return EngineError(code, f"generation stopped: {code.name.lower()}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return EngineError(code, f"Triton is not reachable: {err.details()}")
    return classify_model_error(err.details() or code.name)


def _string(result: InferResult, name: str) -> str:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return ""
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _int(result: InferResult, name: str) -> int:
    array = result.as_numpy(name)
    return int(array.reshape(-1)[0]) if array is not None and array.size else 0


def _logprobs(raw: str) -> tuple[TokenLogprob, ...]:
    if not raw:
        return ()
    items: list[dict[str, Any]] = json.loads(raw)
    return tuple(
        TokenLogprob(
            token=str(item.get("token", "")),
            logprob=float(item.get("logprob", 0.0)),
            top_logprobs=tuple(
                TopLogprob(str(top.get("token", "")), float(top.get("logprob", 0.0)))
                for top in item.get("top_logprobs") or ()
            ),
        )
        for item in items
    )


def decode(result: InferResult) -> Piece:
    return Piece(
        text=_string(result, "text_output"),
        tokens=_int(result, "num_output_tokens"),
        prompt_tokens=_int(result, "num_input_tokens"),
        finish_reason=_string(result, "finish_reason"),
        logprobs=_logprobs(_string(result, "logprobs")),
    )


def _string_input(name: str, value: str) -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


class TritonStreamer:
    def __init__(self, client: triton_aio.InferenceServerClient) -> None:
        self.client = client

    async def stream(
        self,
        model: str,
        prompt: str,
        sampling_json: str,
        *,
        request_id: str = "",
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[Piece, None]:
        """Yields the model's pieces until the one carrying a finish reason.

        Closing this generator early (the caller was cancelled or stopped reading) cancels the
        Triton stream, which is what frees the engine slot.
        """
        carrier: dict[str, str] = dict(headers or {})
        propagate.inject(carrier)  # W3C trace context, so Triton's spans join the request's trace
        finished = asyncio.Event()
        request = {
            "model_name": model,
            "inputs": [
                _string_input("text_input", prompt),
                _string_input("sampling_parameters", sampling_json),
            ],
            "request_id": request_id,
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request
            # Keep our side of the stream open until the last response: a half-closed stream is
            # not something every Triton version keeps serving decoupled responses on.
            await finished.wait()

        responses = self.client.stream_infer(requests(), stream_timeout=timeout, headers=carrier)
        try:
            async for result, error in responses:
                if error is not None:
                    raise classify_model_error(
                        error.message() if isinstance(error, InferenceServerException) else str(error)
                    )
                piece = decode(result)
                yield piece
                if piece.finish_reason:
                    return
            raise EngineError(grpc.StatusCode.INTERNAL, "Triton ended the stream without a final response")
        except grpc.aio.AioRpcError as err:
            raise classify_rpc_error(err) from err
        finally:
            finished.set()
            responses.cancel()
