"""Input limits: a key's max_tokens and max_prompt_tokens refused naming the field; Envoy refuses
bodies above envoy.max_request_bytes."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import error_details
from tests.auth.rpcs import refused_generate
from tests.stack import RunningStack

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
    err = refused_generate(stack.service_targets["inference"], key, model, "Hi", max_tokens=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(err) == ["sampling.max_tokens"]


def test_prompt_above_the_key_limit_is_refused_naming_the_field(stack: RunningStack, model: str) -> None:
    key = stack.create_key(["inference"], display_name="max-prompt", max_prompt_tokens=8)
    with stack.http(key) as http:
        refused = http.post("/v1/completions", json={"model": model, "prompt": LONG_PROMPT, "max_tokens": 1})
        assert refused.status_code == 400, refused.text
        assert "max_prompt_tokens" in refused.json()["error"]["message"]
        assert (
            http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}).status_code
            == 200
        )
    err = refused_generate(stack.service_targets["inference"], key, model, LONG_PROMPT, max_tokens=1)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(err) == ["prompt"]


def test_a_body_above_the_edge_limit_is_413(stack: RunningStack, model: str) -> None:
    too_big = "x" * (stack.settings.envoy.max_request_bytes + 1024)
    with stack.http() as http:
        reply = http.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": too_big}]}
        )
    assert reply.status_code == 413, reply.text[:200]
