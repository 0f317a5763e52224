"""Input limits: a key's max_tokens and max_prompt_tokens refused naming the field; Envoy refuses
bodies above envoy.max_request_bytes."""

from __future__ import annotations

import grpc
import pytest
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.errors import error_details
from tests.stack import RunningStack, keyed_channel

pytestmark = pytest.mark.stack

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


def _violations(err: grpc.RpcError) -> list[str]:
    return [v.field for v in error_details(err)["BadRequest"].field_violations]  # type: ignore[attr-defined]


def test_max_tokens_above_the_key_limit_is_refused_naming_the_field(stack: RunningStack, model: str) -> None:
    key = stack.create_key(["inference"], display_name="max-tokens", max_tokens=2)
    with stack.http(key) as http:
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        refused = http.post("/v1/chat/completions", json={**chat, "max_tokens": 5})
        assert refused.status_code == 400 and "max_tokens" in refused.text, refused.text
        allowed = http.post("/v1/chat/completions", json={**chat, "max_tokens": 2})
        assert allowed.status_code == 200, allowed.text
    with keyed_channel(stack.service_targets["inference"], key) as channel:
        with pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                inference_pb2.GenerateRequest(
                    model=f"models/{model}", prompt="Hi", sampling=inference_pb2.SamplingParams(max_tokens=5)
                ),
                timeout=30,
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(err.value) == ["sampling.max_tokens"]


def test_prompt_above_the_key_limit_is_refused_naming_the_field(stack: RunningStack, model: str) -> None:
    key = stack.create_key(["inference"], display_name="max-prompt", max_prompt_tokens=8)
    with stack.http(key) as http:
        refused = http.post("/v1/completions", json={"model": model, "prompt": LONG_PROMPT, "max_tokens": 1})
        assert refused.status_code == 400, refused.text
        assert "max_prompt_tokens" in refused.json()["message"]
        assert (
            http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}).status_code
            == 200
        )
    with keyed_channel(stack.service_targets["inference"], key) as channel:
        with pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                inference_pb2.GenerateRequest(
                    model=f"models/{model}",
                    prompt=LONG_PROMPT,
                    sampling=inference_pb2.SamplingParams(max_tokens=1),
                ),
                timeout=30,
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(err.value) == ["prompt"]


def test_a_body_above_the_edge_limit_is_413(stack: RunningStack, model: str) -> None:
    too_big = "x" * (stack.settings.envoy.max_request_bytes + 1024)
    with stack.http() as http:
        reply = http.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": too_big}]}
        )
    assert reply.status_code == 413, reply.text[:200]
