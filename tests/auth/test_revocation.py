"""Revoked and expired keys stop working within `auth.cache_seconds` on REST and on service ports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc

from tests.stack import RunningStack, keyed_channel

pytestmark = pytest.mark.stack

# Time to notice, on top of the documented bound: polling and a loaded machine.
SLACK_SECONDS = 1.0


Probes = tuple[Callable[[], int], Callable[[], grpc.StatusCode]]


@contextmanager
def _probes(stack: RunningStack, secret: str) -> Iterator[Probes]:
    """A REST and a direct-gRPC call with `secret` (model listing: cheap, needs `inference`)."""
    http = stack.http(secret)
    channel = keyed_channel(stack.service_targets["inference"], secret)
    stub = openai_pb2_grpc.OpenAIServiceStub(channel)

    def rest() -> int:
        return http.get("/v1/models").status_code

    def native() -> grpc.StatusCode:
        try:
            stub.ListModels(openai_pb2.ListModelsRequest(), timeout=10)
        except grpc.RpcError as err:
            code: grpc.StatusCode = err.code()
            return code
        return grpc.StatusCode.OK

    with http, channel:
        yield rest, native


def _seconds_until_refused(rest: Callable[[], int], native: Callable[[], grpc.StatusCode]) -> float:
    started = time.monotonic()
    while True:
        if rest() == 401 and native() == grpc.StatusCode.UNAUTHENTICATED:
            return time.monotonic() - started
        assert time.monotonic() - started < 30, "the key still works after 30 s"
        time.sleep(0.05)


def test_a_revoked_key_is_refused_within_cache_seconds(stack: RunningStack) -> None:
    key = stack.new_key(["inference"], display_name="revoke-me")
    with _probes(stack, key.secret) as (rest, native):
        assert (rest(), native()) == (200, grpc.StatusCode.OK)
        stack.revoke_key(key.name)
        waited = _seconds_until_refused(rest, native)
    assert waited <= stack.settings.auth.cache_seconds + SLACK_SECONDS, f"refused after {waited:.1f} s"


def test_an_expired_key_is_refused(stack: RunningStack) -> None:
    key = stack.new_key(["inference"], display_name="short-lived", ttl_seconds=2)
    with _probes(stack, key.secret) as (rest, native):
        assert (rest(), native()) == (200, grpc.StatusCode.OK)
        time.sleep(max(0.0, key.expire_time.ToNanoseconds() / 1e9 - time.time()))
        waited = _seconds_until_refused(rest, native)
    assert waited <= stack.settings.auth.cache_seconds + SLACK_SECONDS, f"refused {waited:.1f} s late"
