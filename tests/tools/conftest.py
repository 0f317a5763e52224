"""Clients of the real stack for the tool-calling tests."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.stack import RunningStack


@pytest.fixture(scope="session")
def client(stack: RunningStack) -> Iterator[openai.OpenAI]:
    """The official SDK, unmodified, pointed at Envoy with the admin key (no retries: each answer counts)."""
    with openai.OpenAI(
        base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0, timeout=120
    ) as sdk:
        yield sdk
