"""Every error on OpenAI's paths, on the real stack, is OpenAI's error object with the right status.

Sent to both /v1/chat/completions and /v1/completions, unary and streamed: bodies that are not JSON,
fields of the wrong JSON type, every refusal of the OpenAI parsers and the sampling contract, an
unknown model, a prompt beyond the context, and the edge's key check (no key, a wrong key, a key
without the scope, a rate limit). None of these generates a token, so the file stays fast.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import openai
import pytest
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc

from services.common.errors import OPENAI_ERROR_METADATA, error_details
from tests.stack import RunningStack, bearer

pytestmark = pytest.mark.stack

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
# Gemma's context per slot is 4096 tokens; this is about 5000.
TOO_LONG = "word " * 5000
ERROR_FIELDS = {"message", "type", "param", "code"}
# A field of the base body to leave out.
ABSENT = object()


def base(path: str, model: str) -> dict[str, Any]:
    if path == CHAT:
        return {"model": model, "messages": HI, "max_tokens": 2}
    return {"model": model, "prompt": "Hi", "max_tokens": 2}


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of an answer, checked to be OpenAI's shape and nothing else."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert not any(h.startswith("x-ferry-") for h in response.headers), response.headers
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == ERROR_FIELDS, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def post(rest: httpx.Client, path: str, body: dict[str, Any] | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return rest.post(path, content=content, headers={"content-type": "application/json"})


# (path, fields over the base body, param, code, words in the message): a wrong JSON type is refused by
# the edge (invalid_type), a wrong value by the service (invalid_value unless OpenAI has a code).
BOTH = [CHAT, COMPLETIONS]
INVALID: list[tuple[list[str], dict[str, Any], str | None, str, str]] = [
    # Wrong JSON types: the edge (Envoy's transcoder) refuses them, naming the field.
    (BOTH, {"temperature": "hot"}, "temperature", "invalid_type", "expected a number"),
    (BOTH, {"max_tokens": 1.5}, "max_tokens", "invalid_type", "expected an integer"),
    (BOTH, {"model": 7}, "model", "invalid_type", "expected a string"),
    (BOTH, {"stream_options": 3}, "stream_options", "invalid_type", "expected a JSON object"),
    (BOTH, {"logit_bias": {"50256": "up"}}, "logit_bias", "invalid_type", "expected a number"),
    ([CHAT], {"messages": "hi"}, "messages", "invalid_type", "ChatCompletionMessage"),
    ([CHAT], {"messages": [{"role": 1, "content": "x"}]}, "messages[0].role", "invalid_type", "a string"),
    ([CHAT], {"logprobs": 1}, "logprobs", "invalid_type", "expected a boolean"),
    ([COMPLETIONS], {"echo": 1}, "echo", "invalid_type", "expected a boolean"),
    # The parsers' own refusals.
    (BOTH, {"model": ""}, "model", "invalid_value", "is required"),
    (BOTH, {"stop": 5}, "stop", "invalid_value", "string or a list of strings"),
    (BOTH, {"stop": ["a", 5]}, "stop[1]", "invalid_value", "must be a string"),
    (BOTH, {"n": 2}, "n", "invalid_value", "only 1 choice"),
    (BOTH, {"stream_options": {"include_usage": True}}, "stream_options", "invalid_value", "stream is true"),
    ([CHAT], {"messages": []}, "messages", "invalid_value", "at least one message"),
    (
        [CHAT],
        {"messages": [{"role": "wizard", "content": "x"}]},
        "messages[0].role",
        "invalid_value",
        "wizard",
    ),
    ([CHAT], {"messages": [{"content": "x"}]}, "messages[0].role", "invalid_value", "is required"),
    ([CHAT], {"messages": [{"role": "user"}]}, "messages[0].content", "invalid_value", "is required"),
    (
        [CHAT],
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
        "invalid_value",
        "only 'text' parts",
    ),
    # A role that quotes a huge input is cut (errors.TEXT_LIMIT): still an answer, not a reset stream.
    (
        [CHAT],
        {"messages": [{"role": "x" * 100_000, "content": "x"}]},
        "messages[0].role",
        "invalid_value",
        "...",
    ),
    ([CHAT], {"functions": [{"name": "f"}]}, "functions", "invalid_value", "use tools"),
    # Structured output, tools and logit_bias (their parsers name the field; the wording is theirs).
    (BOTH, {"response_format": {"type": "xml"}}, "response_format.type", "invalid_value", "xml"),
    (BOTH, {"logit_bias": {"5": 500}}, "logit_bias.5", "invalid_value", "500"),
    ([CHAT], {"tool_choice": "required"}, "tool_choice", "invalid_value", "tools"),
    ([CHAT], {"store": True}, "store", "invalid_value", "only false"),
    ([COMPLETIONS], {"prompt": None}, "prompt", "invalid_value", "is required"),
    ([COMPLETIONS], {"prompt": ["a", "b"]}, "prompt", "invalid_value", "exactly one prompt"),
    ([COMPLETIONS], {"prompt": [[1, 2]]}, "prompt[0]", "invalid_value", "token id prompts"),
    ([COMPLETIONS], {"best_of": 2}, "best_of", "invalid_value", "only 1 choice"),
    ([COMPLETIONS], {"suffix": "end"}, "suffix", "invalid_value", "fill-in-the-middle"),
    ([COMPLETIONS], {"echo": True, "logprobs": 1}, "echo", "invalid_value", "logprobs"),
    ([COMPLETIONS], {"logprobs": 6}, "logprobs", "invalid_value", "[0, 5]"),
    # The sampling contract's ranges, named as the caller spelled them.
    (BOTH, {"temperature": 3}, "temperature", "invalid_value", "in [0, 2], got 3"),
    (BOTH, {"top_p": 1.5}, "top_p", "invalid_value", "got 1.5"),
    (BOTH, {"presence_penalty": -3}, "presence_penalty", "invalid_value", "got -3"),
    (BOTH, {"frequency_penalty": 9}, "frequency_penalty", "invalid_value", "got 9"),
    (BOTH, {"max_tokens": 0}, "max_tokens", "invalid_value", "got 0"),
    (BOTH, {"max_tokens": 10**6}, "max_tokens", "invalid_value", "at most"),
    (BOTH, {"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value", "at most 4"),
    (
        [CHAT],
        {"max_tokens": ABSENT, "max_completion_tokens": 10**6},
        "max_completion_tokens",
        "invalid_value",
        "at most",
    ),
    ([CHAT], {"top_logprobs": 3}, "top_logprobs", "invalid_value", "requires logprobs"),
    ([CHAT], {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value", "got 21"),
]
CASES = [
    pytest.param(
        path, fields, param, code, words, stream, id=f"{path.rsplit('/', 1)[1]}-{param}-{code}-{i}-{stream}"
    )
    for i, (paths, fields, param, code, words) in enumerate(INVALID)
    for path in paths
    # stream_options are refused only on a request that does not stream.
    for stream in ((False,) if "stream_options" in fields and code == "invalid_value" else (False, True))
]


@pytest.mark.parametrize(("path", "fields", "param", "code", "words", "stream"), CASES)
def test_invalid_requests_are_openai_errors_naming_the_field(
    rest: httpx.Client,
    model: str,
    path: str,
    fields: dict[str, Any],
    param: str | None,
    code: str,
    words: str,
    stream: bool,
) -> None:
    body = {k: v for k, v in {**base(path, model), **fields, "stream": stream}.items() if v is not ABSENT}
    error = openai_error(post(rest, path, body), 400)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    assert words in error["message"], error


@pytest.mark.parametrize("path", BOTH)
@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ('{"model": "x", ', "invalid_json", "could not parse the JSON body"),
        ("model=x&prompt=y", "invalid_json", "could not parse the JSON body"),
        ("[1, 2, 3]", "invalid_type", "must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_an_openai_error(
    rest: httpx.Client, path: str, body: str, code: str, words: str
) -> None:
    error = openai_error(post(rest, path, body), 400)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, code)
    assert words in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("path", BOTH)
def test_unknown_model_is_404_model_not_found(rest: httpx.Client, path: str, stream: bool) -> None:
    body = {**base(path, "no-such-model"), "stream": stream}
    error = openai_error(post(rest, path, body), 404)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "model_not_found",
    )
    assert "no-such-model" in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("path", "param"), [(CHAT, "messages"), (COMPLETIONS, "prompt")])
def test_prompt_too_long_is_400_context_length_exceeded(
    rest: httpx.Client, model: str, path: str, param: str, stream: bool
) -> None:
    body = base(path, model)
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": TOO_LONG}]
    else:
        body["prompt"] = TOO_LONG
    error = openai_error(post(rest, path, {**body, "stream": stream}), 400)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        param,
        "context_length_exceeded",
    )
    assert "4096" in error["message"]


def test_unknown_paths_and_methods_are_openai_404s(rest: httpx.Client) -> None:
    for method, path in [("POST", "/v1/responses"), ("GET", CHAT), ("POST", "/v1/models")]:
        error = openai_error(rest.request(method, path), 404)
        assert error == {
            "message": f"Invalid URL ({method} {path})",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }


@pytest.mark.parametrize("path", BOTH)
def test_keys_refused_at_the_edge_are_openai_errors(stack: RunningStack, model: str, path: str) -> None:
    body = base(path, model)
    for headers in ({}, bearer("fry_not-a-key-anyone-issued")):
        with httpx.Client(base_url=stack.rest, headers=headers, timeout=30) as anonymous:
            error = openai_error(post(anonymous, path, body), 401)
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
    with stack.http(stack.create_key(["read"], display_name="wire-read")) as reader:
        error = openai_error(post(reader, path, body), 403)
    assert (error["type"], error["param"], error["code"]) == ("permission_error", None, "scope_missing")


def test_a_rate_limit_is_429_with_retry_after(stack: RunningStack, model: str) -> None:
    key = stack.create_key(["inference"], display_name="wire-rpm", requests_per_minute=1)
    with stack.http(key) as http:
        # The first request is counted even though the service refuses it (no model named).
        assert post(http, COMPLETIONS, {"prompt": "Hi"}).status_code == 400
        refused = post(http, CHAT, base(CHAT, model))
    error = openai_error(refused, 429)
    assert (error["type"], error["param"], error["code"]) == ("rate_limit_error", None, "rate_limit_exceeded")
    assert int(refused.headers["retry-after"]) >= 1


def test_the_sdk_raises_typed_errors_with_param_and_code(sdk: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=3)
    assert (bad.value.param, bad.value.code, bad.value.type) == (
        "temperature",
        "invalid_value",
        "invalid_request_error",
    )
    assert "temperature: must be in [0, 2], got 3" in bad.value.message
    with pytest.raises(openai.BadRequestError) as streamed:
        sdk.completions.create(model=model, prompt="x", max_tokens=2, n=2, stream=True)
    assert (streamed.value.param, streamed.value.code) == ("n", "invalid_value")
    with pytest.raises(openai.BadRequestError) as wrong_type:
        sdk.completions.create(model=model, prompt="x", extra_body={"temperature": "hot"})
    assert (wrong_type.value.param, wrong_type.value.code) == ("temperature", "invalid_type")
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": TOO_LONG}], max_tokens=1
        )
    assert (too_long.value.param, too_long.value.code) == ("messages", "context_length_exceeded")
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as retrieve:
        sdk.models.retrieve("no-such-model")
    assert retrieve.value.code == "model_not_found"


def test_the_sdk_raises_authentication_error_with_its_code(stack: RunningStack, model: str) -> None:
    with openai.OpenAI(base_url=f"{stack.rest}/v1", api_key="fry_wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.completions.create(model=model, prompt="x", max_tokens=1)
    assert (refused.value.code, refused.value.type) == ("invalid_api_key", "invalid_request_error")


@pytest.mark.parametrize("path", BOTH)
def test_a_good_stream_ends_with_done(rest: httpx.Client, model: str, path: str) -> None:
    body = {**base(path, model), "max_tokens": 1, "stream": True}
    with rest.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_ferry_api_errors_keep_google_rpc_status(rest: httpx.Client, model: str) -> None:
    bad = rest.post(f"/api/v1/models/{model}:generate", json={"prompt": "x", "sampling": {"top_p": 3}})
    assert bad.status_code == 400
    body = bad.json()
    assert body["code"] == 3 and body["message"].startswith("sampling.top_p:")
    violations = next(d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert violations["field_violations"][0]["field"] == "sampling.top_p"
    garbled = post(rest, f"/api/v1/models/{model}:generate", "{")
    assert garbled.status_code == 400 and "error" not in garbled.text


def test_native_grpc_callers_of_the_openai_service_keep_the_rich_status(
    stack: RunningStack, model: str
) -> None:
    """The OpenAI JSON travels as trailing metadata for Envoy's REST answer only: a gRPC caller through
    Envoy gets the status with its details, and not that metadata."""
    stub = openai_pb2_grpc.OpenAIServiceStub(stack.channel(stack.grpc_target))
    request = openai_pb2.CreateChatCompletionRequest(
        model=model, messages=[openai_pb2.ChatCompletionMessage(role="user")], temperature=3
    )
    request.messages[0].content.string_value = "x"
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateChatCompletion(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(err.value)
    assert details["BadRequest"].field_violations[0].field == "temperature"  # type: ignore[attr-defined]
    assert OPENAI_ERROR_METADATA not in dict(err.value.trailing_metadata() or ())
