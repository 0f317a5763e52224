"""Per-key and global input limits (issue #5): the tighter one applies, and a larger ask is refused
naming the field, before anything reaches the engine."""

from __future__ import annotations

import grpc
import pytest
from ferry.auth.v1.auth_pb2 import Limits, Principal

from services.common.config import InferenceSettings
from services.common.errors import RpcError
from services.inference.validation import apply_caller_limits
from tests.inference.test_validation import chat, completion, generate


def key(**limits: int) -> Principal:
    return Principal(name="keys/k1", scopes=["inference"], limits=Limits(**limits))


def test_no_limits_leave_the_request_alone() -> None:
    request = chat(max_tokens=50)
    assert apply_caller_limits(request, InferenceSettings(), key()) is request
    assert apply_caller_limits(request, InferenceSettings(), None) is request


@pytest.mark.parametrize(
    ("build", "field"),
    [(chat, "max_tokens"), (completion, "max_tokens"), (generate, "sampling.max_tokens")],
)
def test_max_tokens_above_the_key_limit_is_refused_naming_the_field(build: object, field: str) -> None:
    body: dict[str, object] = {"max_tokens": 200}
    if build is generate:
        body = {"prompt": "Once", "sampling": {"max_tokens": 200}}
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
    assert limited.sampling.as_dict()["max_prompt_tokens"] == 20
