"""The chat WebSocket (`/chat/ws`, behind Envoy): a conversation's turns over one socket, bridged to
ConversationsService.StreamMessage with the caller's own API key (so the service, and through it the
Inference service, check that key's scopes and limits and record its requests as usual).

Frames are JSON text, one object each, with a `type` (docs/conversations.md, "WebSocket"):

client -> server
  {"type": "auth", "api_key": "..."}        first frame, unless an `Authorization: Bearer` header came
                                             with the upgrade (never in the URL)
  {"type": "turn", "id": "t1", "conversation": "conversations/...", "content": "..."}
      or "edit": {"message", "content"} or "regenerate": {"message"} instead of content; optional
      "sampling" and "constraint" as in SendMessageRequest (JSON names)
  {"type": "cancel", "id": "t1"}             stops that turn (the engine slot is freed)

server -> client
  {"type": "ready", "principal": "keys/..."}                      the key was accepted
  {"type": "user_message", "id", "message": {...}, "left_out_turns": n}
  {"type": "token", "id", "text": "..."}                           the answer's next piece
  {"type": "done", "id", "message": {...}}                         the stored answer
  {"type": "done", "id", "cancelled": true, "message": {...}}      stopped by a cancel frame (the
                                                                   partial answer as stored)
  {"type": "error", "id"?, "code": "UNAUTHENTICATED", "status": 401, "reason", "message"}

A refused key gets an error frame and the socket closes with code 4401 (4403 without the scope).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

import grpc
from aiohttp import WSMsgType, web
from ferry.conversations.v1 import conversations_pb2, conversations_pb2_grpc
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from services.common.config import Settings
from services.common.errors import error_details

log = logging.getLogger(__name__)

AUTH_SECONDS = 10.0
MAX_FRAME_BYTES = 1024 * 1024
MAX_TURNS_AT_ONCE = 4
# How long a cancelled turn waits for the service to store the partial answer.
STORED_SECONDS = 3.0
# HTTP status of each gRPC code, as Envoy maps them for REST (error frames carry both).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
CLOSE_CODES = {grpc.StatusCode.UNAUTHENTICATED: 4401, grpc.StatusCode.PERMISSION_DENIED: 4403}


def _json(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _error(err: grpc.aio.AioRpcError, turn_id: str | None = None) -> dict[str, Any]:
    info = error_details(err).get("ErrorInfo")
    frame: dict[str, Any] = {
        "type": "error",
        "code": err.code().name,
        "status": HTTP_STATUS.get(err.code(), 500),
        "reason": getattr(info, "reason", err.code().name),
        "message": err.details() or err.code().name,
    }
    if err.code() is grpc.StatusCode.UNAUTHENTICATED:
        frame["message"] = f"The API key was not accepted: {frame['message']}"
    if turn_id is not None:
        frame["id"] = turn_id
    return frame


def _refusal(message: str, turn_id: str | None = None, field: str = "") -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "error",
        "code": "INVALID_ARGUMENT",
        "status": 400,
        "reason": "INVALID_ARGUMENT",
        "message": message,
    }
    if field:
        frame["field"] = field
    if turn_id is not None:
        frame["id"] = turn_id
    return frame


class ChatSocket:
    """Serves one WebSocket per connection; one gRPC channel to the conversations service for all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> conversations_pb2_grpc.ConversationsServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.settings.conversations.address)
        return conversations_pb2_grpc.ConversationsServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_FRAME_BYTES)
        await socket.prepare(request)
        key = _bearer(request.headers.get("Authorization", ""))
        if not key:
            key = await self._auth_frame(socket)
            if not key:
                return socket
        metadata = (("authorization", f"Bearer {key}"),)
        try:
            await self._stub().ListConversations(
                conversations_pb2.ListConversationsRequest(page_size=1),
                metadata=metadata,
                timeout=AUTH_SECONDS,
            )
        except grpc.aio.AioRpcError as err:
            await socket.send_json(_error(err))
            await socket.close(code=CLOSE_CODES.get(err.code(), 1011), message=err.code().name.encode())
            return socket
        await socket.send_json({"type": "ready"})
        turns: dict[str, asyncio.Task[None]] = {}
        try:
            async for frame in socket:
                if frame.type != WSMsgType.TEXT:
                    continue
                await self._on_frame(socket, frame.data, metadata, turns)
        finally:
            for task in turns.values():
                task.cancel()
            if turns:
                await asyncio.gather(*turns.values(), return_exceptions=True)
        return socket

    async def _stored_answer(
        self, request: conversations_pb2.SendMessageRequest, metadata: tuple[tuple[str, str], ...]
    ) -> conversations_pb2.Message | None:
        """The cancelled turn's partial answer once the service has stored it (None if not in time)."""
        deadline = time.monotonic() + STORED_SECONDS
        while time.monotonic() < deadline:
            try:
                found = await _find_answer(self._stub(), request, metadata)
            except grpc.aio.AioRpcError:
                return None
            if found is not None:
                return found
            await asyncio.sleep(0.05)
        return None

    async def _auth_frame(self, socket: web.WebSocketResponse) -> str:
        """The key of the first frame (`{"type": "auth", "api_key": ...}`); "" after refusing the socket."""
        try:
            frame = await socket.receive(timeout=AUTH_SECONDS)
            data = json.loads(frame.data) if frame.type == WSMsgType.TEXT else None
        except (TimeoutError, ValueError):
            data = None
        key = data.get("api_key") if isinstance(data, dict) and data.get("type") == "auth" else None
        if not isinstance(key, str) or not key:
            await socket.send_json(
                {
                    "type": "error",
                    "code": "UNAUTHENTICATED",
                    "status": 401,
                    "reason": "UNAUTHENTICATED",
                    "message": 'An API key is required: send {"type": "auth", "api_key": ...} first '
                    "or an Authorization: Bearer header",
                }
            )
            await socket.close(code=4401, message=b"UNAUTHENTICATED")
            return ""
        return key

    async def _on_frame(
        self,
        socket: web.WebSocketResponse,
        text: str,
        metadata: tuple[tuple[str, str], ...],
        turns: dict[str, asyncio.Task[None]],
    ) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            await socket.send_json(_refusal("a frame must be a JSON object"))
            return
        if not isinstance(data, dict):
            await socket.send_json(_refusal("a frame must be a JSON object"))
            return
        kind, turn_id = data.get("type"), data.get("id")
        if not isinstance(turn_id, str) or not turn_id:
            await socket.send_json(_refusal("id is required (a string naming the turn)", field="id"))
            return
        if kind == "cancel":
            task = turns.get(turn_id)
            if task is not None:
                task.cancel()
            return
        if kind != "turn":
            await socket.send_json(_refusal(f"unknown frame type {kind!r}: turn or cancel", turn_id, "type"))
            return
        if turn_id in turns:
            await socket.send_json(_refusal(f"turn {turn_id!r} is still running", turn_id, "id"))
            return
        if len(turns) >= MAX_TURNS_AT_ONCE:
            await socket.send_json(_refusal(f"at most {MAX_TURNS_AT_ONCE} turns at once", turn_id))
            return
        body = {k: v for k, v in data.items() if k not in ("type", "id")}
        try:
            request = ParseDict(body, conversations_pb2.SendMessageRequest())
        except ParseError as err:
            await socket.send_json(_refusal(f"not a turn: {err}", turn_id))
            return
        task = asyncio.create_task(self._turn(socket, turn_id, request, metadata))
        turns[turn_id] = task
        task.add_done_callback(lambda _: turns.pop(turn_id, None))

    async def _turn(
        self,
        socket: web.WebSocketResponse,
        turn_id: str,
        request: conversations_pb2.SendMessageRequest,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        if not request.request_id:
            # Known here so that a cancelled turn's stored answer can be found (its request_id).
            request.request_id = str(uuid.uuid4())
        call = self._stub().StreamMessage(request, metadata=metadata)
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "user_message":
                    frame = {
                        "type": "user_message",
                        "id": turn_id,
                        "message": _json(event.user_message),
                        "left_out_turns": event.left_out_turns,
                    }
                elif kind == "text":
                    frame = {"type": "token", "id": turn_id, "text": event.text}
                else:
                    frame = {"type": "done", "id": turn_id, "message": _json(event.assistant_message)}
                await socket.send_json(frame)
        except asyncio.CancelledError:
            call.cancel()
            if socket.closed:
                return
            frame = {"type": "done", "id": turn_id, "cancelled": True}
            stored = await self._stored_answer(request, metadata)
            if stored is not None:
                frame["message"] = _json(stored)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await socket.send_json(frame)
        except grpc.aio.AioRpcError as err:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await socket.send_json(_error(err, turn_id))
        except (ConnectionError, RuntimeError):  # the socket went away: the call ends with it
            call.cancel()


async def _find_answer(
    stub: conversations_pb2_grpc.ConversationsServiceStub,
    request: conversations_pb2.SendMessageRequest,
    metadata: tuple[tuple[str, str], ...],
) -> conversations_pb2.Message | None:
    listed = await stub.ListMessages(
        conversations_pb2.ListMessagesRequest(parent=request.conversation, all_versions=True),
        metadata=metadata,
        timeout=STORED_SECONDS,
    )
    return next((m for m in reversed(listed.messages) if m.request_id == request.request_id), None)


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
