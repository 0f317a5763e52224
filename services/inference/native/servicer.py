"""InferenceService: ferry's native Generate (unary) and GenerateStream (server streaming).

A failure after the stream started ends it with the error status (and its rich details), which
gRPC clients see as an exception from the iterator and HTTP/2 clients of Envoy as trailers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

import grpc
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.context import request_id_var
from services.common.errors import invalid_argument
from services.common.names import REQUEST_ID_RULE, is_request_id
from services.inference.deadline import RequestDeadline
from services.inference.domain import Exchange
from services.inference.embeddings import responses as embedding_responses
from services.inference.embeddings import wire as embedding_wire
from services.inference.embeddings.service import Embeddings, served
from services.inference.native.generate import GenerateWire
from services.inference.pipeline import Pipeline

_FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}


def finish_reason(reason: str) -> inference_pb2.FinishReason.ValueType:
    return _FINISH.get(reason, inference_pb2.FINISH_REASON_UNSPECIFIED)


def request_id(request: inference_pb2.GenerateRequest | inference_pb2.EmbedRequest) -> str:
    """The body's request_id (AIP-155) wins over the x-request-id header; logs follow it."""
    if not request.request_id:
        return request_id_var.get()
    if not is_request_id(request.request_id):
        raise invalid_argument("request_id", f"must be {REQUEST_ID_RULE}")
    request_id_var.set(request.request_id)
    return request.request_id


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, pipeline: Pipeline, embeddings: Embeddings | None = None) -> None:
        self.pipeline = pipeline
        self.embeddings = embeddings

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        gen = self.pipeline.parse(GenerateWire(request, stream=False))
        exchange = Exchange(request_id(request), gen)
        outcome = await self.pipeline.collect(exchange, RequestDeadline(context))
        return inference_pb2.GenerateResponse(
            request_id=exchange.request_id,
            model=f"models/{exchange.request.model}",  # the model that served it (an alias's model)
            text="".join(outcome.text),
            finish_reason=finish_reason(outcome.finish_reason),
            usage=outcome.native_usage(),
            logprobs=[item.to_native() for item in outcome.logprobs],
            created=int(time.time()),
        )

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[inference_pb2.GenerateStreamResponse, None]:
        gen = self.pipeline.parse(GenerateWire(request, stream=True))
        exchange = Exchange(request_id(request), gen)
        async with aclosing(self.pipeline.stream(exchange, RequestDeadline(context))) as pieces:
            async for piece in pieces:
                message = inference_pb2.GenerateStreamResponse(
                    request_id=exchange.request_id,
                    text=piece.text,
                    token_count=piece.tokens,
                    logprobs=[item.to_native() for item in piece.logprobs],
                )
                if piece.finish_reason:
                    message.finish_reason = finish_reason(piece.finish_reason)
                    message.usage.CopyFrom(exchange.outcome.native_usage())
                yield message

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        embeddings = await served(self.embeddings, context)
        parsed = embeddings.parse(embedding_wire.parse_native, request, request.model.removeprefix("models/"))
        call = await embeddings.run(parsed, request_id(request), RequestDeadline(context))
        return embedding_responses.native_response(call)
