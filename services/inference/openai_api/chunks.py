"""OpenAI's streaming shape, shared by chat completions and completions: an opening chunk once the
first piece is there, one chunk per piece (several engine pieces as one when the stream's reader fell
behind: services.inference.coalesce), a final chunk with the finish reason, a usage chunk when
asked (`stream_options.include_usage`), and after a start, an error as a last chunk.

The opening waits for the first piece so that errors before it (prompt too long, overload) still get a
plain status (an HTTP 4xx/5xx). Once a stream has started, an error can no longer change the HTTP
status, so it is sent as a last event with an `error` object (the OpenAI SDK raises APIError on it),
and the gRPC stream then ends with the error status too.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Generic, Protocol, TypeVar

from ferry.openai.v1 import openai_pb2
from google.api import httpbody_pb2

from services.common.context import request_id_var
from services.common.errors import Reason, RpcError, internal_error, rpc_error
from services.inference.deadline import Deadline
from services.inference.domain import Exchange, Outcome, Piece
from services.inference.pipeline import Pipeline
from services.inference.wire import WireRequest

Chunk = TypeVar("Chunk")


def finish_reason(outcome: Outcome) -> str:
    """OpenAI knows `stop` and `length`; an engine-side cancellation with the caller still there is an error."""
    if outcome.finish_reason in ("stop", "length"):
        return outcome.finish_reason
    raise rpc_error(
        Reason.GENERATION_ABORTED, f"generation ended early ({outcome.finish_reason or 'no finish reason'})"
    )


def openai_stream_error(err: Exception) -> openai_pb2.StreamError:
    """The `error` object of a stream's last event."""
    rpc = err if isinstance(err, RpcError) else internal_error(err)
    return openai_pb2.StreamError(
        message=rpc.message, type=rpc.openai_type, code=rpc.openai_code, param=rpc.param
    )


class ChunkFormat(Protocol, Generic[Chunk]):
    """How one OpenAI API writes the chunks of one stream (it may keep state, e.g. text offsets)."""

    def opening(self) -> list[Chunk]:
        """What goes before the first piece's chunk (chat: the role; completions: an echoed prompt)."""
        ...

    def piece(self, piece: Piece) -> Chunk | httpbody_pb2.HttpBody | None:
        """The piece's chunk, or its event already written (`sse.TextEvents`); None for a piece with
        nothing to show."""
        ...

    def finish(self, reason: str) -> Chunk: ...

    def usage(self, usage: openai_pb2.Usage) -> Chunk: ...

    def error(self, error: openai_pb2.StreamError) -> Chunk: ...


async def stream_chunks(
    pipeline: Pipeline,
    wire: WireRequest[Any],
    deadline: Deadline,
    chunk_format: Callable[[Exchange], ChunkFormat[Chunk]],
) -> AsyncGenerator[Chunk | httpbody_pb2.HttpBody, None]:
    """One OpenAI stream: the request parsed, generated, and written as `chunk_format` says."""
    exchange = Exchange(request_id_var.get(), pipeline.parse(wire))
    chunks = chunk_format(exchange)
    started = False
    try:
        async with aclosing(pipeline.stream(exchange, deadline)) as pieces:
            async for piece in pieces:
                if not started:
                    started = True
                    for chunk in chunks.opening():
                        yield chunk
                shown = chunks.piece(piece)
                if shown is not None:
                    yield shown
        yield chunks.finish(finish_reason(exchange.outcome))
        if exchange.request.include_usage:
            yield chunks.usage(exchange.outcome.openai_usage())
    except Exception as err:
        if started:
            yield chunks.error(openai_stream_error(err))
        raise
