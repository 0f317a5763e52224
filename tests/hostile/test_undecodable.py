"""Found by the hostile-input suite: a payload that is not the method's message (raw bytes on any
gRPC method) was answered UNKNOWN by grpc itself (the deserializer raised before ferry's code ran);
the serving interceptor now refuses it with INVALID_ARGUMENT and ferry's rich status.
(In-process server: the stack tests send such payloads to every method.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from ferry.models.v1 import models_pb2

from services.common.errors import error_details
from services.common.interceptor import Lifecycle, ServingInterceptor

# A truncated length-delimited field 1: not a GetModelRequest.
GARBAGE = b"\x0a\xff\xff\xff\x0f"


async def _get(request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> models_pb2.Model:
    return models_pb2.Model(name=request.name)


async def _stream(
    request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
) -> AsyncIterator[models_pb2.Model]:
    yield models_pb2.Model(name=request.name)


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[ServingInterceptor(Lifecycle())])
    parse, write = models_pb2.GetModelRequest.FromString, models_pb2.Model.SerializeToString
    handler = grpc.method_handlers_generic_handler(
        "test.Models",
        {
            "Get": grpc.unary_unary_rpc_method_handler(_get, parse, write),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream, parse, write),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.mark.parametrize("method", ["Get", "Stream"])
async def test_undecodable_request_is_invalid_argument(target: str, method: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        if method == "Get":
            call = channel.unary_unary(f"/test.Models/{method}")(GARBAGE, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
        else:
            stream = channel.unary_stream(f"/test.Models/{method}")(GARBAGE, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream:
                    pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid serialized ferry.models.v1.GetModelRequest" in (caught.value.details() or "")
        assert error_details(caught.value)["ErrorInfo"].reason == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
        # A valid request still works.
        good = models_pb2.GetModelRequest(name="models/x").SerializeToString()
        answer = await channel.unary_unary("/test.Models/Get")(good, timeout=10)
        assert models_pb2.Model.FromString(answer).name == "models/x"
