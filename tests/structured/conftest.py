"""Clients of the real stack for the structured-output tests: the OpenAI SDK (sync and async),
REST and native gRPC, all through Envoy with the admin key."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from ferry.inference.v1 import inference_pb2_grpc

from tests.stack import RunningStack

GEMMA = "gemma-3-270m"
SMOLLM2 = "smollm2-135m-instruct"
MODELS = (GEMMA, SMOLLM2)


@pytest.fixture(scope="session")
def client(stack: RunningStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0, timeout=120
    ) as sdk:
        yield sdk


@pytest.fixture
async def aclient(stack: RunningStack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0, timeout=300
    ) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def rest(stack: RunningStack) -> Iterator[httpx.Client]:
    with stack.http() as http:
        yield http


@pytest.fixture(scope="session")
def native(stack: RunningStack) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(stack.channel())
