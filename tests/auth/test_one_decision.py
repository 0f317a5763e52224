"""One authorization decision per request: through Envoy the edge check decides (and counts) and the
service trusts the Principal it forwards; on a service port the service asks the gateway. A caller
cannot forge the forwarded Principal on either path."""

from __future__ import annotations

import base64

import grpc
import httpx
import pytest
from ferry.auth.v1 import auth_pb2
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc

from tests.stack import RunningStack, keyed_channel

pytestmark = pytest.mark.stack

FORGED = base64.urlsafe_b64encode(
    auth_pb2.Principal(name="keys/forged", scopes=["inference", "read", "admin"]).SerializeToString()
).decode()


def gateway_calls(stack: RunningStack, method: str) -> float:
    """ferry_grpc_server_handled_total of the gateway for `method`, all codes."""
    text = httpx.get(stack.metrics_urls["gateway"], timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ferry_grpc_server_handled_total{") and f'method="{method}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_through_envoy_the_gateway_is_asked_once(stack: RunningStack) -> None:
    key = stack.create_key(["inference"])
    before = gateway_calls(stack, "Check"), gateway_calls(stack, "Authorize")
    with stack.http(key) as http:
        for _ in range(3):
            assert http.get("/v1/models").status_code == 200
    after = gateway_calls(stack, "Check"), gateway_calls(stack, "Authorize")
    # The edge check, at most once per request (its lease admits what follows: test_edge_lease.py).
    assert 1 <= after[0] - before[0] <= 3
    assert after[1] == before[1]  # the service did not ask again


def test_on_a_service_port_the_service_asks_the_gateway(stack: RunningStack) -> None:
    key = stack.create_key(["inference"])
    before = gateway_calls(stack, "Authorize")
    with keyed_channel(stack.service_targets["inference"], key) as channel:
        openai_pb2_grpc.OpenAIServiceStub(channel).ListModels(openai_pb2.ListModelsRequest(), timeout=10)
    assert gateway_calls(stack, "Authorize") - before == 1


def test_a_forged_principal_gets_nowhere(stack: RunningStack) -> None:
    # Through Envoy: stripped before the edge check, which then finds no key.
    with stack.http() as http:
        refused = http.get("/v1/models", headers={"authorization": "", "x-ferry-principal": FORGED})
    assert refused.status_code == 401
    # On the service port: without Envoy's service token the header is ignored.
    stub = openai_pb2_grpc.OpenAIServiceStub(stack.raw_channel(stack.service_targets["inference"]))
    for edge in ("", "Bearer not-the-service-token"):
        metadata = [("x-ferry-principal", FORGED)] + ([("x-ferry-edge", edge)] if edge else [])
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(openai_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
