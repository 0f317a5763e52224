"""Per-key rate limits: requests per minute, counted once per call in the gateway whatever Envoy
worker or service port the call came through; generated tokens per minute on inference."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from ferry.models.v1 import models_pb2, models_pb2_grpc

from services.common.errors import error_details
from tests.auth.rpcs import refused_generate
from tests.stack import RunningStack, bearer, keyed_channel

pytestmark = pytest.mark.stack

LIMIT = 6


def _worker_connections(stack: RunningStack) -> dict[str, int]:
    """Connections each Envoy worker accepted on the main listener so far."""
    stats = httpx.get(f"{stack.envoy_admin}/stats", params={"filter": "downstream_cx_total"}, timeout=5).text
    port = stack.settings.envoy.port
    out = {}
    for line in stats.splitlines():
        found = re.match(rf"listener\.[\d.]+_{port}\.(worker_\d+)\.downstream_cx_total: (\d+)", line)
        if found:
            out[found.group(1)] = int(found.group(2))
    return out


def test_requests_per_minute_hold_across_envoy_workers_and_connections(stack: RunningStack) -> None:
    key = stack.create_key(["read"], display_name="rpm", requests_per_minute=LIMIT)
    before = _worker_connections(stack)

    def one_call(_: int) -> tuple[int, str | None]:
        # A connection per call, so that Envoy spreads them over its workers.
        with httpx.Client(base_url=stack.rest, headers=bearer(key), timeout=30) as http:
            reply = http.get("/api/v1/models")
            return reply.status_code, reply.headers.get("retry-after")

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(one_call, range(4 * LIMIT)))

    statuses = sorted(status for status, _ in outcomes)
    assert statuses == [200] * LIMIT + [429] * (3 * LIMIT), statuses
    assert all(int(after or 0) >= 1 for status, after in outcomes if status == 429)
    # Every worker took some of these connections: the count is not per worker.
    grew = {w: n - before.get(w, 0) for w, n in _worker_connections(stack).items()}
    assert len(grew) >= 2 and all(n > 0 for n in grew.values()), grew


def test_requests_per_minute_on_grpc_is_resource_exhausted_with_retry_info(stack: RunningStack) -> None:
    key = stack.create_key(["read"], display_name="rpm-grpc", requests_per_minute=LIMIT)
    request = models_pb2.ListModelsRequest()
    with (
        keyed_channel(stack.grpc_target, key) as edge,
        keyed_channel(stack.service_targets["models"], key) as port,
    ):
        # Half through Envoy, half on the service port: one count.
        for i in range(LIMIT):
            models_pb2_grpc.ModelsServiceStub(edge if i % 2 else port).ListModels(request, timeout=10)
        for channel in (edge, port):
            with pytest.raises(grpc.RpcError) as err:
                models_pb2_grpc.ModelsServiceStub(channel).ListModels(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry = error_details(err.value)["RetryInfo"].retry_delay  # type: ignore[attr-defined]
            assert retry.seconds >= 1
            assert int(dict(err.value.trailing_metadata() or ())["retry-after"]) >= 1


def test_tokens_per_minute_refuse_inference_once_spent(stack: RunningStack, model: str) -> None:
    key = stack.create_key(["inference"], display_name="tpm", tokens_per_minute=3)
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}
    with stack.http(key) as http:
        first = http.post("/v1/completions", json=body)
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 4
        # The service reports the tokens after answering: the next call is refused soon after.
        deadline = time.monotonic() + 5
        while (refused := http.post("/v1/completions", json=body)).status_code == 200:
            assert time.monotonic() < deadline, "the token limit was not applied"
            time.sleep(0.1)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert http.get("/v1/models").status_code == 200  # listing generates nothing
    err = refused_generate(stack.service_targets["inference"], key, model, "Hi", max_tokens=1)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(err)["RetryInfo"].retry_delay.seconds >= 1  # type: ignore[attr-defined]
