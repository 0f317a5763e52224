"""Clients of the real stack for the structured-output tests: the OpenAI SDK (sync and async), REST
and native gRPC, all through Envoy with the admin key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from ferry.inference.v1 import inference_pb2_grpc

# The inference tests' SDK and REST clients (session fixtures), shared rather than written again.
from tests.inference.conftest import client, rest
from tests.stack import RunningStack

__all__ = ["client", "rest"]

GEMMA = "gemma-3-270m"
SMOLLM2 = "smollm2-135m-instruct"
MODELS = (GEMMA, SMOLLM2)


@pytest.fixture
async def aclient(stack: RunningStack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0, timeout=300
    ) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def native(stack: RunningStack) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(stack.channel())
