"""Every public RPC of every service, on REST via Envoy, native gRPC via Envoy and gRPC on the
service's own port: no key is 401 / UNAUTHENTICATED, a key without the scope 403 / PERMISSION_DENIED,
a key with it succeeds. Internal RPCs are refused at the edge and to every key on the service port.
Health answers without a key."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.access import INTERNAL, KEY_SCOPES
from tests.auth.rpcs import (
    REQUESTS,
    SERVED_BY,
    Rpc,
    Subjects,
    all_rpcs,
    empty_request,
    grpc_code,
    internal_rpcs,
    public_rpcs,
    rest_status,
)
from tests.stack import PROCESSES, RunningStack, bearer, keyed_channel

pytestmark = pytest.mark.stack

UNLOAD = "/ferry.models.v1.ModelsService/UnloadModel"
LOAD = "/ferry.models.v1.ModelsService/LoadModel"


def test_every_public_rpc_has_a_minimal_request_and_a_process() -> None:
    assert sorted(REQUESTS) == sorted(rpc.path for rpc in public_rpcs())
    assert {rpc.service for rpc in all_rpcs()} == set(SERVED_BY)
    for rpc in public_rpcs():
        assert INTERNAL not in rpc.scopes, f"{rpc} has a REST mapping but is internal"
        assert rpc.scopes & set(KEY_SCOPES), f"{rpc}: no key scope grants it"
    for rpc in internal_rpcs():
        assert rpc.scopes == {INTERNAL}, f"{rpc} has no REST mapping but is not internal"


def _keys(rpc: Rpc, scoped_keys: dict[str, str]) -> tuple[str, str]:
    """A key with one of the method's scopes, and one without any of them."""
    right = sorted(rpc.scopes & set(KEY_SCOPES))[0]
    wrong = sorted(set(KEY_SCOPES) - rpc.scopes)[0]
    return scoped_keys[right], scoped_keys[wrong]


def _reload(stack: RunningStack, loaded: Callable[[], bool]) -> None:
    """After a successful UnloadModel: load the model again and wait until inference serves it."""
    assert loaded(), "loading the model again failed"
    stack.wait_serving("inference", timeout=90)


PATHS = ("rest", "envoy-grpc", "service-grpc")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rpc", public_rpcs(), ids=str)
def test_public_rpc_needs_a_key_with_its_scope(
    stack: RunningStack, scoped_keys: dict[str, str], subjects: Subjects, rpc: Rpc, path: str
) -> None:
    request = REQUESTS[rpc.path](subjects)
    right, wrong = _keys(rpc, scoped_keys)
    if path == "rest":
        with httpx.Client(base_url=stack.rest, timeout=60) as http:
            outcomes = [rest_status(http, rpc, request, headers) for headers in ({}, bearer(wrong))]
            assert outcomes == [401, 403], f"{rpc} over REST: no key, wrong scope"
            assert rest_status(http, rpc, request, bearer(right)) == 200, f"{rpc} over REST, right key"
            if rpc.path == UNLOAD:
                load = REQUESTS[LOAD](subjects)
                _reload(
                    stack, lambda: rest_status(http, _rpc(LOAD), load, bearer(scoped_keys["admin"])) == 200
                )
        return

    target = stack.grpc_target if path == "envoy-grpc" else stack.service_targets[SERVED_BY[rpc.service]]
    codes = [grpc_code(stack.raw_channel(target), rpc, request)]
    for key in (wrong, right):
        with keyed_channel(target, key) as channel:
            codes.append(grpc_code(channel, rpc, request))
    assert codes == [
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OK,
    ], f"{rpc} on {path}: no key, wrong scope, right key"
    if rpc.path == UNLOAD:
        with keyed_channel(target, scoped_keys["admin"]) as channel:
            load = REQUESTS[LOAD](subjects)
            _reload(stack, lambda: grpc_code(channel, _rpc(LOAD), load) == grpc.StatusCode.OK)


def _rpc(path: str) -> Rpc:
    return next(rpc for rpc in all_rpcs() if rpc.path == path)


@pytest.mark.parametrize("rpc", internal_rpcs(), ids=str)
def test_internal_rpc_is_refused_at_the_edge_and_to_every_key(stack: RunningStack, rpc: Rpc) -> None:
    request = empty_request(rpc)
    # Through Envoy: refused whoever asks (only ferry's processes call it, on the service port).
    assert grpc_code(stack.channel(), rpc, request) == grpc.StatusCode.PERMISSION_DENIED
    # On the service port: even the admin key lacks the internal scope; no key is no caller.
    target = stack.service_targets[SERVED_BY[rpc.service]]
    assert grpc_code(stack.channel(target), rpc, request) == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_code(stack.raw_channel(target), rpc, request) in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_health_endpoints_answer_without_a_key(stack: RunningStack) -> None:
    assert httpx.get(f"{stack.rest}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{stack.rest}/readyz", timeout=5).status_code == 200
    for name in PROCESSES:
        health = health_pb2_grpc.HealthStub(stack.raw_channel(stack.service_targets[name]))
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
