"""The engine on Triton: one decoupled `ModelStreamInfer` gRPC stream per generation.

Cancelling the stream is how Triton learns the caller went away (the backend polls `is_cancelled()` and
frees its engine slot), and its deadline is the caller's. The backend's errors arrive as the engine
contract's `EngineFault` JSON (`EngineFault.from_message`); anything else on the stream is Triton's own.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import grpc
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.grpc import aio as triton_aio

from backends.llamacpp.contract import EngineFault, SamplingParameters
from services.common.telemetry import capture_content, trace_headers
from services.common.triton_client import ModelInfo, call_metadata, infer_request
from services.inference.domain import Message, Piece, TokenLogprob
from services.inference.engine_interface import (
    EngineBroken,
    EngineError,
    EngineFaulted,
    EngineRefused,
    EngineTimedOut,
    EngineUnreachable,
)
from services.inference.tracing import end_engine_span, first_token, start_engine_span

log = logging.getLogger(__name__)

# How long Triton gets to close its stream after the final response before we cancel it.
END_OF_STREAM_SECONDS = 5.0
TRITON_SERVICE = "inference.GRPCInferenceService"
TRITON_METHOD = "ModelStreamInfer"


def engine_error_from_stream(message: str) -> EngineError:
    """An error response on the stream: the backend's fault, or Triton's own refusal."""
    fault = EngineFault.from_message(message)
    return EngineFaulted(fault) if fault is not None else EngineRefused(message)


def engine_error_from_rpc(err: grpc.aio.AioRpcError) -> EngineError:
    """The stream itself failed, with a gRPC code."""
    code = err.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return EngineTimedOut("deadline exceeded")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        # We never see our own cancellations here (we stop reading first): Triton went away or stopped us.
        return EngineUnreachable(f"Triton {code.name.lower()}: {err.details()}")
    return engine_error_from_stream(err.details() or code.name)


# Fixed-size integer tensors as Triton puts them in `raw_output_contents` (little-endian).
_INTEGERS = {
    name: struct.Struct(fmt)
    for name, fmt in (
        ("INT8", "<b"),
        ("INT16", "<h"),
        ("INT32", "<i"),
        ("INT64", "<q"),
        ("UINT8", "<B"),
        ("UINT16", "<H"),
        ("UINT32", "<I"),
        ("UINT64", "<Q"),
    )
}


def _first_values(response: service_pb2.ModelInferResponse) -> dict[str, str | int]:
    """The first element of every output, read straight from the response's raw contents.

    One pass over the outputs of the response message itself: tritonclient's `InferResult` (and its
    `as_numpy`, which builds a numpy array on every call) cost ~10 % of the service's CPU on the token
    path (five outputs per streamed piece).
    """
    raw = response.raw_output_contents
    values: dict[str, str | int] = {}
    for index, output in enumerate(response.outputs):
        datatype = output.datatype
        if index >= len(raw):
            values[output.name] = _first_from_numpy(response, output.name, datatype)
            continue
        data = raw[index]
        if datatype == "BYTES":
            # Each element: a 4-byte little-endian length, then that many bytes.
            if len(data) < 4:
                values[output.name] = ""
                continue
            size = int.from_bytes(data[:4], "little")
            values[output.name] = data[4 : 4 + size].decode("utf-8", errors="replace")
        elif (integer := _INTEGERS.get(datatype)) is not None:
            values[output.name] = integer.unpack_from(data)[0] if len(data) >= integer.size else 0
        else:
            values[output.name] = _first_from_numpy(response, output.name, datatype)
    return values


def _first_from_numpy(response: service_pb2.ModelInferResponse, name: str, datatype: str) -> str | int:
    """The general (slow) path, for outputs not sent as raw contents or of unexpected types."""
    array = InferResult(response).as_numpy(name)
    if array is None or array.size == 0:
        return "" if datatype == "BYTES" else 0
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value) if datatype == "BYTES" else int(value)


def decode(response: service_pb2.ModelInferResponse) -> Piece:
    """One streamed response of the model as a piece."""
    values = _first_values(response)
    logprobs = values.get("logprobs", "")
    return Piece(
        text=str(values.get("text_output", "")),
        tokens=int(values.get("num_output_tokens", 0)),
        prompt_tokens=int(values.get("num_input_tokens", 0)),
        finish_reason=str(values.get("finish_reason", "")),
        logprobs=TokenLogprob.list_from_json(str(logprobs)) if logprobs else (),
    )


class TritonEngine:
    def __init__(self, client: triton_aio.InferenceServerClient) -> None:
        self.client = client

    async def generate(
        self,
        model: ModelInfo,
        prompt: str,
        sampling: SamplingParameters,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[Piece, None]:
        """Yields the model's pieces until the one carrying a finish reason. The prompt is already
        rendered through the model's chat template (`messages` is not needed).

        Closing this generator early (the caller was cancelled or stopped reading) cancels the
        Triton stream, which is what frees the engine slot; after the final piece the stream ends
        normally instead (nothing left to free).
        """
        # A CLIENT span for the call when tracing is on; its W3C context (or, tracing off, the
        # request's) goes to Triton, whose own spans then join the request's trace.
        span = start_engine_span(
            "triton",
            model.name,
            sampling,
            chat=messages is not None,
            rpc_service=TRITON_SERVICE,
            rpc_method=TRITON_METHOD,
            messages=messages,
            prompt=prompt,
        )
        carrier: dict[str, str] = {**(headers or {}), **trace_headers(span)}
        request = infer_request(
            model.name, request_id, {"text_input": prompt, "sampling_parameters": sampling.to_json()}
        )
        # The stub itself, not tritonclient's `stream_infer`: that wraps every response in an
        # `InferResult` and writes the request from a task of its own (an async generator kept open
        # until the end); here the request is written once and the stream half-closed after the final
        # response, with the same messages on the wire.
        call = self.client._client_stub.ModelStreamInfer(
            metadata=call_metadata(self.client, carrier), timeout=timeout
        )
        completed = False
        usage = [0, 0]  # prompt, completion tokens (for the span)
        finish_reason = ""
        output: list[str] = []
        pieces_seen = 0
        failure: BaseException | None = None
        try:
            await call.write(request)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise EngineBroken("Triton ended the stream without a final response")
                if response.error_message:
                    raise engine_error_from_stream(response.error_message)
                piece = decode(response.infer_response)
                if span is not None:
                    if not pieces_seen:
                        first_token(span)
                    pieces_seen += 1
                    usage[0] = piece.prompt_tokens or usage[0]
                    usage[1] += piece.tokens
                    if capture_content():
                        output.append(piece.text)
                completed = bool(piece.finish_reason)
                finish_reason = piece.finish_reason
                yield piece
                if completed:
                    return
        except grpc.aio.AioRpcError as err:
            failure = engine_error_from_rpc(err)
            raise failure from err
        except BaseException as err:
            failure = err
            raise
        finally:
            if completed:
                await _end_normally(call)
            else:
                call.cancel()
            end_engine_span(
                span,
                prompt_tokens=usage[0],
                completion_tokens=usage[1],
                finish_reason=finish_reason
                or ("cancelled" if isinstance(failure, GeneratorExit | asyncio.CancelledError) else ""),
                output="".join(output),
                error=failure if isinstance(failure, Exception) else None,
            )


async def _end_normally(call: Any) -> None:
    """After the final piece: we half-close our side and Triton closes the stream with OK; reading
    that end finishes the call without cancelling it (a half-closed stream is not something every
    Triton version keeps serving decoupled responses on, so our side stays open until then).

    A cancelled call costs more than it looks: grpc.aio formats a traceback for it (~5 % of the
    service's CPU when every request ended that way).
    """
    try:
        async with asyncio.timeout(END_OF_STREAM_SECONDS):
            await call.done_writing()
            while (response := await call.read()) is not grpc.aio.EOF:
                if response.error_message:
                    log.debug("Triton reported an error after the final response: %s", response.error_message)
    except (TimeoutError, grpc.aio.AioRpcError) as err:
        # Nothing the caller needs: the generation is complete. Make sure the stream is gone.
        log.debug("Triton's stream did not end cleanly after the final response: %r", err)
        call.cancel()
