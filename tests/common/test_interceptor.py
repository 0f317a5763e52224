"""The shared serving interceptor: request ids and rich errors reach the caller (in-process server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common.errors import RpcError, error_details, invalid_argument
from services.common.interceptor import Lifecycle, ServingInterceptor

METHOD = "/test.Echo/Call"


async def _behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"bad":
        raise invalid_argument("prompt", "must not be empty")
    if request == b"crash":
        raise RuntimeError("boom")
    return request


async def _pieces(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield request
    if request == b"bad":
        raise invalid_argument("prompt", "must not be empty")
    yield request


async def _echo_all(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[ServingInterceptor(Lifecycle())])
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Call": grpc.unary_unary_rpc_method_handler(_behaviour),
            "Stream": grpc.unary_stream_rpc_method_handler(_pieces),
            "Chat": grpc.stream_stream_rpc_method_handler(_echo_all),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def _call(target: str, body: bytes, request_id: str) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)(body, metadata=[("x-request-id", request_id)])
        try:
            await call
        except grpc.aio.AioRpcError as err:
            return err, dict(err.trailing_metadata() or ())
        return None, dict(await call.trailing_metadata() or ())


@pytest.mark.parametrize("body", [b"ok", b"bad", b"crash"])
async def test_request_id_is_returned_on_success_and_on_errors(target: str, body: bytes) -> None:
    _, trailers = await _call(target, body, "client-id-1")
    assert trailers.get("x-request-id") == "client-id-1"


async def test_validation_error_carries_field_violation(target: str) -> None:
    err, _ = await _call(target, b"bad", "client-id-2")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(err)
    assert details["BadRequest"].field_violations[0].field == "prompt"  # type: ignore[attr-defined]
    assert details["ErrorInfo"].domain == "ferry.dev"  # type: ignore[attr-defined]


async def test_unexpected_exception_is_internal_without_leaking_the_message(target: str) -> None:
    err, _ = await _call(target, b"crash", "client-id-3")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "boom" not in err.details()
    assert error_details(err)["ErrorInfo"].reason == "INTERNAL"  # type: ignore[attr-defined]


def test_rpc_error_is_an_exception_with_its_code() -> None:
    assert RpcError(grpc.StatusCode.NOT_FOUND, "x", "X").code == grpc.StatusCode.NOT_FOUND


async def test_streams_pass_through_and_end_with_the_rich_error(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        assert [p async for p in channel.unary_stream("/test.Echo/Stream")(b"ok")] == [b"ok", b"ok"]
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for piece in channel.unary_stream("/test.Echo/Stream")(b"bad"):
                received.append(piece)
        assert received == [b"bad"]
        assert error_details(err.value)["ErrorInfo"].reason == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
        chat = channel.stream_stream("/test.Echo/Chat")(iter([b"a", b"b"]))
        assert [p async for p in chat] == [b"a", b"b"]
