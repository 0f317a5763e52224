"""Wire parsing per API (pure logic): wire shapes and the engine contract's ranges, each refusal
naming the field as that API spells it, and the parsed request remembering those spellings.

Requests are built from JSON the way Envoy's transcoder builds them, so these tests also pin what
the wire accepts (`stop` as a string or a list, `content` as a string or a list of text parts).
"""

from __future__ import annotations

import contextvars
import json
from typing import Any

import grpc
import pytest
from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import json_format

from services.common.errors import RpcError
from services.common.names import REQUEST_ID_RULE
from services.inference.domain import Api, GenerationRequest, Message
from services.inference.native.generate import GenerateWire
from services.inference.native.servicer import request_id
from services.inference.openai_api.chat import ChatWire
from services.inference.openai_api.completions import CompletionWire

USER = [{"role": "user", "content": "Hi"}]


def chat(**body: Any) -> GenerationRequest:
    request = json_format.ParseDict(
        {"model": "gemma-3-270m", "messages": USER, **body},
        openai_pb2.CreateChatCompletionRequest(),
        ignore_unknown_fields=True,
    )
    return ChatWire(request, stream=bool(body.get("stream"))).parse()


def completion(**body: Any) -> GenerationRequest:
    request = json_format.ParseDict(
        {"model": "gemma-3-270m", "prompt": "Once", **body},
        openai_pb2.CreateCompletionRequest(),
        ignore_unknown_fields=True,
    )
    return CompletionWire(request, stream=bool(body.get("stream"))).parse()


def generate(**body: Any) -> GenerationRequest:
    request = json_format.ParseDict({"model": "models/gemma-3-270m", **body}, inference_pb2.GenerateRequest())
    return GenerateWire(request, stream=False).parse()


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
    assert req.sampling.to_json() == "{}"


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
    assert json.loads(req.sampling.to_json()) == {
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
    assert chat(n=1).sampling.to_json() == "{}"


def test_top_k_minus_one_is_accepted() -> None:
    # -1 (vLLM's "disabled") means the same as 0 to the engine.
    assert chat(top_k=-1).sampling.top_k == -1


# --- chat: refusals name the field -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role"),
        ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
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


def test_refusal_message_gives_the_contracts_range() -> None:
    assert refused(chat, temperature=3).message == "temperature: must be in [0, 2], got 3"
    assert refused(chat, top_p=0).message == "top_p: must be in (0, 1], got 0"
    assert refused(chat, max_tokens=0).message == "max_tokens: must be at least 1, got 0"
    assert refused(chat, stop=["a"] * 5).message == "stop: at most 4 values are allowed, got 5"


def test_every_violation_is_listed_in_the_callers_spelling() -> None:
    err = refused(generate, prompt="x", sampling={"temperature": 9, "top_p": 2, "stop": ["a", ""]})
    assert [f for f, _ in err.field_violations] == [
        "sampling.temperature",
        "sampling.top_p",
        "sampling.stop[1]",
    ]


def test_the_request_knows_how_its_caller_spells_each_field() -> None:
    assert chat().spelling.input == "messages"
    assert chat().spelling.field("top_p") == "top_p"
    assert chat(max_completion_tokens=3).spelling.field("max_tokens") == "max_completion_tokens"
    assert chat(max_tokens=3).spelling.field("max_tokens") == "max_tokens"
    assert completion().spelling.input == "prompt"
    assert completion().spelling.field("top_logprobs") == "logprobs"
    assert generate(prompt="x").spelling.input == "prompt"
    assert generate(prompt="x").spelling.field("top_p") == "sampling.top_p"
    native_chat = generate(messages={"messages": [{"role": "user", "content": "Hi"}]})
    assert native_chat.spelling.input == "messages.messages"


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
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 9}, "temperature"),
        ({"stop": ""}, "stop"),
    ],
)
def test_completion_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    assert field_of(refused(completion, **body)) == field


@pytest.mark.parametrize("logprobs", [-1, 6])
def test_completion_logprobs_outside_this_apis_range_say_its_range(logprobs: int) -> None:
    err = refused(completion, logprobs=logprobs)
    assert err.field_violations == [("logprobs", f"must be in [0, 5], got {logprobs}")]


@pytest.mark.parametrize("logprobs", [0, 5])
def test_completion_logprobs_at_the_ends_of_the_range_are_accepted(logprobs: int) -> None:
    assert completion(logprobs=logprobs).sampling.top_logprobs == logprobs


def test_completion_without_prompt_is_refused() -> None:
    request = openai_pb2.CreateCompletionRequest(model="gemma-3-270m")
    with pytest.raises(RpcError) as err:
        CompletionWire(request, stream=False).parse()
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
        ({"prompt": "x", "sampling": {"stop": ["1", ""]}}, "sampling.stop[1]"),
        ({"prompt": "x", "sampling": {"top_p": 0}}, "sampling.top_p"),
        ({"prompt": "x", "sampling": {"repetition_penalty": 3}}, "sampling.repetition_penalty"),
    ],
)
def test_native_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    assert field_of(refused(generate, **body)) == field


def test_a_native_request_id_follows_the_shared_id_rule() -> None:
    def accepted(value: str) -> str:
        return request_id(inference_pb2.GenerateRequest(request_id=value))

    # request_id() sets the request's context variable: run it in a context of its own.
    assert contextvars.copy_context().run(accepted, "trace-1:a.b_c") == "trace-1:a.b_c"
    for bad in ("has space", "x" * 129):
        with pytest.raises(RpcError) as err:
            contextvars.copy_context().run(accepted, bad)
        assert err.value.field_violations == [("request_id", f"must be {REQUEST_ID_RULE}")]


def test_only_fields_the_caller_set_reach_the_engine_so_model_defaults_apply_to_the_rest() -> None:
    # A model's default_sampling_parameters fill what the request leaves out; an explicit false or
    # empty list must still reach the backend to switch such a default off.
    assert generate(prompt="x").sampling.to_json() == "{}"
    assert completion().sampling.to_json() == "{}"
    explicit = generate(prompt="x", sampling={"logprobs": False, "ignore_eos": False, "top_logprobs": 0})
    assert json.loads(explicit.sampling.to_json()) == {
        "logprobs": False,
        "ignore_eos": False,
        "top_logprobs": 0,
    }
    assert json.loads(chat(stop=[]).sampling.to_json()) == {"stop": []}
