"""Benchmark-only decoupled model: answers every request with `max_tokens` fixed one-token pieces.

No engine and no sleeping: what a caller measures through it is the serving path alone (Triton's
Python backend, then Envoy and the Inference service when called through ferry). Each request runs
on its own thread so concurrent requests overlap, as they do with the real model.

The config parameter `token_delay_seconds` (default 0, as here) paces the pieces instead: the
resilience tests (tests/resilience/models) use this file with 50 ms, so generations are still
streaming when a test kills Triton under them.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.llamacpp.watchdog import start_watchdog

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TOKEN = " tok"
DEFAULT_TOKENS = 16


def _string(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=np.object_)


def _int32(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int32)


def _first(request: Any, name: str) -> str:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ""
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _stream(request: Any, delay: float) -> None:
    sender = request.get_response_sender()
    prompt = _first(request, "text_input")
    raw = _first(request, "sampling_parameters")
    params: dict[str, Any] = json.loads(raw) if raw.strip() else {}
    tokens = int(params.get("max_tokens") or DEFAULT_TOKENS)
    prompt_tokens = len(prompt.split())
    for i in range(1, tokens + 1):
        cancelled = i < tokens and sender.is_cancelled()
        last = i == tokens or cancelled
        reason = "cancelled" if cancelled else "length" if last else ""
        response = pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("text_output", _string(TOKEN)),
                pb_utils.Tensor("num_output_tokens", _int32(1)),
                pb_utils.Tensor("num_input_tokens", _int32(prompt_tokens)),
                pb_utils.Tensor("finish_reason", _string(reason)),
                pb_utils.Tensor("logprobs", _string("")),
            ]
        )
        sender.send(response, flags=FINAL if last else 0)
        if last:
            return
        if delay:
            time.sleep(delay)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.delay = float(parameters.get("token_delay_seconds", {}).get("string_value") or 0)
        # No orphan stub when tritonserver dies (backends/llamacpp/watchdog.py).
        start_watchdog()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            threading.Thread(target=_stream, args=(request, self.delay), daemon=True).start()
        return None
