"""Clients of the real stack for the inference tests: the OpenAI SDK, REST, native gRPC, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from ferry.inference.v1 import inference_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import RunningStack


@pytest.fixture(scope="session")
def model(stack: RunningStack) -> str:
    return stack.settings.triton.default_model


@pytest.fixture(scope="session")
def client(stack: RunningStack) -> Iterator[openai.OpenAI]:
    """The official SDK, unmodified, pointed at Envoy with the admin key. No retries: the tests look
    at each answer."""
    with openai.OpenAI(
        base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0, timeout=60
    ) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def rest(stack: RunningStack) -> Iterator[httpx.Client]:
    with stack.http() as http:
        yield http


@pytest.fixture
async def arest(stack: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    async with stack.async_http(limits=limits) as http:
        yield http


@pytest.fixture(scope="session", params=["envoy", "service"])
def native(request: pytest.FixtureRequest, stack: RunningStack) -> inference_pb2_grpc.InferenceServiceStub:
    """The native stub through Envoy's listener and on the service's own port (admin key)."""
    target = stack.grpc_target if request.param == "envoy" else stack.service_targets["inference"]
    return inference_pb2_grpc.InferenceServiceStub(stack.channel(target))


@pytest.fixture
async def anative(stack: RunningStack) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with stack.aio_channel(stack.service_targets["inference"]) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


class Metrics:
    """Samples of the inference service's /metrics, read fresh on each call."""

    def __init__(self, url: str) -> None:
        self.url = url

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(self.url, timeout=5).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        total = 0.0
        for (sample, sample_labels), value in self.samples().items():
            if sample == name and set(labels.items()) <= set(sample_labels):
                total += value
        return total


@pytest.fixture(scope="session")
def metrics(stack: RunningStack) -> Metrics:
    return Metrics(stack.metrics_urls["inference"])
