"""OpenAI's Server-Sent Events, written by the service: the streaming RPCs return `google.api.HttpBody`
messages, which Envoy's transcoder passes through as they are, so the stream can end the way OpenAI's
does, with `data: [DONE]` (the transcoder's own SSE framing cannot add it).

Each chunk is printed as the transcoder prints unary answers (proto field names, fields without
presence always printed), so a streamed chunk and a unary answer spell their fields alike; except that
a delta without tool calls leaves `tool_calls` out, as OpenAI's deltas do (an empty list in every
delta is noise to stream parsers).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from json.encoder import encode_basestring

from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

CONTENT_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
# Stands for a chunk's text in a `TextEvents` template (private-use characters: printed as they are,
# and no id, model or request id of ferry's can hold them).
PLACEHOLDER = "\ue000ferry-text\ue001"


def chunk_json(chunk: Message) -> str:
    value = json_format.MessageToDict(
        chunk, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for choice in value.get("choices", ()):
        delta = choice.get("delta")
        if delta is not None and not delta.get("tool_calls"):
            delta.pop("tool_calls", None)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def event(chunk: Message) -> httpbody_pb2.HttpBody:
    """One `data: {json}` event; an `HttpBody` is already one (`TextEvents`) and passes as it is."""
    if isinstance(chunk, httpbody_pb2.HttpBody):
        return chunk
    data = b"data: " + chunk_json(chunk).encode() + b"\n\n"
    return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=data)


class TextEvents:
    """The events of one stream's chunks that differ only in their text (a chunk per piece, without
    logprobs or tool calls): `chunk_json` prints a chunk whose text is `PLACEHOLDER` once, and each
    piece's event is that JSON with the text, JSON-escaped, in the placeholder's place. The bytes are
    the ones `event` writes for the same chunk (the same escaping: json's own string encoder), at a
    fraction of the cost of printing the message field by field for every token."""

    def __init__(self, sample: Message) -> None:
        data = b"data: " + chunk_json(sample).encode() + b"\n\n"
        marker = encode_basestring(PLACEHOLDER).encode()
        if data.count(marker) != 1:
            raise ValueError("the sample chunk must hold the placeholder exactly once")
        self.before, self.after = data.split(marker)

    def event(self, text: str) -> httpbody_pb2.HttpBody:
        data = self.before + encode_basestring(text).encode() + self.after
        return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=data)


async def events(chunks: AsyncGenerator[Message, None]) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
    """The chunks as events, then `[DONE]` after a stream that ended well. After an error event the
    stream ends with the error status instead (the exception propagates), as OpenAI's does. Closing
    this closes `chunks` at once, so a client that goes away frees the engine slot."""
    async with aclosing(chunks):
        async for chunk in chunks:
            yield event(chunk)
    yield httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=DONE)
