"""The policy (pure logic): per-key and global input limits (the tighter one applies, a larger ask is
refused naming the field as the caller spelled it) and the model's own limits, before anything reaches
the engine."""

from __future__ import annotations

import grpc
import pytest
from ferry.auth.v1.auth_pb2 import Limits, Principal

from services.common.config import InferenceSettings
from services.common.errors import RpcError
from services.common.triton_client import ALL_CAPABILITIES, ModelInfo
from services.inference.domain import GenerationRequest
from services.inference.policy import admissible, apply_caller_limits, check_against_model
from tests.inference.test_wire_parsing import chat, completion, generate


def key(**limits: int) -> Principal:
    return Principal(name="keys/k1", scopes=["inference"], limits=Limits(**limits))


def test_no_limits_leave_the_request_alone() -> None:
    request = chat(max_tokens=50)
    assert apply_caller_limits(request, InferenceSettings(), key()) is request
    assert apply_caller_limits(request, InferenceSettings(), None) is request


@pytest.mark.parametrize(
    ("build", "body", "field"),
    [
        (chat, {"max_tokens": 200}, "max_tokens"),
        (chat, {"max_completion_tokens": 200}, "max_completion_tokens"),
        (completion, {"max_tokens": 200}, "max_tokens"),
        (generate, {"prompt": "Once", "sampling": {"max_tokens": 200}}, "sampling.max_tokens"),
    ],
)
def test_max_tokens_above_the_key_limit_is_refused_naming_the_field(
    build: object, body: dict[str, object], field: str
) -> None:
    request = build(**body)  # type: ignore[operator]
    with pytest.raises(RpcError) as err:
        apply_caller_limits(request, InferenceSettings(), key(max_tokens=100))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field_violations[0][0] == field
    assert "at most 100" in err.value.message


def test_the_tighter_of_global_and_key_limits_applies() -> None:
    settings = InferenceSettings(max_tokens=64)
    with pytest.raises(RpcError):
        apply_caller_limits(chat(max_tokens=65), settings, key(max_tokens=1000))
    with pytest.raises(RpcError):
        apply_caller_limits(chat(max_tokens=33), settings, key(max_tokens=32))
    assert apply_caller_limits(chat(max_tokens=32), settings, key(max_tokens=32)).sampling.max_tokens == 32


def test_an_omitted_max_tokens_becomes_the_limit() -> None:
    limited = apply_caller_limits(chat(), InferenceSettings(), key(max_tokens=16))
    assert limited.sampling.max_tokens == 16


def test_the_prompt_limit_travels_to_the_model() -> None:
    limited = apply_caller_limits(
        completion(), InferenceSettings(max_prompt_tokens=500), key(max_prompt_tokens=20)
    )
    assert limited.sampling.max_prompt_tokens == 20
    assert '"max_prompt_tokens":20' in limited.sampling.to_json()


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


def test_max_tokens_above_the_model_limit_is_refused_naming_the_field() -> None:
    check_against_model(chat(max_tokens=1024), MODEL)
    with pytest.raises(RpcError) as err:
        check_against_model(chat(max_tokens=1025), MODEL)
    assert err.value.field_violations[0][0] == "max_tokens" and "1024" in err.value.message
    with pytest.raises(RpcError) as err:
        check_against_model(generate(prompt="x", sampling={"max_tokens": 1025}), MODEL)
    assert err.value.field_violations[0][0] == "sampling.max_tokens"


def test_messages_need_a_model_with_a_chat_template() -> None:
    no_template = ModelInfo(**{**MODEL.__dict__, "chat_template": ""})
    with pytest.raises(RpcError) as err:
        check_against_model(chat(), no_template)
    assert err.value.field_violations[0][0] == "messages"
    with pytest.raises(RpcError) as err:
        check_against_model(generate(messages={"messages": [{"role": "user", "content": "x"}]}), no_template)
    assert err.value.field_violations[0][0] == "messages.messages"
    check_against_model(completion(), no_template)


def test_admissible_applies_the_model_then_the_caller() -> None:
    assert admissible(chat(), MODEL, InferenceSettings(), key(max_tokens=8)).sampling.max_tokens == 8
    with pytest.raises(RpcError) as err:
        admissible(chat(max_tokens=2000), MODEL, InferenceSettings(), key(max_tokens=4000))
    assert "for model" in err.value.message


# --- the model's capabilities ---------------------------------------------------------------------------


def capable_of(*capabilities: str) -> ModelInfo:
    return ModelInfo(**{**MODEL.__dict__, "capabilities": frozenset(capabilities)})


USER = {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    ("request_", "model", "field"),
    [
        (chat(), capable_of("completion", "logprobs"), "messages"),
        (generate(messages=USER), capable_of("completion", "logprobs"), "messages.messages"),
        (completion(), capable_of("chat", "logprobs"), "prompt"),
        (generate(prompt="Once"), capable_of("chat", "logprobs"), "prompt"),
        (chat(logprobs=True), capable_of("chat", "completion"), "logprobs"),
        (completion(logprobs=0), capable_of("chat", "completion"), "logprobs"),
        (generate(prompt="x", sampling={"logprobs": True}), capable_of("completion"), "sampling.logprobs"),
    ],
)
def test_a_request_the_model_is_not_capable_of_is_refused_naming_the_field(
    request_: GenerationRequest, model: ModelInfo, field: str
) -> None:
    with pytest.raises(RpcError) as err:
        check_against_model(request_, model)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.reason == "MODEL_CAPABILITY_MISSING" and err.value.openai_type == "invalid_request_error"
    assert err.value.field_violations[0][0] == field
    assert err.value.metadata["model"] == "gemma-3-270m"
    assert "does not support" in err.value.message


def test_what_the_model_is_capable_of_passes() -> None:
    check_against_model(chat(logprobs=True, top_logprobs=2), capable_of("chat", "logprobs"))
    check_against_model(completion(), capable_of("completion"))
    check_against_model(generate(messages=USER), capable_of("chat"))
    # A model whose config declares no capabilities can do everything.
    assert MODEL.capabilities == ALL_CAPABILITIES == {"completion", "chat", "logprobs"}
    check_against_model(completion(logprobs=5), MODEL)


def test_a_capability_refusal_comes_before_the_callers_limits() -> None:
    with pytest.raises(RpcError) as err:
        admissible(chat(max_tokens=50), capable_of("completion"), InferenceSettings(), key(max_tokens=8))
    assert err.value.reason == "MODEL_CAPABILITY_MISSING"
