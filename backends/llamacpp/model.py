"""The `llamacpp` Triton backend: any GGUF model on llama.cpp (xllamacpp), as a python-based backend.

Triton loads this file for every model whose config.pbtxt says `backend: "llamacpp"` (`make setup`
lays it out as build/triton/backends/llamacpp/model.py, beside the python backend's stub). It is the
Triton glue only: tensors in, responses and EngineFaults out. One xllamacpp.Server per model instance
runs continuous batching over `n_parallel` slots; each request runs on its own thread (execute() returns
at once) and streams one response per text piece. See README.md in this directory.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from pydantic import ValidationError

from backends.llamacpp import faults
from backends.llamacpp.config import ConfigError, ModelParameters, ferry_home
from backends.llamacpp.contract import COUNT_TOKENS_INPUT, EngineFault, SamplingParameters
from backends.llamacpp.engine import start_engine
from backends.llamacpp.faults import FaultError
from backends.llamacpp.generation import Generation, OutputPiece
from backends.llamacpp.gguf import gguf_path, vocabulary_size
from backends.llamacpp.metrics import EngineMetrics
from backends.llamacpp.request import BOS_TEXT, completion_request, with_defaults
from backends.llamacpp.shutdown import ShutdownMonitor, server_live_url
from backends.llamacpp.watchdog import start_watchdog

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# How long unloading waits for the generations in flight to stop.
DRAIN_SECONDS = 10.0


def _string(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=np.object_)


def _int32(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int32)


class TritonSink:
    """A generation's responses, sent through the request's Triton response sender."""

    def __init__(self, request: Any) -> None:
        self.sender = request.get_response_sender()

    def is_cancelled(self) -> bool:
        return bool(self.sender.is_cancelled())

    def send(self, piece: OutputPiece, final: bool) -> None:
        logprobs = json.dumps(piece.logprobs) if piece.logprobs is not None else ""
        response = pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("text_output", _string(piece.text)),
                pb_utils.Tensor("num_output_tokens", _int32(piece.tokens)),
                pb_utils.Tensor("num_input_tokens", _int32(piece.prompt_tokens)),
                pb_utils.Tensor("finish_reason", _string(piece.finish_reason)),
                pb_utils.Tensor("logprobs", _string(logprobs)),
            ]
        )
        self.sender.send(response, flags=FINAL if final else 0)

    def fail(self, fault: EngineFault) -> None:
        code = getattr(pb_utils.TritonError, fault.code.triton_code)
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(fault.to_message(), code))
        self.sender.send(response, flags=FINAL)


def _input_string(request: Any, name: str, required: bool) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise FaultError(faults.invalid_parameter(name, f"{name} is required"))
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise FaultError(
            faults.invalid_parameter(name, f"{name} must hold exactly one string, got {array.size}")
        )
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise FaultError(faults.invalid_parameter(name, f"{name} is not valid UTF-8")) from None
    return str(value)


def _input_flag(request: Any, name: str) -> bool:
    """An optional BOOL input tensor's value (False when absent)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor is not None and bool(tensor.as_numpy().reshape(-1)[:1].any())


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        try:
            self.params = ModelParameters.from_triton_config(config)
            gguf = gguf_path(self.params, ferry_home(args.get("model_repository")))
        except ConfigError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        if not gguf.is_file():
            raise pb_utils.TritonModelException(
                f"model {self.name}: GGUF file {gguf} is missing: run `python -m launcher.setup` (make setup)"
            )
        self.defaults = self.params.default_sampling
        try:
            # logit_bias ids are checked against it: llama.cpp ignores ids past the vocabulary silently.
            self.vocabulary_size = vocabulary_size(gguf)
        except ConfigError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        started = time.monotonic()
        self.server, self.tokenizer = start_engine(self.params, gguf)
        self.metrics = EngineMetrics(self.name, args["model_version"], self.params)
        # Set by finalize() (the model unloads) or by the monitor (tritonserver is shutting down).
        self.unloading = False
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.shutdown = ShutdownMonitor(busy=lambda: bool(self._threads), url=server_live_url())
        start_watchdog()
        print(
            f"{self.name}: loaded {gguf} in {time.monotonic() - started:.2f} s (slots={self.params.n_parallel}, "
            f"context per slot={self.params.slot_context}, threads={self.params.n_threads}, "
            f"gpu_layers={self.params.n_gpu_layers}, prompt cache={self.params.prompt_cache_mib} MiB)",
            flush=True,
        )

    @property
    def stopping(self) -> bool:
        """Generations in flight end at their next token, and new requests are refused, with MODEL_UNLOADING."""
        return self.unloading or self.shutdown.exiting.is_set()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sink = TritonSink(request)
            if self.stopping:
                sink.fail(faults.model_unloading())
                continue
            thread = threading.Thread(target=self._run, args=(request, sink), daemon=True, name="generation")
            with self._lock:
                self._threads.add(thread)
            thread.start()
        return None

    def _count(self, prompt: str, sink: TritonSink) -> None:
        """The `count_tokens` mode: one final response whose num_input_tokens is the prompt's length in
        the engine's tokens; nothing is generated and no slot is taken."""
        try:
            count = self.tokenizer.count(prompt.removeprefix(BOS_TEXT))
        except Exception as exc:
            sink.fail(faults.engine_failed(f"the engine could not tokenize the prompt: {exc}"))
            return
        sink.send(OutputPiece(text="", tokens=0, prompt_tokens=count, finish_reason="", logprobs=None), True)

    def _generate(self, request: Any, sink: TritonSink) -> None:
        try:
            prompt = _input_string(request, "text_input", required=True) or ""
            if _input_flag(request, COUNT_TOKENS_INPUT):
                self._count(prompt, sink)
                return
            raw = _input_string(request, "sampling_parameters", required=False) or ""
            try:
                sampling = with_defaults(SamplingParameters.from_json(raw), self.defaults)
            except ValidationError as exc:
                raise FaultError(faults.from_validation_error(exc, "sampling_parameters")) from None
            engine_request = completion_request(
                prompt, sampling, self.params.max_output_tokens, self.vocabulary_size
            )
        except FaultError as exc:
            sink.fail(exc.fault)
            return
        generation = Generation(
            sink=sink,
            n_top=sampling.top_logprobs if sampling.logprobs else -1,
            context_length=self.params.slot_context,
            max_prompt_tokens=sampling.max_prompt_tokens,
            is_stopping=lambda: self.stopping,
            on_usage=self.metrics.record,
        )
        generation.run(self.server.handle_completions, engine_request)

    def _run(self, request: Any, sink: TritonSink) -> None:
        try:
            self._generate(request, sink)
        except Exception as exc:  # last resort: a response must still complete the request
            try:
                sink.fail(faults.engine_failed(f"the backend failed: {exc}"))
            except Exception:
                pass
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def finalize(self) -> None:
        # Running generations stop at their next token with MODEL_UNLOADING; the engine is freed only
        # after they return.
        self.unloading = True
        self.shutdown.close()
        deadline = time.monotonic() + DRAIN_SECONDS
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        with self._lock:
            busy = len(self._threads)
        if busy:
            # A request still waiting for its first token cannot be stopped; freeing the engine under it
            # could crash, and the stub process exits after finalize anyway.
            print(f"{self.name}: unloading with {busy} requests still waiting for the engine", flush=True)
            return
        del self.server
