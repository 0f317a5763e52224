"""Pieces coalesced when their reader is behind, as vLLM coalesces its stream output.

The engine's stream is read by a task of its own into a buffer; the reader of `coalesced` takes
everything the buffer holds at once, as one piece (the texts concatenated, the tokens summed, the
logprobs of all of them in order, the last piece's finish reason). A reader that keeps up gets every
piece as it came, the first one included: nothing waits for company, so time-to-first-token and the
first piece are never delayed. A reader that is behind (its last message still being written to a
slow client, or the event loop busy with other streams) gets one message for all it missed instead of
one per token, at every hop after this one: metrics, the transaction's outcome, the chunk and its JSON,
the gRPC write to Envoy and Envoy's write to the client.

Closing the coalesced stream cancels the reading task, which closes the engine's stream (that is what
frees the engine slot), and waits for it. An engine error reaches the reader after the pieces read
before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from itertools import chain

from services.inference.domain import Piece


def merge(pieces: list[Piece]) -> Piece:
    """Consecutive pieces of one generation as one."""
    if len(pieces) == 1:
        return pieces[0]
    prompt_tokens = 0
    for piece in pieces:
        prompt_tokens = piece.prompt_tokens or prompt_tokens
    return Piece(
        text="".join(piece.text for piece in pieces),
        tokens=sum(piece.tokens for piece in pieces),
        prompt_tokens=prompt_tokens,
        finish_reason=pieces[-1].finish_reason,
        logprobs=tuple(chain.from_iterable(piece.logprobs for piece in pieces)),
    )


async def coalesced(pieces: AsyncGenerator[Piece, None]) -> AsyncGenerator[Piece, None]:
    """`pieces`, with the ones that arrived while the reader was away merged (`merge`)."""
    loop = asyncio.get_running_loop()
    buffer: list[Piece] = []
    failure: BaseException | None = None
    done = False
    stopping = False  # set when this generator cancels the reader itself
    waiting: asyncio.Future[None] | None = None

    def wake() -> None:
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def read() -> None:
        nonlocal failure, done
        try:
            async with aclosing(pieces):
                async for piece in pieces:
                    buffer.append(piece)
                    wake()
        except asyncio.CancelledError as err:
            if stopping:
                raise
            # The engine's own cancellation (not ours): the reader learns it as an error, never as a
            # normal end of the stream.
            failure = err
        except BaseException as err:
            failure = err
        finally:
            done = True
            wake()

    reader = asyncio.create_task(read())
    try:
        while True:
            if buffer:
                taken = buffer.copy()
                buffer.clear()
                yield merge(taken)
            elif done:
                break
            else:
                waiting = loop.create_future()
                try:
                    await waiting
                finally:
                    waiting = None
        if failure is not None:
            raise failure
    finally:
        if not reader.done():
            stopping = True
            reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            # The reader's own cancellation (ours, above); a cancellation of this task itself is
            # already on its way out through the exception being handled.
            pass
