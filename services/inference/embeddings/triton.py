"""The Triton call of an embeddings request: its inputs in pieces of at most the model's max_batch_size,
sent at once as unary ModelInfer requests; Triton's dynamic batcher runs whatever waits together
(these pieces and other callers' requests) in one ONNX Runtime run.

A piece the backend refuses comes back as the engine contract's `EngineFault` naming the row
(`text_input[2]`), which becomes the caller's field (`input[66]`: the piece's offset + the row).
Cancelling the caller cancels every piece still in flight (gRPC cancels the Triton requests; the
backend drops a cancelled request it has not run yet).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence

import numpy as np
from opentelemetry import propagate
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from backends.llamacpp.contract import EngineErrorCode, EngineFault
from services.common.errors import Reason, RpcError, invalid_argument
from services.common.triton_client import ModelInfo
from services.inference.domain import FieldSpelling
from services.inference.embeddings.request import EmbeddingRequest
from services.inference.engine_errors import caller_error
from services.inference.engine_interface import EngineError, EngineFaulted, EngineRefused, EngineTimedOut

# Inputs per Triton request when the model's config says no max_batch_size.
DEFAULT_PIECE = 32
_ROW = re.compile(r"^text_input\[(\d+)\]$")


def _inputs(texts: Sequence[str], truncate: bool) -> list[InferInput]:
    text = InferInput("text_input", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_))
    flags = InferInput("truncate", [len(texts), 1], "BOOL")
    flags.set_data_from_numpy(np.full((len(texts), 1), truncate, dtype=np.bool_))
    return [text, flags]


_OUTPUTS = [InferRequestedOutput("embedding"), InferRequestedOutput("num_input_tokens")]


class TritonEmbedder:
    def __init__(self, client: triton_aio.InferenceServerClient) -> None:
        self.client = client

    async def embed(
        self,
        model: ModelInfo,
        request: EmbeddingRequest,
        *,
        request_id: str = "",
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        """([inputs, dimension] float32 vectors, tokens per input); EngineError when Triton fails,
        RpcError (naming the input) when the backend refuses one."""
        carrier: dict[str, str] = dict(headers or {})
        propagate.inject(carrier)
        size = model.max_batch_size or DEFAULT_PIECE
        texts = request.inputs
        offsets = range(0, len(texts), size)

        async def piece(offset: int) -> tuple[np.ndarray, np.ndarray]:
            try:
                result = await self.client.infer(
                    model.name,
                    _inputs(texts[offset : offset + size], request.truncate),
                    outputs=_OUTPUTS,
                    request_id=request_id,
                    client_timeout=timeout,
                    headers=carrier,
                )
            except InferenceServerException as err:
                raise _engine_error(err, request, offset) from err
            vectors, counts = result.as_numpy("embedding"), result.as_numpy("num_input_tokens")
            if vectors is None or counts is None:
                raise EngineRefused("Triton's response lacks the embedding outputs")
            return vectors, counts

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(piece(offset)) for offset in offsets]
        except* Exception as failures:
            # The first piece to fail cancelled the others; its failure is the caller's answer.
            raise failures.exceptions[0] from None
        pieces = [task.result() for task in tasks]
        vectors = np.concatenate([v for v, _ in pieces]).astype(np.float32, copy=False)
        counts = tuple(int(c) for _, cs in pieces for c in cs.reshape(-1))
        return vectors, counts


def _engine_error(err: InferenceServerException, request: EmbeddingRequest, offset: int) -> Exception:
    message = err.message() or str(err)
    fault = EngineFault.from_message(message)
    if fault is not None:
        row = _ROW.match(fault.field or "")
        if row is not None:
            return _input_refused(fault, request, offset + int(row.group(1)))
        return EngineFaulted(fault)
    if "DEADLINE_EXCEEDED" in (err.status() or ""):
        return EngineTimedOut("deadline exceeded")
    return EngineRefused(message)


def _input_refused(fault: EngineFault, request: EmbeddingRequest, index: int) -> RpcError:
    """The backend refused one input: the caller's error names it as the caller spelled it."""
    field = request.field(index)
    if fault.code is EngineErrorCode.PROMPT_TOO_LONG:
        hint = "; set truncate to cut it" if request.input_field == "inputs" else ""
        err = invalid_argument(
            field,
            f"has {fault.prompt_tokens} tokens, more than model '{request.model}' accepts per input"
            f" ({fault.context_length}){hint}",
            Reason.PROMPT_TOO_LONG,
        )
        err.metadata.update(prompt_tokens=str(fault.prompt_tokens), context_length=str(fault.context_length))
        return err
    # The backend's message names its own tensor row; the caller's field replaces it.
    description = fault.message.removeprefix(f"{fault.field} ").removeprefix(f"{fault.field}: ")
    return invalid_argument(field, description)


def caller_failure(err: EngineError, request: EmbeddingRequest, model_ready: bool) -> RpcError:
    """An engine failure (not a refused input) as the caller's error, mapped like a generation's."""
    return caller_error(err, FieldSpelling(input=request.input_field), model_ready=model_ready)
