"""A reader that falls behind gets what accumulated as one message (services.inference.coalesce), with
the same text, tokens, logprobs and usage as a reader that keeps up; the first piece is never held
back. The engine here is paced by the test (the real one cannot be made to wait for a reader at
will); the servicers, the pipeline and the chunk writers are the real ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import json_format

from services.common.config import InferenceSettings
from services.inference.coalesce import coalesced, merge
from services.inference.domain import Piece, TokenLogprob, TopLogprob
from services.inference.native.servicer import InferenceServicer
from services.inference.openai_api import sse
from services.inference.openai_api.servicer import OpenAIServicer
from services.inference.pipeline import Pipeline
from services.inference.templates import ChatTemplates
from tests.inference.test_stream_errors import Catalog, Context

TEXTS = ["Hel", "lo", ', "wor', 'ld"\n', "é✓", " \\end\u0001"]
WAIT = 10.0


def logprob(i: int) -> tuple[TokenLogprob, ...]:
    return (TokenLogprob(TEXTS[i], -0.1 * i, (TopLogprob(TEXTS[i], -0.1 * i), TopLogprob("x", -9.0))),)


class PacedEngine:
    """Yields TEXTS one piece each; after the first piece it waits until the test lets it go on, then
    yields the rest one by one with a loop turn between them (as pieces off a socket come)."""

    def __init__(self) -> None:
        self.first_sent = asyncio.Event()
        self.go_on = asyncio.Event()
        self.finished = asyncio.Event()

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncGenerator[Piece, None]:
        logprobs = args[2].logprobs
        for i, text in enumerate(TEXTS):
            last = i == len(TEXTS) - 1
            yield Piece(
                text=text,
                tokens=1,
                prompt_tokens=7,
                finish_reason="stop" if last else "",
                logprobs=logprob(i) if logprobs else (),
            )
            if i == 0:
                self.first_sent.set()
                await self.go_on.wait()
            await asyncio.sleep(0)
        self.finished.set()


def servicers(engine: PacedEngine) -> tuple[OpenAIServicer, InferenceServicer]:
    catalog: Any = Catalog()
    pipeline = Pipeline(catalog, engine, ChatTemplates(), InferenceSettings())  # type: ignore[arg-type]
    return OpenAIServicer(pipeline, catalog), InferenceServicer(pipeline)


async def read_slowly(stream: AsyncGenerator[Any, None], engine: PacedEngine, opening: int) -> list[Any]:
    """Takes the first `opening` + 1 messages while the engine has sent only its first piece (they must
    come without it sending more), then lets the engine finish before reading on: a reader behind."""
    messages = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(opening + 1)]
    assert not engine.go_on.is_set()
    engine.go_on.set()
    await asyncio.wait_for(engine.finished.wait(), WAIT)
    messages += [m async for m in stream]
    return messages


async def read_keeping_up(stream: AsyncGenerator[Any, None], engine: PacedEngine) -> list[Any]:
    engine.go_on.set()
    return [m async for m in stream]


def native_request(logprobs: bool) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(model="models/m", prompt="hi")
    if logprobs:
        request.sampling.logprobs = True
        request.sampling.top_logprobs = 2
    return request


async def native_stream(slow: bool, logprobs: bool) -> list[inference_pb2.GenerateStreamResponse]:
    engine = PacedEngine()
    _, native = servicers(engine)
    stream = native.GenerateStream(native_request(logprobs), Context())  # type: ignore[arg-type]
    if slow:
        return await read_slowly(stream, engine, opening=0)
    return await read_keeping_up(stream, engine)


async def test_a_native_reader_behind_gets_one_message_with_the_same_text_tokens_and_logprobs() -> None:
    for logprobs in (False, True):
        slow = await native_stream(slow=True, logprobs=logprobs)
        steady = await native_stream(slow=False, logprobs=logprobs)
        # The first piece came alone, at once; the five the reader missed came as one message.
        assert [m.text for m in slow] == [TEXTS[0], "".join(TEXTS[1:])]
        assert [m.token_count for m in slow] == [1, len(TEXTS) - 1]
        assert len(steady) == len(TEXTS)
        for messages in (slow, steady):
            assert "".join(m.text for m in messages) == "".join(TEXTS)
            last = messages[-1]
            assert last.finish_reason == inference_pb2.FINISH_REASON_STOP
            assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, len(TEXTS))
            got = [(lp.token, len(lp.top_logprobs)) for m in messages for lp in m.logprobs]
            assert got == ([(t, 2) for t in TEXTS] if logprobs else [])
            values = [lp.logprob for m in messages for lp in m.logprobs]
            assert values == pytest.approx([-0.1 * i for i in range(len(TEXTS))] if logprobs else [])


def sse_chunks(events: list[Any]) -> list[dict[str, Any]]:
    assert events[-1].data == sse.DONE
    return [json.loads(e.data.removeprefix(b"data: ")) for e in events[:-1]]


async def openai_stream(chat: bool, slow: bool, logprobs: bool) -> list[dict[str, Any]]:
    engine = PacedEngine()
    openai_servicer, _ = servicers(engine)
    body: dict[str, Any] = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
        if logprobs:
            body.update(logprobs=True, top_logprobs=2)
        request: Any = json_format.ParseDict(body, openai_pb2.CreateChatCompletionRequest())
        stream = openai_servicer.CreateChatCompletionStream(request, Context())  # type: ignore[arg-type]
    else:
        body["prompt"] = "hi"
        if logprobs:
            body["logprobs"] = 2
        request = json_format.ParseDict(body, openai_pb2.CreateCompletionRequest())
        stream = openai_servicer.CreateCompletionStream(request, Context())  # type: ignore[arg-type]
    if slow:
        # Chat opens with the role chunk before the first piece's chunk.
        return sse_chunks(await read_slowly(stream, engine, opening=1 if chat else 0))
    return sse_chunks(await read_keeping_up(stream, engine))


def shape(value: Any) -> Any:
    """The keys of a JSON value, all the way down (lists by their first item)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def text_of(chunk: dict[str, Any], chat: bool) -> str:
    choice = chunk["choices"][0]
    return str(choice["delta"].get("content", "") if chat else choice["text"])


async def test_an_openai_reader_behind_gets_one_chunk_with_the_same_text_logprobs_and_usage() -> None:
    for chat in (True, False):
        for logprobs in (False, True):
            slow = await openai_stream(chat, slow=True, logprobs=logprobs)
            steady = await openai_stream(chat, slow=False, logprobs=logprobs)
            opening = 1 if chat else 0
            # opening, the first piece alone, the rest as one chunk, the finish chunk, usage.
            assert [text_of(c, chat) for c in slow[opening:-2]] == [TEXTS[0], "".join(TEXTS[1:])]
            assert len(steady) == opening + len(TEXTS) + 2
            for chunks in (slow, steady):
                pieces = chunks[opening:-2]
                assert "".join(text_of(c, chat) for c in pieces) == "".join(TEXTS)
                assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
                assert chunks[-1]["usage"] == {
                    "prompt_tokens": 7,
                    "completion_tokens": len(TEXTS),
                    "total_tokens": 7 + len(TEXTS),
                }
                if not logprobs:
                    assert all("logprobs" not in c["choices"][0] for c in pieces)
                elif chat:
                    tokens = [lp["token"] for c in pieces for lp in c["choices"][0]["logprobs"]["content"]]
                    assert tokens == TEXTS
                else:
                    got = [c["choices"][0]["logprobs"] for c in pieces]
                    assert [t for lp in got for t in lp["tokens"]] == TEXTS
                    # text_offset keeps counting characters across the coalesced chunk.
                    offsets = [o for lp in got for o in lp["text_offset"]]
                    assert offsets == [sum(len(t) for t in TEXTS[:i]) for i in range(len(TEXTS))]
            # Each chunk has the same fields either way.
            assert [shape(c) for c in slow] == [shape(c) for c in steady[: opening + 2] + steady[-2:]]


async def test_text_events_write_the_bytes_of_the_chunk_printed_field_by_field() -> None:
    for text in ["", "plain", '"quoted" \\ back/slash', "line\nbreak\ttab\u0001", "é ✓ 日本 \u2028", "{}"]:
        fields: dict[str, Any] = {
            "id": "chatcmpl-r1",
            "object": "chat.completion.chunk",
            "created": 5,
            "model": "m",
        }
        chunk = openai_pb2.ChatCompletionChunk(
            choices=[
                openai_pb2.ChatCompletionChunkChoice(index=0, delta=openai_pb2.ChunkDelta(content=text))
            ],
            **fields,
        )
        sample = openai_pb2.ChatCompletionChunk(
            choices=[
                openai_pb2.ChatCompletionChunkChoice(
                    index=0, delta=openai_pb2.ChunkDelta(content=sse.PLACEHOLDER)
                )
            ],
            **fields,
        )
        assert sse.TextEvents(sample).event(text) == sse.event(chunk)


async def test_closing_early_closes_the_engine_stream() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncGenerator[Piece, None]:
        try:
            while True:
                yield Piece(text="x", tokens=1, prompt_tokens=1)
                await asyncio.sleep(0)
        finally:
            closed.set()

    stream = coalesced(endless())
    first = await anext(stream)
    assert first.text == "x"
    await stream.aclose()
    assert closed.is_set()


def test_merge_keeps_everything_in_order() -> None:
    pieces = [
        Piece("a", 1, 5, logprobs=logprob(0)),
        Piece("b", 2, 0, logprobs=logprob(1)),
        Piece("", 0, 0, "length"),
    ]
    merged = merge(pieces)
    assert merged == Piece("ab", 3, 5, "length", logprob(0) + logprob(1))
    assert merge(pieces[:1]) is pieces[0]


async def test_the_engines_own_cancellation_is_an_error_not_a_normal_end() -> None:
    async def engine() -> AsyncGenerator[Piece, None]:
        yield Piece(text="a", tokens=1, prompt_tokens=1)
        raise asyncio.CancelledError

    seen: list[str] = []
    with pytest.raises(asyncio.CancelledError):
        async for piece in coalesced(engine()):
            seen.append(piece.text)
    assert seen == ["a"]
