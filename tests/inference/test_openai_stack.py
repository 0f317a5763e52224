"""The OpenAI surface on the real stack: the official `openai` SDK, unmodified, against Envoy.

Generations are kept short (a few tokens) so the suite stays fast on two cores.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

pytestmark = pytest.mark.stack

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three rivers."}]


def test_models_list_and_retrieve(client: openai.OpenAI, model: str) -> None:
    listed = client.models.list()
    assert model in [m.id for m in listed.data]
    one = client.models.retrieve(model)
    assert (one.id, one.object) == (model, "model")
    assert one.owned_by and isinstance(one.created, int) and one.created > 1_600_000_000


def test_retrieve_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion(client: openai.OpenAI, model: str) -> None:
    before = int(time.time())
    reply = client.chat.completions.create(model=model, messages=HI, max_tokens=8)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == model and before - 1 <= reply.created <= time.time() + 1
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_created_is_a_json_number(rest: httpx.Client, model: str) -> None:
    body = rest.post("/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 2}).json()
    assert isinstance(body["created"], int)
    assert isinstance(body["usage"]["total_tokens"], int)


def test_chat_completion_stream_with_usage(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=HI,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (
        0 < usage.completion_tokens <= 6
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )


def test_chat_stream_without_include_usage_has_no_usage(client: openai.OpenAI, model: str) -> None:
    chunks = list(client.chat.completions.create(model=model, messages=HI, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6)
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion" and reply.model == model
    assert reply.choices[0].text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 6


def test_completion_stream(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.completions.create(
            model=model, prompt="One, two,", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_max_tokens_is_honoured(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model=model,
        messages=HI,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage is not None and chat.usage.completion_tokens == 3


def test_stop_sequence_is_honoured_and_not_returned(client: openai.OpenAI, model: str) -> None:
    prompt = "1, 2, 3, 4, 5, 6, 7,"
    free = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    assert "," in free.choices[0].text  # without the stop sequence the count goes on
    stopped = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, stop=",")
    assert "," not in stopped.choices[0].text and stopped.choices[0].text.strip()
    assert stopped.choices[0].finish_reason == "stop"
    listed = client.completions.create(
        model=model, prompt=prompt, max_tokens=6, temperature=0, stop=["9", ","]
    )
    assert listed.choices[0].text == stopped.choices[0].text


def test_same_seed_gives_the_same_text_alone(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        reply = client.completions.create(
            model=model, prompt="My favourite animal is", max_tokens=12, temperature=1.0, seed=seed
        )
        return reply.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_wire_shapes_openai_accepts(rest: httpx.Client, model: str) -> None:
    """Content parts, a stop string, max_completion_tokens, seed, user and unknown fields all pass."""
    body = {
        "model": model,
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}],
            },
        ],
        "stop": "\n\n",
        "max_completion_tokens": 3,
        "seed": 5,
        "user": "user-42",
        "n": 1,
        "some_future_field": {"x": 1},
        "stream": False,
    }
    response = rest.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"max_tokens": 10**6}, "max_tokens"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_requests_are_400_naming_the_field(
    rest: httpx.Client, model: str, body: dict[str, Any], field: str, stream: bool
) -> None:
    payload = {"model": model, "messages": HI, "max_tokens": 2, **body, "stream": stream}
    response = rest.post("/v1/chat/completions", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]  # OpenAI's error object (docs/errors.md)
    assert error["message"].startswith(f"{field}:")
    assert (error["param"], error["type"]) == (field, "invalid_request_error")


def test_sdk_raises_bad_request_and_not_found(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=HI, temperature=9)
    assert "temperature" in str(bad.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=0, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HI)
    with pytest.raises(openai.NotFoundError):
        list(client.completions.create(model="no-such-model", prompt="x", stream=True))


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_context_is_400_with_both_counts(
    rest: httpx.Client, model: str, stream: bool
) -> None:
    response = rest.post(
        "/v1/completions", json={"model": model, "prompt": "word " * 5000, "max_tokens": 1, "stream": stream}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]  # OpenAI's error object (docs/errors.md)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    tokens, limit = (int(n) for n in re.findall(r"\b(\d+) tokens", error["message"]))
    assert tokens > limit > 0


def test_logprobs(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=HI,
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    legacy = client.completions.create(model=model, prompt="Hello", max_tokens=2, logprobs=2)
    assert legacy.choices[0].logprobs is not None
    assert len(legacy.choices[0].logprobs.tokens or []) == 2


def test_mid_stream_failure_raises_in_the_sdk(client: openai.OpenAI, model: str) -> None:
    """A stream that fails after it started (here: the caller's deadline, passed as grpc-timeout,
    runs out mid-generation) ends with an SSE error event, which the SDK raises as APIError."""
    received: list[str] = []
    with pytest.raises(openai.APIError) as err:
        for chunk in client.chat.completions.create(
            model=model,
            messages=HI,
            max_tokens=2000,
            stream=True,
            extra_body={"ignore_eos": True},
            extra_headers={"grpc-timeout": "3S"},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received, "the failure must come after the stream started"
    assert "deadline" in err.value.message
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "deadline_exceeded"


def test_each_answered_request_is_recorded_as_a_transaction(rest: httpx.Client, model: str) -> None:
    request_id = f"inference-record-{time.time_ns()}"
    body = {"model": model, "messages": HI, "max_tokens": 3, "seed": 9, "user": "u-7"}
    reply = rest.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id})
    assert reply.status_code == 200 and reply.json()["id"] == f"chatcmpl-{request_id}"
    deadline = time.monotonic() + 15
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = rest.get(f"/api/v1/transactions/{request_id}")
        if found.status_code == 200 and found.json()["status"] == "STATUS_SUCCEEDED":
            record = found.json()
            break
        time.sleep(0.2)
    assert record, "the transaction record did not arrive"
    assert record["model"] == model and record["operation"].endswith("/CreateChatCompletion")
    assert record["output"] == reply.json()["choices"][0]["message"]["content"]
    assert record["usage"]["completion_tokens"] == reply.json()["usage"]["completion_tokens"]
    assert record["messages"][0]["content"] == "Name three rivers."
    assert record["parameters"]["seed"] == 9 and record["parameters"]["user"] == "u-7"
