"""Gemma 3 270M on llama.cpp (through xllamacpp) as a decoupled Triton Python-backend model.

One `xllamacpp.Server` per model instance runs continuous batching over `n_parallel` slots. Each
request runs on its own thread (execute() returns at once) and streams one Triton response per text
piece; the wire contract (inputs, outputs, error prefixes) is described in ../README.md.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
BOS_TEXT = "<bos>"
# llama.cpp treats this seed as "pick a random one".
RANDOM_SEED = 0xFFFFFFFF
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
# Sampling defaults are llama.cpp's own (its server uses them for any field a request leaves out).
SAMPLING_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
    # Not sampling: a caller's prompt-length limit (an API key's), refused like a too-long prompt.
    "max_prompt_tokens",
}


class RequestError(Exception):
    """A request the model refuses; its text is what the client sees."""


def invalid(field: str, message: str) -> RequestError:
    return RequestError(f"[INVALID_ARGUMENT field={field}] {message}")


def _number(params: dict[str, Any], field: str, low: float, high: float) -> float | None:
    value = params.get(field)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number here.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(field, f"must be a number, got {json.dumps(value)}")
    if not low <= value <= high:
        raise invalid(field, f"must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _integer(params: dict[str, Any], field: str, low: int, high: int) -> int | None:
    value = params.get(field)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, f"must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise invalid(field, f"must be between {low} and {high}, got {value}")
    return value


def _boolean(params: dict[str, Any], field: str) -> bool:
    value = params.get(field, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(field, f"must be true or false, got {json.dumps(value)}")
    return value


def engine_request(prompt: str, params: dict[str, Any], max_tokens_limit: int) -> tuple[dict[str, Any], int]:
    """Validate the sampling parameters and translate them into a llama.cpp completion request.

    Returns the request and the number of top logprobs to report per token (-1: no logprobs).
    """
    unknown = sorted(set(params) - SAMPLING_FIELDS)
    if unknown:
        raise invalid(
            unknown[0], f"unknown sampling parameter; allowed: {', '.join(sorted(SAMPLING_FIELDS))}"
        )
    request: dict[str, Any] = {
        "prompt": prompt,
        "stream": True,
        # __verbose carries the per-chunk token counts (tokens_predicted, tokens_evaluated).
        "verbose": True,
        "cache_prompt": True,
        "n_predict": max_tokens_limit,
    }
    if (value := _number(params, "temperature", 0.0, 100.0)) is not None:
        request["temperature"] = value
    if (value := _number(params, "top_p", 0.0, 1.0)) is not None:
        if value == 0.0:
            raise invalid("top_p", "must be greater than 0")
        request["top_p"] = value
    if (top_k := _integer(params, "top_k", -1, 1 << 30)) is not None:
        # vLLM spells "disabled" -1, llama.cpp 0.
        request["top_k"] = max(top_k, 0)
    if (value := _number(params, "min_p", 0.0, 1.0)) is not None:
        request["min_p"] = value
    if (max_tokens := _integer(params, "max_tokens", 1, max_tokens_limit)) is not None:
        request["n_predict"] = max_tokens
    if (value := _number(params, "frequency_penalty", -2.0, 2.0)) is not None:
        request["frequency_penalty"] = value
    if (value := _number(params, "presence_penalty", -2.0, 2.0)) is not None:
        request["presence_penalty"] = value
    if (value := _number(params, "repetition_penalty", 0.0, 100.0)) is not None:
        if value == 0.0:
            raise invalid("repetition_penalty", "must be greater than 0")
        request["repeat_penalty"] = value
    if (seed := _integer(params, "seed", -(1 << 63), (1 << 64) - 1)) is not None:
        # llama.cpp seeds are uint32 with 0xFFFFFFFF meaning random: fold any integer onto the rest.
        request["seed"] = seed % RANDOM_SEED
    stop = params.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid("stop", "must be a list of strings")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise invalid("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stop):
            raise invalid("stop", "stop sequences must not be empty")
        request["stop"] = stop
    if _boolean(params, "ignore_eos"):
        request["ignore_eos"] = True
    logprobs = _boolean(params, "logprobs")
    top_logprobs = _integer(params, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise invalid("top_logprobs", "requires logprobs to be true")
    n_top = -1
    if logprobs:
        n_top = top_logprobs or 0
        # llama.cpp reports the chosen token's logprob only when n_probs > 0; extra entries are trimmed.
        request["n_probs"] = max(n_top, 1)
    return request, n_top


def _logprob_entries(content: list[dict[str, Any]], n_top: int) -> list[dict[str, Any]]:
    return [
        {
            "token": item["token"],
            "logprob": item["logprob"],
            "top_logprobs": [
                {"token": top["token"], "logprob": top["logprob"]}
                for top in item.get("top_logprobs", [])[:n_top]
            ],
        }
        for item in content
    ]


def _string(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=np.object_)


def _int32(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int32)


class Generation:
    """State of one streaming request: turns llama.cpp chunks into Triton responses."""

    def __init__(self, model: TritonPythonModel, request: Any) -> None:
        self.model = model
        self.sender = request.get_response_sender()
        self.request = request
        self.n_top = -1
        self.prompt_tokens = 0
        self.decoded = 0  # tokens generated so far (llama.cpp's n_decoded)
        # Text and tokens not yet sent: an incomplete UTF-8 sequence or a possible stop-string prefix
        # makes llama.cpp hold text back, and a token without text (EOS) rides with the next piece.
        self.pending_text = ""
        self.pending_tokens = 0
        self.pending_logprobs: list[dict[str, Any]] = []
        self.sent_tokens = 0
        self.finish_reason = ""
        self.usage: dict[str, Any] = {}
        self.error: dict[str, Any] | None = None
        self.cancelled = False
        self.max_prompt_tokens: int | None = None

    def run(self) -> None:
        try:
            request = self._parse()
        except RequestError as exc:
            self._send_error(str(exc), pb_utils.TritonError.INVALID_ARG)
            return
        try:
            self.model.server.handle_completions(request, self._on_chunk)
        except Exception as exc:  # an engine failure must not take the model down
            self._send_error(f"[ENGINE_ERROR] {exc}", pb_utils.TritonError.INTERNAL)
            return
        self._finish()

    def _parse(self) -> dict[str, Any]:
        text = pb_utils.get_input_tensor_by_name(self.request, "text_input")
        if text is None:
            raise invalid("text_input", "is required")
        prompt = _first_string(text.as_numpy(), "text_input")
        # llama.cpp adds the model's BOS itself; a leading literal one would make it appear twice.
        prompt = prompt.removeprefix(BOS_TEXT)
        params: dict[str, Any] = {}
        sampling = pb_utils.get_input_tensor_by_name(self.request, "sampling_parameters")
        if sampling is not None:
            raw = _first_string(sampling.as_numpy(), "sampling_parameters")
            if raw.strip():
                try:
                    params = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise invalid("sampling_parameters", f"is not valid JSON: {exc}") from None
                if not isinstance(params, dict):
                    raise invalid("sampling_parameters", "must be a JSON object")
        self.max_prompt_tokens = _integer(params, "max_prompt_tokens", 1, 1 << 30)
        request, self.n_top = engine_request(prompt, params, self.model.max_tokens)
        return request

    def _on_chunk(self, chunk: dict[str, Any]) -> bool:
        """Called by llama.cpp for every streamed chunk; returning True stops generation."""
        if "error" in chunk or "choices" not in chunk:
            self.error = chunk.get("error", chunk)
            return True
        choice = chunk["choices"][0]
        verbose = chunk.get("__verbose", {})
        self.prompt_tokens = verbose.get("tokens_evaluated", self.prompt_tokens)
        if self.max_prompt_tokens is not None and self.prompt_tokens > self.max_prompt_tokens:
            # llama.cpp has no tokenize call here: the count is known once the prompt is evaluated.
            self.error = {
                "type": "exceed_context_size_error",
                "n_prompt_tokens": self.prompt_tokens,
                "n_ctx": self.max_prompt_tokens,
            }
            return True
        decoded = verbose.get("tokens_predicted", self.decoded)
        self.pending_tokens += max(decoded - self.decoded, 0)
        self.decoded = max(decoded, self.decoded)
        self.pending_text += choice.get("text") or ""
        if self.n_top >= 0 and choice.get("logprobs"):
            self.pending_logprobs += _logprob_entries(choice["logprobs"].get("content", []), self.n_top)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
            self.usage = chunk.get("usage", {})
            return False
        if self.model.stopping:
            self.error = {"message": "the model is being unloaded"}
            return True
        if self.sender.is_cancelled():
            self.cancelled = True
            return True
        if self.pending_text:
            self._send_piece(flags=0)
        return False

    def _send_piece(self, flags: int) -> None:
        logprobs = json.dumps(self.pending_logprobs) if self.n_top >= 0 else ""
        response = pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("text_output", _string(self.pending_text)),
                pb_utils.Tensor("num_output_tokens", _int32(self.pending_tokens)),
                pb_utils.Tensor("num_input_tokens", _int32(self.prompt_tokens)),
                pb_utils.Tensor("finish_reason", _string(self.finish_reason)),
                pb_utils.Tensor("logprobs", _string(logprobs)),
            ]
        )
        self.sent_tokens += self.pending_tokens
        self.pending_text, self.pending_tokens, self.pending_logprobs = "", 0, []
        self.sender.send(response, flags=flags)

    def _finish(self) -> None:
        if self.cancelled:
            # Nobody may be listening any more, but Triton still expects the request to be completed.
            self.finish_reason = "cancelled"
            self._send_piece(flags=FINAL)
            return
        if self.error is not None:
            self._send_error(self._error_message(self.error), pb_utils.TritonError.INTERNAL)
            return
        if not self.finish_reason:
            self._send_error(
                "[ENGINE_ERROR] generation ended without a finish reason", pb_utils.TritonError.INTERNAL
            )
            return
        # The engine's usage is the authority; the last piece carries any tokens not counted yet.
        completion = int(self.usage.get("completion_tokens", self.decoded))
        self.pending_tokens = max(completion - self.sent_tokens, 0)
        self.prompt_tokens = int(self.usage.get("prompt_tokens", self.prompt_tokens))
        self._send_piece(flags=FINAL)

    def _error_message(self, error: dict[str, Any]) -> str:
        if error.get("type") == "exceed_context_size_error":
            return (
                f"[PROMPT_TOO_LONG prompt_tokens={error.get('n_prompt_tokens')} "
                f"context_length={error.get('n_ctx', self.model.context_length)}] "
                "the prompt does not fit in the model's context window; shorten it"
            )
        if error.get("code") == 400:
            return f"[INVALID_ARGUMENT field=sampling_parameters] {error.get('message', error)}"
        return f"[ENGINE_ERROR] {error.get('message', error)}"

    def _send_error(self, message: str, code: int) -> None:
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        self.sender.send(response, flags=FINAL)


def _first_string(array: np.ndarray, field: str) -> str:
    if array.size != 1:
        raise invalid(field, f"must hold exactly one string, got {array.size}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(field, "is not valid UTF-8") from None
    return str(value)


# Runs beside the stub: if tritonserver dies and the stub is still there 3 s later, kill it. The stub
# notices a dead parent itself, but can then deadlock on the GIL (seen: Triton stopped right after a
# model load left an orphan stub holding ~400 MB that ignores SIGTERM). No Python here, for that reason.
_WATCHDOG = r"""
ppid() { set -- $(sed 's/.*) //' /proc/$1/stat 2>/dev/null); echo "$2"; }
while [ "$(ppid $STUB)" = "$PARENT" ]; do sleep 1; done
[ -d /proc/$STUB ] || exit 0
sleep 3
if [ -d /proc/$STUB ] && [ "$(ppid $STUB)" != "$PARENT" ]; then kill -9 $STUB; fi
"""


def _start_watchdog() -> None:
    subprocess.Popen(
        ["/bin/sh", "-c", _WATCHDOG],
        env={"STUB": str(os.getpid()), "PARENT": str(os.getppid()), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.n_parallel = int(params.get("n_parallel", "4"))
        ctx_size = int(params.get("ctx_size", "16384"))
        # llama.cpp gives each slot an equal share of the context (kv_unified off).
        self.context_length = ctx_size // self.n_parallel
        self.max_tokens = int(params.get("max_tokens", str(self.context_length)))
        # The services read context_length from the config: it must say what the engine enforces.
        declared = int(params.get("context_length", str(self.context_length)))
        if declared != self.context_length:
            raise pb_utils.TritonModelException(
                f"parameter context_length={declared} disagrees with ctx_size / n_parallel = {self.context_length}"
            )
        model_file = self._model_file(params.get("model_file", "models/gemma-3-270m-q4_k_m.gguf"), args)
        if not model_file.is_file():
            raise pb_utils.TritonModelException(
                f"model file {model_file} is missing: run `python -m launcher.setup` (make setup)"
            )

        # llama.cpp's OpenMP threads spin while they wait by default. On a CPU shared with Triton, the
        # services and Envoy, that collapses decoding (measured 4 vs 25 tok/s under load). OpenMP
        # reads this when the library loads, so xllamacpp is imported only after it is set.
        os.environ["OMP_WAIT_POLICY"] = params.get(
            "omp_wait_policy", os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        )
        import xllamacpp

        engine = xllamacpp.CommonParams()
        engine.model.path = str(model_file)
        engine.n_parallel = self.n_parallel
        engine.n_ctx = ctx_size
        engine.kv_unified = False
        engine.cont_batching = True
        engine.n_gpu_layers = int(params.get("n_gpu_layers", "0"))
        n_threads = int(params.get("n_threads", "2"))
        engine.cpuparams.n_threads = n_threads
        engine.cpuparams_batch.n_threads = n_threads
        # xllamacpp also serves llama.cpp's HTTP API on a random port: keep it on loopback.
        engine.hostnames = ["127.0.0.1"]
        engine.port = 0
        # Nothing uses that listener (requests go through handle_completions): lock it with a key no one knows.
        engine.api_keys = [secrets.token_urlsafe(32)]
        engine.cors_origins = ""
        engine.verbosity = int(params.get("log_verbosity", "2"))
        started = time.monotonic()
        self.server = xllamacpp.Server(engine)
        self.stopping = False
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        _start_watchdog()
        print(
            f"gemma-3-270m: loaded {model_file} in {time.monotonic() - started:.2f} s "
            f"(slots={self.n_parallel}, context per slot={self.context_length}, threads={n_threads}, "
            f"gpu_layers={engine.n_gpu_layers})",
            flush=True,
        )

    @staticmethod
    def _model_file(value: str, args: dict[str, str]) -> Path:
        path = Path(value)
        if path.is_absolute():
            return path
        home = os.environ.get("FERRY_HOME")
        # Without FERRY_HOME, fall back to ferry's default: <repo>/.ferry next to triton_models/.
        base = Path(home) if home else Path(args["model_repository"]).resolve().parents[1] / ".ferry"
        return base / path

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            generation = Generation(self, request)
            if self.stopping:
                generation._send_error(
                    "[UNAVAILABLE] the model is being unloaded", pb_utils.TritonError.UNAVAILABLE
                )
                continue
            thread = threading.Thread(target=self._run, args=(generation,), daemon=True, name="generation")
            with self._lock:
                self._threads.add(thread)
            thread.start()
        return None

    def _run(self, generation: Generation) -> None:
        try:
            generation.run()
        except Exception as exc:  # last resort: a response must still complete the request
            try:
                generation._send_error(f"[ENGINE_ERROR] {exc}", pb_utils.TritonError.INTERNAL)
            except Exception:
                pass
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def finalize(self) -> None:
        # Running generations stop at their next token; the engine is freed only after they return.
        self.stopping = True
        deadline = time.monotonic() + 10
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        with self._lock:
            busy = len(self._threads)
        if busy:
            # A request still waiting for its first token cannot be stopped; freeing the engine under it
            # could crash, and the stub process exits after finalize anyway.
            print(f"gemma-3-270m: unloading with {busy} requests still waiting for the engine", flush=True)
            return
        del self.server
