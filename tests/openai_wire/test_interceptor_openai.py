"""What the serving interceptor adds for OpenAI's REST paths, on an in-process server: OpenAI's error
JSON as trailing metadata before a response starts (never after, never for other services), and a
debug line naming the body fields the API does not define (Envoy's transcoder drops them)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from ferry.openai.v1 import openai_pb2

from services.common.errors import OPENAI_ERROR_METADATA, invalid_argument
from services.common.interceptor import Lifecycle, ServingInterceptor, undefined_fields

OPENAI = "ferry.openai.v1.OpenAIService"
REQUEST = openai_pb2.CreateCompletionRequest


async def _unary(request: openai_pb2.CreateCompletionRequest, context: grpc.aio.ServicerContext) -> bytes:
    raise invalid_argument("temperature", "must be in [0, 2], got 3")


async def _stream(
    request: openai_pb2.CreateCompletionRequest, context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    if request.prompt.string_value == "late":
        yield b"data: {}\n\n"
    raise invalid_argument("temperature", "must be in [0, 2], got 3")


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[ServingInterceptor(Lifecycle())])
    methods = {
        "CreateCompletion": grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=REQUEST.FromString
        ),
        "CreateCompletionStream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=REQUEST.FromString
        ),
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(OPENAI, methods),
            grpc.method_handlers_generic_handler("test.NotOpenAI", methods),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def _trailers(target: str, method: str, prompt: str = "", **metadata: str) -> dict[str, str]:
    request = REQUEST(model="m")
    request.prompt.string_value = prompt
    async with grpc.aio.insecure_channel(target) as channel:
        if method.endswith("Stream"):
            call = channel.unary_stream(method, request_serializer=REQUEST.SerializeToString)(
                request, metadata=tuple(metadata.items())
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
        else:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(method, request_serializer=REQUEST.SerializeToString)(
                    request, metadata=tuple(metadata.items())
                )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return {k: v for k, v in (err.value.trailing_metadata() or ()) if isinstance(v, str)}


async def test_an_openai_error_carries_openai_json_until_the_response_starts(target: str) -> None:
    expected = {
        "error": {
            "message": "temperature: must be in [0, 2], got 3",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }
    for method in (f"/{OPENAI}/CreateCompletion", f"/{OPENAI}/CreateCompletionStream"):
        assert json.loads((await _trailers(target, method))[OPENAI_ERROR_METADATA]) == expected
    # After the first event the stream's error event said it (chunks.py); the trailers do not again.
    late = await _trailers(target, f"/{OPENAI}/CreateCompletionStream", "late")
    assert OPENAI_ERROR_METADATA not in late
    # Other services keep google.rpc alone.
    assert OPENAI_ERROR_METADATA not in await _trailers(target, "/test.NotOpenAI/CreateCompletion")


async def test_fields_the_api_does_not_define_are_logged_at_debug(
    target: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="services.common.interceptor"):
        await _trailers(
            target,
            f"/{OPENAI}/CreateCompletion",
            **{"x-ferry-body-fields": "model,maxTokens,foo,best_of,bar"},
        )
    assert "CreateCompletion: ignored fields the API does not define: foo, bar" in caplog.messages


def test_undefined_fields_accepts_proto_and_json_names() -> None:
    chat = openai_pb2.CreateChatCompletionRequest()
    assert undefined_fields(chat, ["model", "max_completion_tokens", "maxCompletionTokens", "x"]) == ["x"]
