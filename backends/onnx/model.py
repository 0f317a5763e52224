"""The `onnx` Triton backend: embedding models in ONNX on ONNX Runtime, as a python-based backend.

Triton loads this file for every model whose config.pbtxt says `backend: "onnx"` (`make setup` lays it
out as build/triton/backends/onnx/model.py). It is the Triton glue only: tensors in, vectors and
EngineFaults out. Triton's dynamic batcher hands `execute` every request that waited while the model
was busy; their inputs are tokenised per request (a refusal fails that request alone) and embedded
together in ONE ONNX Runtime run. See README.md in this directory.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.llamacpp import faults
from backends.llamacpp.config import ConfigError, ferry_home
from backends.llamacpp.contract import EngineErrorCode, EngineFault
from backends.llamacpp.faults import FaultError
from backends.llamacpp.watchdog import start_watchdog
from backends.onnx.config import EmbeddingParameters
from backends.onnx.encoder import Encoder, Tokens


def _error_response(fault: EngineFault) -> Any:
    code = getattr(pb_utils.TritonError, fault.code.triton_code)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(fault.to_message(), code))


def _texts(request: Any) -> list[str]:
    """The request's `text_input` rows, each a non-empty UTF-8 text."""
    tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
    if tensor is None:
        raise FaultError(faults.invalid_parameter("text_input", "text_input is required"))
    texts = []
    for row, value in enumerate(tensor.as_numpy().reshape(-1)):
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise FaultError(faults.invalid_parameter(f"text_input[{row}]", "is not valid UTF-8")) from None
        if not text:
            raise FaultError(faults.invalid_parameter(f"text_input[{row}]", "must not be empty"))
        texts.append(text)
    return texts


def _truncate(request: Any, rows: int) -> list[bool]:
    tensor = pb_utils.get_input_tensor_by_name(request, "truncate")
    flags = [] if tensor is None else [bool(v) for v in tensor.as_numpy().reshape(-1)]
    if len(flags) != rows:
        raise FaultError(
            faults.invalid_parameter("truncate", f"needs one value per text ({rows}), got {len(flags)}")
        )
    return flags


def _too_long(row: int, tokens: int, limit: int) -> EngineFault:
    return EngineFault(
        code=EngineErrorCode.PROMPT_TOO_LONG,
        message=f"text_input[{row}] has {tokens} tokens, more than the model's maximum of {limit}",
        field=f"text_input[{row}]",
        prompt_tokens=tokens,
        context_length=limit,
        limit="model",
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        started = time.monotonic()
        try:
            self.params = EmbeddingParameters.from_triton_config(config)
            home = ferry_home(args.get("model_repository"))
            onnx_path, tokenizer_path = self.params.onnx_path(home), self.params.tokenizer_path(home)
            for path in (onnx_path, tokenizer_path):
                if not path.is_file():
                    raise ConfigError(
                        f"model file {path} is missing: run `python -m launcher.setup` (make setup)"
                    )
            self.encoder = Encoder(self.params, onnx_path, tokenizer_path)
        except ConfigError as exc:
            raise pb_utils.TritonModelException(f"model {self.name}: {exc}") from None
        # The first run sets up ONNX Runtime's kernels; a request should not pay for it.
        self.encoder.encode(["warm up"])
        # If tritonserver dies (SIGKILL, a crash), this stub must not live on as an orphan holding the
        # model's memory and shared-memory regions: the llamacpp backend's watchdog kills it.
        start_watchdog()
        print(
            f"{self.name}: loaded {onnx_path} in {time.monotonic() - started:.2f} s (dimension="
            f"{self.params.dimension}, max_tokens={self.params.max_tokens}, pooling={self.params.pooling}, "
            f"normalize={self.params.normalize}, threads={self.params.intra_op_threads})",
            flush=True,
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        admitted: list[tuple[int, list[Tokens]]] = []
        for index, request in enumerate(requests):
            if request.is_cancelled():
                code = getattr(pb_utils.TritonError, "CANCELLED", pb_utils.TritonError.UNAVAILABLE)
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("the request was cancelled", code)
                )
                continue
            try:
                texts = _texts(request)
                tokens = self.encoder.tokenize(texts, _truncate(request, len(texts)))
                for row, item in enumerate(tokens):
                    if item.too_long:
                        raise FaultError(_too_long(row, item.too_long, self.params.max_tokens))
            except FaultError as exc:
                responses[index] = _error_response(exc.fault)
                continue
            admitted.append((index, tokens))
        if not admitted:
            return responses
        try:
            vectors = self.encoder.embed([item.ids for _, tokens in admitted for item in tokens])
        except Exception as exc:  # every request of the run gets the failure, none is left unanswered
            fault = faults.engine_failed(f"ONNX Runtime failed: {exc}")
            for index, _ in admitted:
                responses[index] = _error_response(fault)
            return responses
        start = 0
        for index, tokens in admitted:
            rows = vectors[start : start + len(tokens)]
            start += len(tokens)
            counts = np.array([[len(item.ids)] for item in tokens], dtype=np.int32)
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("embedding", np.ascontiguousarray(rows, dtype=np.float32)),
                    pb_utils.Tensor("num_input_tokens", counts),
                ]
            )
        return responses

    def finalize(self) -> None:
        # execute() runs on Triton's thread and has returned: nothing is in flight.
        del self.encoder
