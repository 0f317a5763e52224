"""Error paths of streaming with a scripted engine (the real engine cannot be made to fail at will):
a failure after the first piece reaches the client as an SSE error event and as the stream's status;
a failure before it is a plain status (so REST callers get a 4xx/5xx, not a 200 stream)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc
import pytest
from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from backends.llamacpp.contract import EngineErrorCode, EngineFault
from services.common.config import InferenceSettings
from services.common.errors import RpcError
from services.common.triton_client import ModelInfo
from services.inference.domain import Piece
from services.inference.engine_interface import EngineError, EngineFaulted, EngineUnreachable
from services.inference.native.servicer import InferenceServicer
from services.inference.openai_api.servicer import OpenAIServicer
from services.inference.pipeline import Pipeline
from services.inference.templates import ChatTemplates

MODEL = ModelInfo("m", "python", 4096, 4096, "ferry", "{{ messages[0].content }}", 2)


class Catalog:
    def is_known(self, name: str) -> bool:
        return name == MODEL.name

    async def resolve(self, name: str) -> ModelInfo:
        return MODEL

    async def is_ready(self, name: str) -> bool:
        return True


class ScriptedEngine:
    def __init__(self, pieces: int, error: EngineError) -> None:
        self.pieces, self.error = pieces, error

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncGenerator[Piece, None]:
        for i in range(self.pieces):
            yield Piece(text=f"t{i}", tokens=1, prompt_tokens=3)
        raise self.error


class Context:
    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()


def servicers(pieces: int, error: EngineError) -> tuple[OpenAIServicer, InferenceServicer]:
    engine: Any = ScriptedEngine(pieces, error)
    catalog: Any = Catalog()
    pipeline = Pipeline(catalog, engine, ChatTemplates(), InferenceSettings())
    return OpenAIServicer(pipeline, catalog), InferenceServicer(pipeline)


def failed(message: str) -> EngineFaulted:
    return EngineFaulted(EngineFault(code=EngineErrorCode.ENGINE_FAILED, message=message))


CHAT = json_format.ParseDict(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    openai_pb2.CreateChatCompletionRequest(),
)
COMPLETION = json_format.ParseDict(
    {"model": "m", "prompt": "hi", "stream": True}, openai_pb2.CreateCompletionRequest()
)


async def drain(stream: Any) -> tuple[list[Any], RpcError]:
    received = []
    with pytest.raises(RpcError) as err:
        async for item in stream:
            received.append(item)
    return received, err.value


async def drain_events(stream: Any, kind: type[Message]) -> tuple[list[Any], RpcError]:
    """An OpenAI stream's Server-Sent Events, each parsed back into its chunk message."""
    events, err = await drain(stream)
    assert all(e.content_type == "text/event-stream" for e in events)
    # A failed stream never says it is done.
    assert all(e.data != b"data: [DONE]\n\n" for e in events)
    chunks = [json_format.Parse(e.data.removeprefix(b"data: ").strip(), kind()) for e in events]
    return chunks, err


async def test_chat_stream_failing_midway_ends_with_an_error_event_and_status() -> None:
    openai_servicer, _ = servicers(2, failed("llama_decode failed"))
    context: Any = Context()
    chunks, err = await drain_events(
        openai_servicer.CreateChatCompletionStream(CHAT, context), openai_pb2.ChatCompletionChunk
    )
    # The pieces before the failure, maybe coalesced into one chunk (services.inference.coalesce).
    assert chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content for c in chunks[1:-1]) == "t0t1"
    last = chunks[-1]
    assert last.HasField("error") and not last.choices
    assert (last.error.type, last.error.code) == ("server_error", "engine_error")
    assert "llama_decode failed" in last.error.message
    assert err.code == grpc.StatusCode.INTERNAL


async def test_completion_stream_failing_midway_ends_with_an_error_event() -> None:
    openai_servicer, _ = servicers(1, EngineUnreachable("Triton unavailable: Socket closed"))
    context: Any = Context()
    chunks, err = await drain_events(
        openai_servicer.CreateCompletionStream(COMPLETION, context), openai_pb2.Completion
    )
    assert chunks[0].choices[0].text == "t0"
    last = chunks[-1].error
    assert "Socket closed" in last.message and (last.type, last.code) == (
        "server_error",
        "engine_unavailable",
    )
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.retry_after_seconds is not None


async def test_failure_before_the_first_piece_is_a_plain_status() -> None:
    too_long = EngineFault(
        code=EngineErrorCode.PROMPT_TOO_LONG,
        message="too long",
        prompt_tokens=5000,
        context_length=4096,
        limit="model",
    )
    openai_servicer, _ = servicers(0, EngineFaulted(too_long))
    context: Any = Context()
    chunks, err = await drain_events(
        openai_servicer.CreateChatCompletionStream(CHAT, context), openai_pb2.ChatCompletionChunk
    )
    assert chunks == [] and err.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_native_stream_failing_midway_ends_with_the_status() -> None:
    _, native = servicers(2, failed("boom"))
    request = inference_pb2.GenerateRequest(model="models/m", prompt="hi")
    context: Any = Context()
    pieces, err = await drain(native.GenerateStream(request, context))
    # The pieces before the failure, maybe coalesced into one message (services.inference.coalesce).
    assert "".join(p.text for p in pieces) == "t0t1" and sum(p.token_count for p in pieces) == 2
    assert err.code == grpc.StatusCode.INTERNAL and err.reason == "ENGINE_ERROR"
