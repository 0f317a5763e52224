"""Clients of the real stack for the OpenAI wire tests: raw REST (to see the bytes) and the SDK."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.stack import RunningStack


@pytest.fixture(scope="session")
def model(stack: RunningStack) -> str:
    return stack.settings.triton.default_model


@pytest.fixture(scope="session")
def rest(stack: RunningStack) -> Iterator[httpx.Client]:
    with stack.http() as http:
        yield http


@pytest.fixture(scope="session")
def sdk(stack: RunningStack) -> Iterator[openai.OpenAI]:
    """The official SDK, unmodified, with the admin key; no retries, so each answer is seen."""
    with openai.OpenAI(
        base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0, timeout=60
    ) as client:
        yield client
