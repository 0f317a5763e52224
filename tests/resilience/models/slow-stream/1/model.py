"""Test-only decoupled model: the bench-stream wire contract (bench/models/bench-stream), one " tok"
piece every `token_delay_seconds` (a config parameter), so a generation is still streaming when a
test kills Triton under it. No engine: the stack starts in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TOKEN = " tok"
DEFAULT_TOKENS = 16
# backends/llamacpp/watchdog.py's shell loop (this default-python-backend model cannot import ferry's
# packages): kills this stub 3 s after tritonserver is gone, as ferry's own backends do.
_WATCHDOG = r"""
ppid() { set -- $(sed 's/.*) //' /proc/$1/stat 2>/dev/null); echo "$2"; }
while [ "$(ppid $STUB)" = "$PARENT" ]; do sleep 1; done
[ -d /proc/$STUB ] || exit 0
sleep 3
if [ -d /proc/$STUB ] && [ "$(ppid $STUB)" != "$PARENT" ]; then kill -9 $STUB; fi
"""


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


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.delay = float(parameters.get("token_delay_seconds", {}).get("string_value", "0") or 0)
        subprocess.Popen(
            ["/bin/sh", "-c", _WATCHDOG],
            env={"STUB": str(os.getpid()), "PARENT": str(os.getppid()), "PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _stream(self, request: Any) -> None:
        sender = request.get_response_sender()
        prompt = _first(request, "text_input")
        raw = _first(request, "sampling_parameters")
        params: dict[str, Any] = json.loads(raw) if raw.strip() else {}
        tokens = int(params.get("max_tokens") or DEFAULT_TOKENS)
        for i in range(1, tokens + 1):
            cancelled = i < tokens and sender.is_cancelled()
            last = i == tokens or cancelled
            reason = "cancelled" if cancelled else "length" if last else ""
            response = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("text_output", _string(TOKEN)),
                    pb_utils.Tensor("num_output_tokens", _int32(1)),
                    pb_utils.Tensor("num_input_tokens", _int32(len(prompt.split()))),
                    pb_utils.Tensor("finish_reason", _string(reason)),
                    pb_utils.Tensor("logprobs", _string("")),
                ]
            )
            sender.send(response, flags=FINAL if last else 0)
            if last:
                return
            time.sleep(self.delay)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            threading.Thread(target=self._stream, args=(request,), daemon=True).start()
        return None
