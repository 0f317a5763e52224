"""OpenAIService: OpenAI's chat completions, completions and models, in OpenAI's shapes.

Envoy transcodes these RPCs to OpenAI's REST paths; `"stream": true` bodies are routed to the
*Stream RPCs, which write OpenAI's Server-Sent Events themselves (`chunks` says what is sent,
`sse` how), ending with `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import grpc
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc
from google.api import httpbody_pb2

from services.common.context import request_id_var
from services.common.triton_client import ModelInfo
from services.inference.deadline import RequestDeadline
from services.inference.domain import Exchange, Piece, chat_logprobs, completion_logprobs
from services.inference.embeddings import responses as embedding_responses
from services.inference.embeddings import wire as embedding_wire
from services.inference.embeddings.service import Embeddings, served
from services.inference.openai_api import fields, sse, tools
from services.inference.openai_api.chat import ChatWire
from services.inference.openai_api.chunks import finish_reason, stream_chunks
from services.inference.openai_api.completions import CompletionWire
from services.inference.pipeline import Pipeline

CHAT_OBJECT = "chat.completion"
CHUNK_OBJECT = "chat.completion.chunk"
COMPLETION_OBJECT = "text_completion"
CHAT_ID_PREFIX = "chatcmpl"
COMPLETION_ID_PREFIX = "cmpl"

# An OpenAI response or chunk message.
Message = TypeVar("Message")


class ModelList(Protocol):
    async def resolve(self, name: str) -> ModelInfo: ...

    async def listing(self) -> list[tuple[str, ModelInfo]]:
        """(name, model) of every name clients may use now, aliases included."""
        ...

    def created(self, name: str) -> int: ...


def stamped(
    kind: Callable[..., Message],
    object_name: str,
    id_prefix: str,
    exchange: Exchange,
    created: int,
    **fields: object,
) -> Message:
    """An OpenAI response or chunk: `{id_prefix}-{request id}`, its object, creation time and model, and `fields`."""
    return kind(
        id=f"{id_prefix}-{exchange.request_id}",
        object=object_name,
        created=created,
        model=exchange.request.model,
        **fields,
    )


class StampedChunks(Generic[Message]):
    """What both APIs' chunk formats share: every chunk of a stream carries the same id, object, creation
    time and model; the usage chunk has no choices; the error chunk only the error."""

    # The chunk's message type, its `object` and its id's prefix.
    kind: ClassVar[Callable[..., Any]]
    object_name: ClassVar[str]
    id_prefix: ClassVar[str]

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.created = int(time.time())

    def _chunk(self, **fields: object) -> Message:
        return stamped(
            type(self).kind, self.object_name, self.id_prefix, self.exchange, self.created, **fields
        )

    def usage(self, usage: openai_pb2.Usage) -> Message:
        return self._chunk(choices=[], usage=usage)

    def error(self, error: openai_pb2.StreamError) -> Message:
        return self._chunk(error=error)


class ChatChunks(StampedChunks[openai_pb2.ChatCompletionChunk]):
    """Chat completion chunks of one stream: the role first, then content or tool-call deltas."""

    kind = openai_pb2.ChatCompletionChunk
    object_name = CHUNK_OBJECT
    id_prefix = CHAT_ID_PREFIX

    def __init__(self, exchange: Exchange) -> None:
        super().__init__(exchange)
        self.tools = tools.ToolCallDeltas(exchange.request.tool_use)
        self.text_events: sse.TextEvents | None = None

    def opening(self) -> list[openai_pb2.ChatCompletionChunk]:
        # With tools offered the answer may be calls, whose content is null: no empty content first.
        delta = openai_pb2.ChunkDelta(role="assistant")
        if not self.tools.offered:
            delta.content = ""
        return [self._chunk(choices=[openai_pb2.ChatCompletionChunkChoice(index=0, delta=delta)])]

    def piece(self, piece: Piece) -> openai_pb2.ChatCompletionChunk | httpbody_pb2.HttpBody | None:
        if not (self.tools.offered or self.exchange.request.sampling.logprobs):
            # The common chunk (text only) is written from its template: no message per token.
            if not piece.text:
                return None
            if self.text_events is None:
                sample = openai_pb2.ChunkDelta(content=sse.PLACEHOLDER)
                choice = openai_pb2.ChatCompletionChunkChoice(index=0, delta=sample)
                self.text_events = sse.TextEvents(self._chunk(choices=[choice]))
            return self.text_events.event(piece.text)
        delta: openai_pb2.ChunkDelta | None = openai_pb2.ChunkDelta(content=piece.text)
        if self.tools.offered:
            delta = self.tools.piece(piece.text)
        if delta is None or not (piece.text or piece.logprobs):
            return None
        choice = openai_pb2.ChatCompletionChunkChoice(index=0, delta=delta)
        if self.exchange.request.sampling.logprobs:
            choice.logprobs.CopyFrom(chat_logprobs(piece.logprobs))
        return self._chunk(choices=[choice])

    def finish(self, reason: str) -> openai_pb2.ChatCompletionChunk:
        delta = self.tools.finish() if self.tools.offered else openai_pb2.ChunkDelta()
        if self.tools.made_calls and reason == "stop":
            reason = "tool_calls"
        choice = openai_pb2.ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=reason)
        return self._chunk(choices=[choice])


class CompletionChunks(StampedChunks[openai_pb2.Completion]):
    """Completion chunks of one stream: the echoed prompt first (when asked), then text."""

    kind = openai_pb2.Completion
    object_name = COMPLETION_OBJECT
    id_prefix = COMPLETION_ID_PREFIX

    def __init__(self, exchange: Exchange) -> None:
        super().__init__(exchange)
        # Characters sent so far: the legacy logprobs' `text_offset` counts from here.
        self.offset = 0
        self.text_events: sse.TextEvents | None = None

    def opening(self) -> list[openai_pb2.Completion]:
        request = self.exchange.request
        if not (request.echo and request.prompt):
            return []
        self.offset = len(request.prompt)
        return [self._chunk(choices=[openai_pb2.CompletionChoice(text=request.prompt, index=0)])]

    def piece(self, piece: Piece) -> openai_pb2.Completion | httpbody_pb2.HttpBody | None:
        if not (piece.text or piece.logprobs):
            return None
        if not self.exchange.request.sampling.logprobs:
            # The common chunk (text only) is written from its template: no message per token.
            if self.text_events is None:
                sample = openai_pb2.CompletionChoice(text=sse.PLACEHOLDER, index=0)
                self.text_events = sse.TextEvents(self._chunk(choices=[sample]))
            self.offset += len(piece.text)
            return self.text_events.event(piece.text)
        choice = openai_pb2.CompletionChoice(text=piece.text, index=0)
        if self.exchange.request.sampling.logprobs:
            choice.logprobs.CopyFrom(completion_logprobs(piece.logprobs, self.offset))
        self.offset += len(piece.text)
        return self._chunk(choices=[choice])

    def finish(self, reason: str) -> openai_pb2.Completion:
        return self._chunk(choices=[openai_pb2.CompletionChoice(text="", index=0, finish_reason=reason)])


def model_message(models: ModelList, name: str, owned_by: str) -> openai_pb2.Model:
    return openai_pb2.Model(id=name, object="model", created=models.created(name), owned_by=owned_by)


class OpenAIServicer(openai_pb2_grpc.OpenAIServiceServicer):
    def __init__(self, pipeline: Pipeline, models: ModelList, embeddings: Embeddings | None = None) -> None:
        self.pipeline = pipeline
        self.models = models
        self.embeddings = embeddings

    async def CreateChatCompletion(
        self, request: openai_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.ChatCompletion:
        exchange = Exchange(request_id_var.get(), self.pipeline.parse(ChatWire(request, stream=False)))
        outcome = await self.pipeline.collect(exchange, RequestDeadline(context))
        content, calls = tools.answer(exchange.request.tool_use, "".join(outcome.text))
        reason = finish_reason(outcome)
        message = openai_pb2.AssistantMessage(role="assistant")
        if calls:
            message.tool_calls.extend(tools.tool_call_message(call) for call in calls)
            reason = "tool_calls" if reason == "stop" else reason
        else:
            message.content = content or ""
        choice = openai_pb2.ChatCompletionChoice(index=0, message=message, finish_reason=reason)
        if exchange.request.sampling.logprobs:
            choice.logprobs.CopyFrom(chat_logprobs(outcome.logprobs))
        return stamped(
            openai_pb2.ChatCompletion,
            CHAT_OBJECT,
            CHAT_ID_PREFIX,
            exchange,
            int(time.time()),
            choices=[choice],
            usage=outcome.openai_usage(),
        )

    async def CreateChatCompletionStream(
        self, request: openai_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        chunks = stream_chunks(
            self.pipeline, ChatWire(request, stream=True), RequestDeadline(context), ChatChunks
        )
        async with aclosing(sse.events(chunks)) as events:
            async for event in events:
                yield event

    async def CreateCompletion(
        self, request: openai_pb2.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.Completion:
        exchange = Exchange(request_id_var.get(), self.pipeline.parse(CompletionWire(request, stream=False)))
        outcome = await self.pipeline.collect(exchange, RequestDeadline(context))
        gen = exchange.request
        prefix = gen.prompt if gen.echo and gen.prompt else ""
        choice = openai_pb2.CompletionChoice(
            text=prefix + "".join(outcome.text), index=0, finish_reason=finish_reason(outcome)
        )
        if gen.sampling.logprobs:
            choice.logprobs.CopyFrom(completion_logprobs(outcome.logprobs, 0))
        return stamped(
            openai_pb2.Completion,
            COMPLETION_OBJECT,
            COMPLETION_ID_PREFIX,
            exchange,
            int(time.time()),
            choices=[choice],
            usage=outcome.openai_usage(),
        )

    async def CreateCompletionStream(
        self, request: openai_pb2.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        wire = CompletionWire(request, stream=True)
        chunks = stream_chunks(self.pipeline, wire, RequestDeadline(context), CompletionChunks)
        async with aclosing(sse.events(chunks)) as events:
            async for event in events:
                yield event

    async def CreateEmbedding(
        self, request: openai_pb2.CreateEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.CreateEmbeddingResponse:
        embeddings = await served(self.embeddings, context)
        parsed = embeddings.parse(embedding_wire.parse_openai, request, request.model)
        call = await embeddings.run(parsed, request_id_var.get(), RequestDeadline(context))
        return embedding_responses.openai_response(call)

    async def ListModels(
        self, request: openai_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.ListModelsResponse:
        # An alias is listed under its own id with its model's owner, as OpenAI and vLLM list theirs.
        listed = await self.models.listing()
        return openai_pb2.ListModelsResponse(
            object="list", data=[model_message(self.models, name, m.owned_by) for name, m in listed]
        )

    async def RetrieveModel(
        self, request: openai_pb2.RetrieveModelRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.Model:
        name = fields.model_name(request.model)
        info = await self.models.resolve(name)
        return model_message(self.models, name, info.owned_by)
