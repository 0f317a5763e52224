"""Request validation (pure logic): OpenAI's ranges and wire shapes, each refusal naming its field.

Requests are built from JSON the way Envoy's transcoder builds them, so these tests also pin what
the wire accepts (`stop` as a string or a list, `content` as a string or a list of text parts).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import json_format

from services.common.errors import RpcError
from services.common.triton import ModelInfo
from services.inference import validation
from services.inference.generation import Api, GenerationRequest, Message

USER = [{"role": "user", "content": "Hi"}]


def chat(**body: Any) -> GenerationRequest:
    request = json_format.ParseDict(
        {"model": "gemma-3-270m", "messages": USER, **body},
        openai_pb2.CreateChatCompletionRequest(),
        ignore_unknown_fields=True,
    )
    return validation.chat_request(request, stream=bool(body.get("stream")))


def completion(**body: Any) -> GenerationRequest:
    request = json_format.ParseDict(
        {"model": "gemma-3-270m", "prompt": "Once", **body},
        openai_pb2.CreateCompletionRequest(),
        ignore_unknown_fields=True,
    )
    return validation.completion_request(request, stream=bool(body.get("stream")))


def generate(**body: Any) -> GenerationRequest:
    request = json_format.ParseDict({"model": "models/gemma-3-270m", **body}, inference_pb2.GenerateRequest())
    return validation.generate_request(request, stream=False)


def refused(call: Any, **body: Any) -> RpcError:
    with pytest.raises(RpcError) as err:
        call(**body)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value


def field_of(err: RpcError) -> str:
    assert err.field_violations, err.message
    return err.field_violations[0][0]


# --- chat: accepted shapes -------------------------------------------------------------------------


def test_minimal_chat_request_leaves_engine_defaults() -> None:
    req = chat()
    assert req.api is Api.CHAT
    assert req.messages == (Message("user", "Hi"),)
    assert req.sampling.as_dict() == {}


def test_content_as_list_of_text_parts_is_joined() -> None:
    req = chat(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert req.messages == (Message("user", "a\nb"),)


def test_developer_role_is_treated_as_system() -> None:
    req = chat(messages=[{"role": "developer", "content": "Be brief."}, *USER])
    assert req.messages is not None and req.messages[0].role == "system"


def test_assistant_turn_may_have_null_content() -> None:
    req = chat(messages=[*USER, {"role": "assistant", "content": None}, *USER])
    assert req.messages is not None and req.messages[1] == Message("assistant", "")


@pytest.mark.parametrize(("stop", "expected"), [("END", ("END",)), (["a", "b"], ("a", "b")), (None, ())])
def test_stop_is_a_string_or_a_list(stop: Any, expected: tuple[str, ...]) -> None:
    assert chat(stop=stop).sampling.stop == expected


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5, max_completion_tokens=7).sampling.max_tokens == 7
    assert chat(max_tokens=5).sampling.max_tokens == 5


def test_all_sampling_fields_reach_the_engine_parameters() -> None:
    req = chat(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        max_tokens=12,
        stop=["\n"],
        seed=7,
        frequency_penalty=0.1,
        presence_penalty=-0.1,
        repetition_penalty=1.1,
        logprobs=True,
        top_logprobs=3,
        ignore_eos=True,
    )
    assert req.sampling.as_dict() == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "max_tokens": 12,
        "stop": ["\n"],
        "seed": 7,
        "frequency_penalty": 0.1,
        "presence_penalty": -0.1,
        "repetition_penalty": 1.1,
        "logprobs": True,
        "top_logprobs": 3,
        "ignore_eos": True,
    }


def test_stream_options_and_user_and_unknown_fields_are_accepted() -> None:
    req = chat(stream=True, stream_options={"include_usage": True}, user="u-1", tools_future_field=1)
    assert req.include_usage and req.user == "u-1"


def test_n_of_one_is_accepted() -> None:
    assert chat(n=1).sampling.as_dict() == {}


def test_top_k_minus_one_means_disabled() -> None:
    assert chat(top_k=-1).sampling.top_k == 0


# --- chat: refusals name the field -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role"),
        ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"model": ""}, "model"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 2}, "n"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", ""]}, "stop[1]"),
        ({"stop": [1]}, "stop[0]"),
        ({"stop": 5}, "stop"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_chat_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    err = refused(chat, **body)
    assert field_of(err) == field
    assert err.message.startswith(field)


def test_refusal_message_gives_the_range() -> None:
    err = refused(chat, temperature=3)
    assert "[0, 2]" in err.message and "3" in err.message


# --- completions -------------------------------------------------------------------------------------


def test_completion_prompt_string_or_single_item_list() -> None:
    assert completion().prompt == "Once"
    assert completion(prompt=["Twice"]).prompt == "Twice"


def test_completion_logprobs_integer_means_top_alternatives() -> None:
    sampling = completion(logprobs=2).sampling
    assert sampling.logprobs and sampling.top_logprobs == 2
    assert not completion().sampling.logprobs


def test_completion_echo_is_kept() -> None:
    assert completion(echo=True).echo


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [[1, 2, 3]]}, "prompt[0]"),
        ({"prompt": None}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
        ({"n": 3}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "tail"}, "suffix"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 9}, "temperature"),
    ],
)
def test_completion_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    assert field_of(refused(completion, **body)) == field


def test_completion_without_prompt_is_refused() -> None:
    request = openai_pb2.CreateCompletionRequest(model="gemma-3-270m")
    with pytest.raises(RpcError) as err:
        validation.completion_request(request, stream=False)
    assert field_of(err.value) == "prompt"


# --- native --------------------------------------------------------------------------------------------


def test_native_prompt_and_model_name() -> None:
    req = generate(prompt="Hello", sampling={"max_tokens": 3, "stop": ["."]})
    assert (req.model, req.prompt, req.sampling.max_tokens, req.sampling.stop) == (
        "gemma-3-270m",
        "Hello",
        3,
        (".",),
    )


def test_native_messages() -> None:
    req = generate(messages={"messages": [{"role": "user", "content": "Hi"}]})
    assert req.messages == (Message("user", "Hi"),)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"model": "", "prompt": "x"}, "model"),
        ({"model": "models/", "prompt": "x"}, "model"),
        ({"model": "transactions/a/b", "prompt": "x"}, "model"),
        ({"messages": {"messages": []}}, "messages.messages"),
        ({"messages": {"messages": [{"role": "bot", "content": "x"}]}}, "messages.messages[0].role"),
        ({"prompt": "x", "sampling": {"temperature": 2.5}}, "sampling.temperature"),
        ({"prompt": "x", "sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"prompt": "x", "sampling": {"top_logprobs": 3}}, "sampling.top_logprobs"),
        ({"prompt": "x", "sampling": {"stop": ["1", "2", "3", "4", "5"]}}, "sampling.stop"),
    ],
)
def test_native_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    assert field_of(refused(generate, **body)) == field


# --- limits from the model's metadata -------------------------------------------------------------------

MODEL = ModelInfo(
    name="gemma-3-270m",
    backend="python",
    context_length=4096,
    max_tokens=1024,
    owned_by="ferry",
    chat_template="{{ messages }}",
    engine_slots=4,
)


def test_max_tokens_above_the_model_limit_is_refused() -> None:
    validation.check_against_model(chat(max_tokens=1024), MODEL)
    with pytest.raises(RpcError) as err:
        validation.check_against_model(chat(max_tokens=1025), MODEL)
    assert field_of(err.value) == "max_tokens" and "1024" in err.value.message


def test_messages_need_a_model_with_a_chat_template() -> None:
    no_template = ModelInfo(**{**MODEL.__dict__, "chat_template": ""})
    with pytest.raises(RpcError) as err:
        validation.check_against_model(chat(), no_template)
    assert field_of(err.value) == "messages"
