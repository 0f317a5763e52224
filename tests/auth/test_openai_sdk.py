"""The official OpenAI SDK, unmodified, with ferry's API keys."""

from __future__ import annotations

import openai
import pytest

from services.common.tokens import new_key_secret
from tests.stack import RunningStack

pytestmark = pytest.mark.stack


def _sdk(stack: RunningStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.rest}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_sdk_works_with_a_created_inference_key(stack: RunningStack, model: str) -> None:
    with _sdk(stack, stack.create_key(["inference"], display_name="sdk")) as sdk:
        reply = sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
        assert reply.choices[0].message.content is not None
        assert model in [m.id for m in sdk.models.list()]
        streamed = list(sdk.completions.create(model=model, prompt="Hi", max_tokens=1, stream=True))
        assert streamed


def test_sdk_without_a_valid_key_gets_authentication_error(stack: RunningStack, model: str) -> None:
    # Well-formed but never issued: what a guessed or mistyped key looks like.
    unknown = new_key_secret()
    stack.issued_secrets.append(unknown)
    for api_key in (unknown, "not-a-ferry-key"):
        with _sdk(stack, api_key) as sdk:
            with pytest.raises(openai.AuthenticationError):
                sdk.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
                )
            with pytest.raises(openai.AuthenticationError):
                sdk.models.list()


def test_sdk_with_a_read_only_key_gets_permission_denied(
    stack: RunningStack, scoped_keys: dict[str, str], model: str
) -> None:
    with _sdk(stack, scoped_keys["read"]) as sdk:
        with pytest.raises(openai.PermissionDeniedError):
            sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
            )
        with pytest.raises(openai.PermissionDeniedError):
            sdk.completions.create(model=model, prompt="Hi", max_tokens=1, stream=True)
        assert model in [m.id for m in sdk.models.list()]  # listing models is a read
