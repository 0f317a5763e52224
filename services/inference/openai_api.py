"""OpenAIService: OpenAI's chat completions, completions and models, in OpenAI's shapes.

Envoy transcodes these RPCs to OpenAI's REST paths; `"stream": true` bodies are routed to the
*Stream RPCs, whose messages become Server-Sent Events. Once a stream has started, an error can no
longer change the HTTP status, so it is sent as a last event with an `error` object (the OpenAI SDK
raises APIError on it) and the gRPC stream then ends with the error status too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

import grpc
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc
from google.protobuf import struct_pb2

from services.common.context import request_id_var
from services.common.errors import RpcError
from services.inference import validation
from services.inference.catalog import Catalog
from services.inference.deadline import RequestDeadline
from services.inference.generation import Api, Outcome, TokenLogprob
from services.inference.pipeline import Generation, Pipeline

CHAT_OBJECT = "chat.completion"
CHUNK_OBJECT = "chat.completion.chunk"
COMPLETION_OBJECT = "text_completion"
# OpenAI's error `type` for each gRPC code (what its SDK and clients switch on).
_ERROR_TYPES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request_error",
    grpc.StatusCode.NOT_FOUND: "invalid_request_error",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_error",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
}


def finish_reason(outcome: Outcome) -> str:
    """OpenAI knows `stop` and `length`; an engine-side cancellation with the caller still there is an error."""
    if outcome.finish_reason in ("stop", "length"):
        return outcome.finish_reason
    raise RpcError(
        grpc.StatusCode.ABORTED,
        f"generation ended early ({outcome.finish_reason or 'no finish reason'})",
        "GENERATION_ABORTED",
    )


def usage(outcome: Outcome) -> openai_pb2.Usage:
    return openai_pb2.Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.total_tokens,
    )


def chat_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> openai_pb2.ChoiceLogprobs:
    return openai_pb2.ChoiceLogprobs(
        content=[
            openai_pb2.TokenLogprob(
                token=item.token,
                logprob=item.logprob,
                top_logprobs=[
                    openai_pb2.TopLogprob(token=t.token, logprob=t.logprob) for t in item.top_logprobs
                ],
            )
            for item in items
        ]
    )


def completion_logprobs(
    items: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int
) -> openai_pb2.CompletionLogprobs:
    """The legacy completions format: parallel lists, `top_logprobs` as {token: logprob} objects."""
    out = openai_pb2.CompletionLogprobs()
    for item in items:
        out.tokens.append(item.token)
        out.token_logprobs.append(item.logprob)
        top = struct_pb2.Struct()
        for alt in item.top_logprobs:
            top[alt.token] = alt.logprob
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(item.token)
    return out


def stream_error(err: RpcError) -> openai_pb2.StreamError:
    return openai_pb2.StreamError(
        message=err.message,
        type=_ERROR_TYPES.get(err.code, "server_error"),
        code=err.reason.lower(),
    )


def as_rpc_error(err: Exception) -> RpcError:
    if isinstance(err, RpcError):
        return err
    return RpcError(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}", "INTERNAL")


def model_message(catalog: Catalog, name: str, owned_by: str) -> openai_pb2.Model:
    return openai_pb2.Model(id=name, object="model", created=catalog.created(name), owned_by=owned_by)


class OpenAIServicer(openai_pb2_grpc.OpenAIServiceServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def CreateChatCompletion(
        self, request: openai_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.ChatCompletion:
        gen = self.pipeline.validate(
            Api.CHAT, request.model, lambda: validation.chat_request(request, stream=False)
        )
        rid = request_id_var.get()
        done: Generation = await self.pipeline.collect(gen, rid, RequestDeadline(context))
        outcome = done.outcome or Outcome()
        choice = openai_pb2.ChatCompletionChoice(
            index=0,
            message=openai_pb2.AssistantMessage(role="assistant", content="".join(outcome.text)),
            finish_reason=finish_reason(outcome),
        )
        if gen.sampling.logprobs:
            choice.logprobs.CopyFrom(chat_logprobs(outcome.logprobs))
        return openai_pb2.ChatCompletion(
            id=f"chatcmpl-{rid}",
            object=CHAT_OBJECT,
            created=int(time.time()),
            model=gen.model,
            choices=[choice],
            usage=usage(outcome),
        )

    async def CreateChatCompletionStream(
        self, request: openai_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[openai_pb2.ChatCompletionChunk, None]:
        gen = self.pipeline.validate(
            Api.CHAT, request.model, lambda: validation.chat_request(request, stream=True)
        )
        rid = request_id_var.get()
        created = int(time.time())

        def chunk(**fields: object) -> openai_pb2.ChatCompletionChunk:
            return openai_pb2.ChatCompletionChunk(
                id=f"chatcmpl-{rid}",
                object=CHUNK_OBJECT,
                created=created,
                model=gen.model,
                **fields,  # type: ignore[arg-type]
            )

        started = False
        outcome = Outcome()
        try:
            async with aclosing(self.pipeline.stream(gen, rid, RequestDeadline(context))) as pieces:
                async for piece, generation in pieces:
                    outcome = generation.outcome or outcome
                    if not started:
                        # OpenAI's first chunk announces the role; it waits for the first piece so that
                        # errors before it (prompt too long, overload) still get a plain HTTP status.
                        started = True
                        yield chunk(
                            choices=[
                                openai_pb2.ChatCompletionChunkChoice(
                                    index=0, delta=openai_pb2.ChunkDelta(role="assistant", content="")
                                )
                            ]
                        )
                    if piece.text or piece.logprobs:
                        choice = openai_pb2.ChatCompletionChunkChoice(
                            index=0, delta=openai_pb2.ChunkDelta(content=piece.text)
                        )
                        if gen.sampling.logprobs:
                            choice.logprobs.CopyFrom(chat_logprobs(piece.logprobs))
                        yield chunk(choices=[choice])
            yield chunk(
                choices=[
                    openai_pb2.ChatCompletionChunkChoice(
                        index=0, delta=openai_pb2.ChunkDelta(), finish_reason=finish_reason(outcome)
                    )
                ]
            )
            if gen.include_usage:
                yield chunk(choices=[], usage=usage(outcome))
        except Exception as err:
            if started:
                yield chunk(error=stream_error(as_rpc_error(err)))
            raise

    async def CreateCompletion(
        self, request: openai_pb2.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.Completion:
        gen = self.pipeline.validate(
            Api.COMPLETION, request.model, lambda: validation.completion_request(request, stream=False)
        )
        rid = request_id_var.get()
        done = await self.pipeline.collect(gen, rid, RequestDeadline(context))
        outcome = done.outcome or Outcome()
        prefix = gen.prompt if gen.echo and gen.prompt else ""
        choice = openai_pb2.CompletionChoice(
            text=prefix + "".join(outcome.text), index=0, finish_reason=finish_reason(outcome)
        )
        if gen.sampling.logprobs:
            choice.logprobs.CopyFrom(completion_logprobs(outcome.logprobs, 0))
        return openai_pb2.Completion(
            id=f"cmpl-{rid}",
            object=COMPLETION_OBJECT,
            created=int(time.time()),
            model=gen.model,
            choices=[choice],
            usage=usage(outcome),
        )

    async def CreateCompletionStream(
        self, request: openai_pb2.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[openai_pb2.Completion, None]:
        gen = self.pipeline.validate(
            Api.COMPLETION, request.model, lambda: validation.completion_request(request, stream=True)
        )
        rid = request_id_var.get()
        created = int(time.time())

        def chunk(**fields: object) -> openai_pb2.Completion:
            return openai_pb2.Completion(
                id=f"cmpl-{rid}",
                object=COMPLETION_OBJECT,
                created=created,
                model=gen.model,
                **fields,  # type: ignore[arg-type]
            )

        started = False
        offset = 0
        outcome = Outcome()
        try:
            async with aclosing(self.pipeline.stream(gen, rid, RequestDeadline(context))) as pieces:
                async for piece, generation in pieces:
                    outcome = generation.outcome or outcome
                    if not started:
                        started = True
                        if gen.echo and gen.prompt:
                            yield chunk(choices=[openai_pb2.CompletionChoice(text=gen.prompt, index=0)])
                            offset = len(gen.prompt)
                    if piece.text or piece.logprobs:
                        choice = openai_pb2.CompletionChoice(text=piece.text, index=0)
                        if gen.sampling.logprobs:
                            choice.logprobs.CopyFrom(completion_logprobs(piece.logprobs, offset))
                        offset += len(piece.text)
                        yield chunk(choices=[choice])
            yield chunk(
                choices=[openai_pb2.CompletionChoice(text="", index=0, finish_reason=finish_reason(outcome))]
            )
            if gen.include_usage:
                yield chunk(choices=[], usage=usage(outcome))
        except Exception as err:
            if started:
                yield chunk(error=stream_error(as_rpc_error(err)))
            raise

    async def ListModels(
        self, request: openai_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.ListModelsResponse:
        catalog = self.pipeline.catalog
        models = await catalog.ready_models()
        return openai_pb2.ListModelsResponse(
            object="list", data=[model_message(catalog, m.name, m.owned_by) for m in models]
        )

    async def RetrieveModel(
        self, request: openai_pb2.RetrieveModelRequest, context: grpc.aio.ServicerContext
    ) -> openai_pb2.Model:
        name = validation.openai_model(request.model)
        info = await self.pipeline.catalog.resolve(name)
        return model_message(self.pipeline.catalog, info.name, info.owned_by)
