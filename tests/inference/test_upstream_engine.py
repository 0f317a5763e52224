"""The upstream engine against an in-process stand-in for an OpenAI-compatible server (httpx's
MockTransport): the request it sends, how its stream becomes pieces, and every error path, which a
real server cannot be made to take at will. tests/inference/test_upstream_stack.py runs a real one."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Any

import grpc
import httpx
import pytest

from backends.llamacpp.contract import EngineErrorCode, SamplingParameters
from services.common import upstream_models
from services.common.config import UpstreamModel
from services.common.errors import RpcError
from services.common.triton_client import ModelInfo, Provider
from services.inference import upstream_engine
from services.inference.domain import Message, Piece
from services.inference.engine_errors import caller_error
from services.inference.engine_interface import (
    EngineError,
    EngineFaulted,
    EngineRouter,
    EngineTimedOut,
    UpstreamAuthFailed,
    UpstreamRefused,
    UpstreamUnreachable,
)
from services.inference.policy import check_against_model
from services.inference.render import Render
from services.inference.templates import ChatTemplates
from services.inference.upstream_engine import UpstreamEngine, request_body
from tests.inference.test_wire_parsing import chat, completion

KEY = "sk-upstream-secret-0123456789"
KEY_ENV = "FERRY_TEST_UPSTREAM_ENGINE_KEY"
HI = (Message("user", "Hi"),)

Handler = Callable[[httpx.Request], Any]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_engine, "RETRY_INITIAL_SECONDS", 0.001)
    monkeypatch.setattr(upstream_engine, "RETRY_MAX_SECONDS", 0.01)
    monkeypatch.setenv(KEY_ENV, KEY)


def config(**overrides: Any) -> UpstreamModel:
    values: dict[str, Any] = {
        "base_url": "http://upstream.test/v1",
        "upstream_model": "their-model",
        "api_key_env": KEY_ENV,
        "max_retries": 2,
    }
    return UpstreamModel(**{**values, **overrides})


def info(cfg: UpstreamModel | None = None) -> ModelInfo:
    return upstream_models.model_info("remote", cfg or config())


class Body(httpx.AsyncByteStream):
    """A streamed response body that remembers whether the client closed it."""

    def __init__(self, chunks: Iterable[bytes], then: Exception | None = None, stall: bool = False) -> None:
        self.chunks, self.then, self.stall = list(chunks), then, stall
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.then is not None:
            raise self.then
        if self.stall:
            await asyncio.sleep(60)

    async def aclose(self) -> None:
        self.closed = True


def sse(*events: dict[str, Any], done: bool = True) -> list[bytes]:
    out = [f"data: {json.dumps(event)}\n\n".encode() for event in events]
    return [*out, b"data: [DONE]\n\n"] if done else out


def chat_chunks(*texts: str, finish: str = "stop", usage: tuple[int, int] = (7, 3)) -> list[bytes]:
    events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in texts]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    events.append(
        {
            "choices": [],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": 0},
        }
    )
    return sse(*events)


class Upstream:
    """Answers each request with the next of `answers` (a response or an exception); records requests."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def engine(self, cfg: UpstreamModel | None = None) -> UpstreamEngine:
        return UpstreamEngine({"remote": cfg or config()}, transport=httpx.MockTransport(self))

    def body(self, index: int = -1) -> dict[str, Any]:
        return dict(json.loads(self.requests[index].content))


def ok(body: Body) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)


async def run(
    engine: UpstreamEngine,
    *,
    messages: tuple[Message, ...] | None = HI,
    sampling: SamplingParameters | None = None,
    prompt: str = "",
    timeout: float = 10.0,
) -> list[Piece]:
    stream = engine.generate(
        info(engine.models["remote"]),
        prompt,
        sampling or SamplingParameters(),
        messages=messages,
        request_id="req-1",
        timeout=timeout,
    )
    async with aclosing(stream):
        return [piece async for piece in stream]


# --- the request --------------------------------------------------------------------------------------


def test_only_the_fields_the_caller_set_are_sent_by_their_openai_names() -> None:
    sampling = SamplingParameters(temperature=0.2, max_tokens=5, stop=("\n",), seed=3, top_k=4)
    body = request_body(info(), "their-model", sampling, "", HI)
    assert body == {
        "model": "their-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.2,
        "max_tokens": 5,
        "stop": ["\n"],
        "seed": 3,
        "top_k": 4,
    }
    plain = request_body(info(), "m", SamplingParameters(), "Once", None)
    assert plain["prompt"] == "Once" and "messages" not in plain
    assert not {"top_k", "min_p", "repeat_penalty", "ignore_eos", "temperature"} & plain.keys()


async def test_the_models_max_tokens_is_sent_when_the_caller_sets_none() -> None:
    # Else the upstream's own default applies: llama.cpp generates to the end of its context,
    # OpenAI's legacy completions stop at 16.
    upstream = Upstream(ok(Body(chat_chunks("x"))), ok(Body(chat_chunks("y"))))
    await run(upstream.engine(config(max_tokens=321)))
    assert upstream.body()["max_tokens"] == 321
    await run(upstream.engine(config(max_tokens=321)), sampling=SamplingParameters(max_tokens=7))
    assert upstream.body()["max_tokens"] == 7


def test_llama_cpp_extras_and_logprobs_in_each_apis_form() -> None:
    sampling = SamplingParameters(repetition_penalty=1.1, min_p=0.05, ignore_eos=True, logprobs=True)
    chat_body = request_body(info(), "m", sampling.model_copy(update={"top_logprobs": 2}), "", HI)
    assert chat_body["repeat_penalty"] == 1.1 and chat_body["min_p"] == 0.05 and chat_body["ignore_eos"]
    assert (chat_body["logprobs"], chat_body["top_logprobs"]) == (True, 2)
    # The legacy completions API takes a number; at least one so every server returns the chosen token.
    assert request_body(info(), "m", sampling, "p", None)["logprobs"] == 1


async def test_chat_goes_to_chat_completions_with_the_key_and_the_request_id() -> None:
    upstream = Upstream(ok(Body(chat_chunks("Hel", "lo"))))
    await run(upstream.engine())
    request = upstream.requests[0]
    assert request.url == "http://upstream.test/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["x-request-id"] == "req-1"
    assert upstream.body()["model"] == "their-model"


async def test_a_prompt_goes_to_completions_under_ferrys_name_when_no_upstream_name_is_set() -> None:
    body = sse(
        {"choices": [{"text": "Once", "finish_reason": None}]},
        {"choices": [{"text": " upon", "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}},
    )
    upstream = Upstream(ok(Body(body)))
    pieces = await run(upstream.engine(config(upstream_model="")), messages=None, prompt="p")
    assert upstream.requests[0].url.path == "/v1/completions"
    assert upstream.body()["model"] == "remote"
    assert "".join(p.text for p in pieces) == "Once upon" and pieces[-1].finish_reason == "length"


async def test_no_authorization_header_when_no_key_is_configured() -> None:
    upstream = Upstream(ok(Body(chat_chunks("x"))))
    await run(upstream.engine(config(api_key_env="")))
    assert "authorization" not in upstream.requests[0].headers


async def test_the_key_can_come_from_a_secret_file(tmp_path: Any) -> None:
    secret = tmp_path / "key"
    secret.write_text(f"{KEY}\n")
    upstream = Upstream(ok(Body(chat_chunks("x"))))
    await run(upstream.engine(config(api_key_env="", api_key_file=secret)))
    assert upstream.requests[0].headers["authorization"] == f"Bearer {KEY}"


# --- the answer ---------------------------------------------------------------------------------------


async def test_pieces_carry_the_text_and_the_last_one_the_finish_reason_and_the_usage() -> None:
    pieces = await run(Upstream(ok(Body(chat_chunks("Hel", "lo", usage=(7, 3))))).engine())
    assert [p.text for p in pieces] == ["Hel", "lo", ""]
    assert [p.finish_reason for p in pieces] == ["", "", "stop"]
    # One token per chunk while streaming; the last piece brings the total to the upstream's usage.
    assert sum(p.tokens for p in pieces) == 3 and pieces[-1].prompt_tokens == 7


async def test_chat_logprobs_become_token_logprobs() -> None:
    entry = {"token": "Hi", "logprob": -0.5, "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}
    events: list[dict[str, Any]] = [
        {"choices": [{"delta": {"content": "Hi"}, "logprobs": {"content": [entry]}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
    ]
    sampling = SamplingParameters(logprobs=True, top_logprobs=1)
    pieces = await run(Upstream(ok(Body(sse(*events)))).engine(), sampling=sampling)
    first = pieces[0].logprobs[0]
    assert (first.token, first.logprob, first.top_logprobs[0].token) == ("Hi", -0.5, "Hi")


async def test_legacy_completion_logprobs_keep_only_the_alternatives_asked_for() -> None:
    raw = {"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1, "b": -2.0}]}
    events: list[dict[str, Any]] = [
        {"choices": [{"text": "a", "logprobs": raw}]},
        {"choices": [{"text": "", "finish_reason": "stop"}]},
    ]
    sampling = SamplingParameters(logprobs=True)
    pieces = await run(Upstream(ok(Body(sse(*events)))).engine(), messages=None, sampling=sampling)
    assert pieces[0].logprobs[0].token == "a" and pieces[0].logprobs[0].top_logprobs == ()
    # No usage chunk (an upstream without include_usage): the counted tokens stand.
    assert sum(p.tokens for p in pieces) == 1


async def test_without_usage_the_text_that_comes_with_the_finish_reason_is_counted_too() -> None:
    events: list[dict[str, Any]] = [
        {"choices": [{"text": "Once", "finish_reason": None}]},
        {"choices": [{"text": " upon", "finish_reason": None}]},
        {"choices": [{"text": " a", "finish_reason": "length"}]},
    ]
    pieces = await run(Upstream(ok(Body(sse(*events)))).engine(), messages=None, prompt="p")
    assert "".join(p.text for p in pieces) == "Once upon a"
    assert sum(p.tokens for p in pieces) == 3 and pieces[-1].tokens == 1
    # With usage, the total is the upstream's, whatever was counted on the way.
    with_usage = [*events, {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 5}}]
    pieces = await run(Upstream(ok(Body(sse(*with_usage)))).engine(), messages=None, prompt="p")
    assert sum(p.tokens for p in pieces) == 5


async def test_the_end_of_the_stream_is_read_but_not_waited_for_long_after_the_usage() -> None:
    body = Body(chat_chunks("a")[:-1], stall=True)  # usage, then neither [DONE] nor the end
    started = time.monotonic()
    pieces = await run(Upstream(ok(body)).engine())
    assert pieces[-1].finish_reason == "stop" and time.monotonic() - started < 5
    assert body.closed


async def test_closing_the_stream_early_closes_the_upstream_response() -> None:
    body = Body(chat_chunks(*["tok"] * 50))
    stream = (
        Upstream(ok(body))
        .engine()
        .generate(info(), "", SamplingParameters(), messages=HI, request_id="r", timeout=None)
    )
    async with aclosing(stream):
        await anext(stream)
    assert body.closed


# --- failures -----------------------------------------------------------------------------------------


def status(err: EngineError) -> RpcError:
    return caller_error(err, chat().spelling)


async def failure(upstream: Upstream, **kwargs: Any) -> EngineError:
    return await failure_of(upstream.engine(), **kwargs)


async def failure_of(engine: UpstreamEngine, **kwargs: Any) -> EngineError:
    with pytest.raises(EngineError) as err:
        await run(engine, **kwargs)
    return err.value


async def test_an_unreachable_upstream_is_tried_again_then_unavailable_with_a_retry_hint() -> None:
    upstream = Upstream(httpx.ConnectError("connection refused"))
    err = await failure(upstream)
    assert isinstance(err, UpstreamUnreachable) and len(upstream.requests) == 3  # max_retries=2
    rpc = status(err)
    assert (rpc.code, rpc.reason, rpc.retry_after_seconds) == (
        grpc.StatusCode.UNAVAILABLE,
        "UPSTREAM_UNAVAILABLE",
        1.0,
    )


async def test_server_errors_and_429_are_retried_and_a_later_success_is_served() -> None:
    upstream = Upstream(
        httpx.Response(503, json={"error": {"message": "loading model"}}),
        httpx.Response(429, headers={"retry-after": "0"}),
        ok(Body(chat_chunks("fine"))),
    )
    pieces = await run(upstream.engine())
    assert pieces[0].text == "fine" and len(upstream.requests) == 3


async def test_429_after_the_retries_is_resource_exhausted_with_the_upstreams_hint() -> None:
    upstream = Upstream(
        httpx.Response(429, headers={"retry-after": "7"}, json={"error": {"message": "busy"}})
    )
    rpc = status(await failure(upstream))
    assert (rpc.code, rpc.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED")
    assert rpc.retry_after_seconds == 7.0 and "busy" in rpc.message


async def test_a_refused_key_is_a_config_error_that_never_repeats_the_key() -> None:
    echoed = {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error"}}
    upstream = Upstream(httpx.Response(401, json=echoed))
    err = await failure(upstream)
    assert isinstance(err, UpstreamAuthFailed) and len(upstream.requests) == 1  # not retried
    rpc = status(err)
    assert (rpc.code, rpc.reason) == (grpc.StatusCode.INTERNAL, "UPSTREAM_AUTH_FAILED")
    assert "model 'remote'" in rpc.message and "see the inference service log" in rpc.message
    assert KEY not in rpc.message and KEY not in str(rpc.to_status())


async def test_where_the_key_comes_from_is_logged_for_the_operator_not_told_to_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger=upstream_engine.__name__):
        err = await failure(Upstream(httpx.Response(403, json={"error": {"message": KEY}})))
    assert KEY_ENV not in status(err).message
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"environment variable {KEY_ENV}" in logged and "model remote" in logged
    assert KEY not in logged


async def test_a_key_that_is_not_set_fails_before_anything_is_sent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(KEY_ENV)
    upstream = Upstream(ok(Body(chat_chunks("x"))))
    with caplog.at_level("WARNING", logger=upstream_engine.__name__):
        err = await failure(upstream)
    assert isinstance(err, UpstreamAuthFailed) and upstream.requests == []
    assert KEY_ENV not in err.message and "see the inference service log" in err.message
    assert KEY_ENV in "\n".join(record.getMessage() for record in caplog.records)


async def test_a_400_names_the_parameter_the_upstream_names_as_the_caller_spelled_it() -> None:
    refusal = {
        "error": {"message": "temperature too high", "type": "invalid_request_error", "param": "temperature"}
    }
    err = await failure(Upstream(httpx.Response(400, json=refusal)))
    assert isinstance(err, EngineFaulted) and err.fault.code is EngineErrorCode.INVALID_PARAMETER
    rpc = status(err)
    assert rpc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.field_violations[0][0] == "temperature" and "temperature too high" in rpc.message
    # Without a parameter named: the input.
    unnamed = status(await failure(Upstream(httpx.Response(400, json={"error": {"message": "bad"}}))))
    assert unnamed.field_violations[0][0] == "messages"


async def test_llama_cpps_context_refusal_is_prompt_too_long_with_its_numbers() -> None:
    refusal = {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 5000,
            "n_ctx": 4096,
        }
    }
    rpc = status(await failure(Upstream(httpx.Response(400, json=refusal))))
    assert rpc.reason == "PROMPT_TOO_LONG"
    assert rpc.metadata["prompt_tokens"] == "5000" and rpc.metadata["context_length"] == "4096"


async def test_another_4xx_is_an_engine_error_not_the_callers() -> None:
    err = await failure(Upstream(httpx.Response(404, json={"error": {"message": "model not found"}})))
    assert isinstance(err, UpstreamRefused) and status(err).reason == "ENGINE_ERROR"


async def test_a_connection_lost_mid_answer_is_unavailable() -> None:
    body = Body(chat_chunks("a", "b")[:2], then=httpx.RemoteProtocolError("peer closed connection"))
    received: list[Piece] = []
    with pytest.raises(UpstreamUnreachable):
        stream = (
            Upstream(ok(body))
            .engine()
            .generate(info(), "", SamplingParameters(), messages=HI, request_id="r", timeout=None)
        )
        async with aclosing(stream):
            async for piece in stream:
                received.append(piece)
    assert [p.text for p in received] == ["a"]


async def test_an_answer_that_ends_without_a_finish_reason_is_unavailable() -> None:
    body = Body(sse({"choices": [{"delta": {"content": "a"}}]}, done=False))
    assert isinstance(await failure(Upstream(ok(body))), UpstreamUnreachable)


async def test_an_error_event_in_the_stream_is_mapped_like_an_answer() -> None:
    body = Body(sse({"error": {"code": 503, "message": "slot crashed"}}, done=False))
    assert isinstance(await failure(Upstream(ok(body))), UpstreamUnreachable)


async def test_retries_against_a_slow_failing_upstream_end_by_the_deadline() -> None:
    async def slow_503(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return httpx.Response(503)

    engine = UpstreamEngine({"remote": config(max_retries=50)}, transport=httpx.MockTransport(slow_503))
    started = time.monotonic()
    err = await failure_of(engine, timeout=0.7)
    assert time.monotonic() - started < 0.7 + 0.15
    assert isinstance(err, EngineTimedOut | UpstreamUnreachable)


async def test_an_upstream_that_never_answers_ends_at_the_deadline() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    engine = UpstreamEngine({"remote": config()}, transport=httpx.MockTransport(hang))
    started = time.monotonic()
    err = await failure_of(engine, timeout=0.3)
    assert time.monotonic() - started < 0.3 + 0.15
    assert isinstance(err, EngineTimedOut) and status(err).code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_ferrys_own_pool_exhausted_is_not_the_upstream_being_down() -> None:
    upstream = Upstream(httpx.PoolTimeout("no connection available"))
    err = await failure(upstream)
    assert len(upstream.requests) == 1  # not retried: more requests than connections is a config matter
    assert not isinstance(err, UpstreamUnreachable | EngineTimedOut)
    assert "ferry's connections" in err.message and status(err).reason == "ENGINE_ERROR"


async def test_a_read_timeout_is_deadline_exceeded() -> None:
    upstream = Upstream(httpx.ReadTimeout("timed out"))
    err = await failure(upstream)
    assert isinstance(err, EngineTimedOut) and len(upstream.requests) == 1
    assert status(err).code == grpc.StatusCode.DEADLINE_EXCEEDED


# --- routing, rendering, policy -------------------------------------------------------------------------


async def test_the_router_hands_each_generation_to_its_models_provider() -> None:
    upstream = Upstream(ok(Body(chat_chunks("from upstream"))))
    router = EngineRouter({Provider.UPSTREAM: upstream.engine()})
    stream = router.generate(info(), "", SamplingParameters(), messages=HI, request_id="r", timeout=None)
    async with aclosing(stream):
        assert (await anext(stream)).text == "from upstream"
    triton_model = ModelInfo("local", "python", 4096, 1024, "ferry", "", 1)
    with pytest.raises(EngineError, match="no engine serves triton"):
        async for _ in router.generate(triton_model, "p", SamplingParameters(), request_id="r", timeout=None):
            pass


def test_an_upstream_model_takes_conversations_without_a_template_of_ours() -> None:
    request = chat(model="remote")
    check_against_model(request, info())  # no chat template: still admissible
    assert Render(ChatTemplates())(request, info()) == ""
    assert Render(ChatTemplates())(completion(prompt="Once"), info()) == "Once"


def test_an_upstream_models_metadata_comes_from_its_config() -> None:
    model = upstream_models.model_info(
        "remote", config(context_length=8192, max_tokens=512, owned_by="lab", max_in_flight=3)
    )
    assert model.provider is Provider.UPSTREAM and model.backend == "openai-upstream"
    assert (model.context_length, model.max_tokens, model.owned_by, model.engine_slots) == (
        8192,
        512,
        "lab",
        3,
    )
    assert model.chat_template == "" and model.capabilities == {"chat", "completion"}
