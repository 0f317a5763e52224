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

from services.common.context import accept_request_id, request_id_var
from services.common.errors import invalid_argument
from services.inference import validation
from services.inference.deadline import RequestDeadline
from services.inference.generation import Api, Outcome, TokenLogprob
from services.inference.pipeline import Pipeline

_FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}


def usage(outcome: Outcome) -> inference_pb2.Usage:
    return inference_pb2.Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.total_tokens,
    )


def logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[inference_pb2.TokenLogprob]:
    return [
        inference_pb2.TokenLogprob(
            token=item.token,
            logprob=item.logprob,
            top_logprobs=[
                inference_pb2.TopLogprob(token=t.token, logprob=t.logprob) for t in item.top_logprobs
            ],
        )
        for item in items
    ]


def request_id(request: inference_pb2.GenerateRequest) -> str:
    """The body's request_id (AIP-155) wins over the x-request-id header; logs follow it."""
    if not request.request_id:
        return request_id_var.get()
    if accept_request_id(request.request_id) != request.request_id:
        raise invalid_argument("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    request_id_var.set(request.request_id)
    return request.request_id


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        gen = self.pipeline.validate(
            Api.GENERATE, request.model, lambda: validation.generate_request(request, stream=False)
        )
        rid = request_id(request)
        done = await self.pipeline.collect(gen, rid, RequestDeadline(context))
        outcome = done.outcome or Outcome()
        return inference_pb2.GenerateResponse(
            request_id=rid,
            model=f"models/{gen.model}",
            text="".join(outcome.text),
            finish_reason=_FINISH.get(outcome.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED),
            usage=usage(outcome),
            logprobs=logprobs(outcome.logprobs),
            created=int(time.time()),
        )

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[inference_pb2.GenerateStreamResponse, None]:
        gen = self.pipeline.validate(
            Api.GENERATE, request.model, lambda: validation.generate_request(request, stream=True)
        )
        rid = request_id(request)
        async with aclosing(self.pipeline.stream(gen, rid, RequestDeadline(context))) as pieces:
            async for piece, generation in pieces:
                message = inference_pb2.GenerateStreamResponse(
                    request_id=rid,
                    text=piece.text,
                    token_count=piece.tokens,
                    logprobs=logprobs(piece.logprobs),
                )
                if piece.finish_reason:
                    outcome = generation.outcome or Outcome()
                    message.finish_reason = _FINISH.get(
                        piece.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED
                    )
                    message.usage.CopyFrom(usage(outcome))
                yield message
