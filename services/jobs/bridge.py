"""NATS access for services that speak NATS (docs/jobs.md): submitting jobs through JetStream, and
synchronous generation by request-reply. Part of the jobs service process.

Every message carries an API key (`Authorization: Bearer <key>` header) and is turned into the same
gRPC call an HTTP or gRPC client would make, with that key: CreateJob on the Jobs service, or the
generation RPC on the Inference service. So the gateway checks the key, scopes and rate limits
(AuthService.Authorize), and the call is audited and recorded like any other.

- `nats.submit_subject` (JetStream, durable consumer `ferry-submit`): a CreateJobRequest. The message
  is acknowledged once CreateJob answered; a `Ferry-Reply-To` header names a subject that gets the Job
  (or the error); it must start with `_INBOX.` (a client's inbox; any other is ignored, so a message
  cannot make the bridge publish to ferry's own subjects). Without `request_id`, the message's `Nats-Msg-Id` (else its stream sequence) is the
  create's request id, so a redelivered message never makes a second job.
- `<nats.generate_prefix>.chat_completion`, `.completion`, `.generate` (core request-reply, queue
  group `ferry-bridge`): CreateChatCompletionRequest, CreateCompletionRequest or GenerateRequest; the
  reply is the ChatCompletion, Completion or GenerateResponse, or an error.

Bodies are JSON (the proto3 JSON mapping, field names as in the proto: OpenAI's for the OpenAI
messages) unless `Content-Type: application/protobuf`; the answer comes in the request's format. An
error answer carries the header `Ferry-Error: <gRPC code name>` and a google.rpc.Status (JSON:
`{"error": {"code": <HTTP status>, "status": ..., "message": ..., "details": [...]}}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from ferry.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_status import rpc_status
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from services.common.config import Settings
from services.common.context import AUTHORIZATION_HEADER, REQUEST_ID_HEADER
from services.common.errors import http_status
from services.common.names import is_request_id
from services.common.server import SERVER_OPTIONS
from services.jobs import metrics, queue
from services.jobs.generation import inference_channel

log = logging.getLogger(__name__)

PROTOBUF = "application/protobuf"
JSON = "application/json"
REPLY_TO_HEADER = "Ferry-Reply-To"
# The only subjects a Ferry-Reply-To may name: clients' inboxes.
REPLY_TO_PREFIX = "_INBOX."
ERROR_HEADER = "Ferry-Error"
QUEUE_GROUP = "ferry-bridge"
# A submit that met an outage is tried again after this long (the message stays in the stream).
RETRY_SECONDS = 2.0
RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CALL_TIMEOUT_SECONDS = 30.0
GENERATE_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class GenerateRoute:
    """One request-reply subject: its request message and the RPC that answers it."""

    request: type[Message]
    call: Callable[[grpc.aio.Channel], Callable[..., Awaitable[Message]]]


ROUTES = {
    "chat_completion": GenerateRoute(
        openai_pb2.CreateChatCompletionRequest,
        lambda ch: openai_pb2_grpc.OpenAIServiceStub(ch).CreateChatCompletion,
    ),
    "completion": GenerateRoute(
        openai_pb2.CreateCompletionRequest, lambda ch: openai_pb2_grpc.OpenAIServiceStub(ch).CreateCompletion
    ),
    "generate": GenerateRoute(
        inference_pb2.GenerateRequest, lambda ch: inference_pb2_grpc.InferenceServiceStub(ch).Generate
    ),
}


class BadMessage(Exception):
    """A message that is not a request of its subject (answered INVALID_ARGUMENT, never retried)."""


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nc: Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._jobs: grpc.aio.Channel | None = None
        self._inference: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name="nats-bridge")

    async def stop(self) -> None:
        if self._main is not None:
            self._main.cancel()
            await asyncio.wait({self._main}, timeout=queue.STOP_SECONDS)
        await queue.disconnect(self.nc)
        for channel in (self._jobs, self._inference):
            if channel is not None:
                await channel.close()

    async def _run(self) -> None:
        self._jobs = grpc.aio.insecure_channel(self.settings.jobs.address, options=SERVER_OPTIONS)
        self._inference = inference_channel(self.settings)
        self.nc = await queue.connect(self.settings, "ferry-nats-bridge")
        prefix = self.settings.nats.generate_prefix
        await self.nc.subscribe(f"{prefix}.*", queue=QUEUE_GROUP, cb=self._spawn(self._generate))
        js = self.nc.jetstream()
        sub = await self._submit_subscription(js)
        while True:
            try:
                messages = await sub.fetch(8, timeout=5.0)
            except (NatsTimeout, TimeoutError):
                continue
            except Exception as exc:  # NATS restarting
                log.warning("submit fetch failed (%s); retrying", exc)
                await asyncio.sleep(queue.CONNECT_RETRY_SECONDS)
                continue
            await asyncio.gather(*(self._submit(msg) for msg in messages))

    async def _submit_subscription(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        subject = self.settings.nats.submit_subject
        while True:
            try:
                await queue.ensure_stream(js, self.settings)
                return await js.pull_subscribe(
                    subject,
                    durable=queue.SUBMIT_CONSUMER,
                    stream=self.settings.nats.stream,
                    config=queue.consumer_config(queue.SUBMIT_CONSUMER, subject, self.settings, 256),
                )
            except Exception as exc:  # JetStream not ready yet
                log.warning("submit consumer not ready (%s); retrying", exc)
                await asyncio.sleep(queue.CONNECT_RETRY_SECONDS)

    def _spawn(self, handler: Callable[[Msg], Coroutine[Any, Any, None]]) -> Callable[[Msg], Awaitable[None]]:
        # nats-py runs a subscription's callbacks one after another: each request gets its own task.
        async def callback(msg: Msg) -> None:
            task = asyncio.create_task(handler(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return callback

    # -- ferry.jobs.submit -------------------------------------------------------------------------

    async def _submit(self, msg: Msg) -> None:
        protobuf = _is_protobuf(msg)
        try:
            request = _decode(msg, jobs_pb2.CreateJobRequest)
            if not request.request_id:
                request.request_id = _message_request_id(msg)
            assert self._jobs is not None
            job = await jobs_pb2_grpc.JobsServiceStub(self._jobs).CreateJob(
                request, metadata=_metadata(msg), timeout=CALL_TIMEOUT_SECONDS
            )
        except BadMessage as bad:
            await self._answer_submit(msg, _error_body(_bad_status(str(bad)), protobuf), "INVALID_ARGUMENT")
            await msg.term()
            metrics.NATS_MESSAGES.labels("submit", "INVALID_ARGUMENT").inc()
            return
        except grpc.aio.AioRpcError as err:
            if err.code() in RETRIED_CODES:
                log.warning(
                    "submit %s: %s; retrying in %.0f s", _sequence(msg), err.code().name, RETRY_SECONDS
                )
                await msg.nak(delay=RETRY_SECONDS)
                return
            await self._answer_submit(msg, _error_body(_status(err), protobuf), err.code().name)
            await msg.term()
            metrics.NATS_MESSAGES.labels("submit", err.code().name).inc()
            return
        await self._answer_submit(msg, _encode(job, protobuf), None)
        await msg.ack()
        metrics.NATS_MESSAGES.labels("submit", "OK").inc()

    async def _answer_submit(self, msg: Msg, body: bytes, error: str | None) -> None:
        reply_to = (msg.headers or {}).get(REPLY_TO_HEADER)
        if reply_to and reply_to.startswith(REPLY_TO_PREFIX) and self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.publish(reply_to, body, headers=_reply_headers(msg, error))

    async def _respond(self, msg: Msg, body: bytes, error: str | None) -> None:
        if msg.reply and self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, body, headers=_reply_headers(msg, error))

    # -- ferry.generate.* ----------------------------------------------------------------------------

    async def _generate(self, msg: Msg) -> None:
        protobuf = _is_protobuf(msg)
        api = msg.subject.rpartition(".")[2]
        route = ROUTES.get(api)
        try:
            if route is None:
                raise BadMessage(f"no generation subject '{msg.subject}' (use {', '.join(ROUTES)})")
            request = _decode(msg, route.request)
            if api != "generate" and getattr(request, "stream", False):
                raise BadMessage("stream: request-reply answers once; stream is not supported over NATS")
            assert self._inference is not None
            answer = await route.call(self._inference)(
                request, metadata=_metadata(msg), timeout=GENERATE_TIMEOUT_SECONDS
            )
        except BadMessage as bad:
            await self._respond(msg, _error_body(_bad_status(str(bad)), protobuf), "INVALID_ARGUMENT")
            metrics.NATS_MESSAGES.labels("generate", "INVALID_ARGUMENT").inc()
            return
        except grpc.aio.AioRpcError as err:
            await self._respond(msg, _error_body(_status(err), protobuf), err.code().name)
            metrics.NATS_MESSAGES.labels("generate", err.code().name).inc()
            return
        await self._respond(msg, _encode(answer, protobuf), None)
        metrics.NATS_MESSAGES.labels("generate", "OK").inc()


def _reply_headers(msg: Msg, error: str | None) -> dict[str, str]:
    headers = {"Content-Type": PROTOBUF if _is_protobuf(msg) else JSON}
    if error:
        headers[ERROR_HEADER] = error
    return headers


def _is_protobuf(msg: Msg) -> bool:
    content_type = (msg.headers or {}).get("Content-Type", "")
    return content_type.split(";")[0].strip().lower() in (PROTOBUF, "application/x-protobuf")


def _decode(msg: Msg, kind: type[Any]) -> Any:
    message = kind()
    try:
        if _is_protobuf(msg):
            message.ParseFromString(msg.data)
        else:
            body = json.loads(msg.data or b"{}")
            if not isinstance(body, dict):
                raise BadMessage(f"the body is not a {kind.DESCRIPTOR.full_name}: a JSON object is expected")
            json_format.ParseDict(body, message)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(f"the body is not a {kind.DESCRIPTOR.full_name}: {exc}") from None
    return message


def _encode(message: Message, protobuf: bool) -> bytes:
    if protobuf:
        return message.SerializeToString()
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None).encode()


def _metadata(msg: Msg) -> list[tuple[str, str]]:
    """The key the message carries, as an HTTP or gRPC client would send it; its request id if any."""
    headers = msg.headers or {}
    metadata = []
    key = headers.get("Authorization") or headers.get(AUTHORIZATION_HEADER)
    if key:
        metadata.append((AUTHORIZATION_HEADER, key))
    request_id = headers.get("X-Request-Id") or headers.get(REQUEST_ID_HEADER)
    if request_id:
        metadata.append((REQUEST_ID_HEADER, request_id))
    return metadata


def _message_request_id(msg: Msg) -> str:
    """A submit's request id when its body has none: its Nats-Msg-Id, else its place in the stream."""
    msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
    if msg_id and is_request_id(f"nats:{msg_id}"):
        return f"nats:{msg_id}"
    return f"nats:{_sequence(msg)}"


def _sequence(msg: Msg) -> str:
    with contextlib.suppress(Exception):
        return f"{msg.metadata.stream}.{msg.metadata.sequence.stream}"
    return "unknown"


def _status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is not None:
        return status
    return status_pb2.Status(code=err.code().value[0], message=err.details() or "")


def _bad_status(message: str) -> status_pb2.Status:
    return status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=message)


def _error_body(status: status_pb2.Status, protobuf: bool) -> bytes:
    if protobuf:
        return status.SerializeToString()
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    error = json_format.MessageToDict(status, preserving_proto_field_name=True)
    error["code"] = http_status(code)
    error["status"] = code.name
    return json.dumps({"error": error}).encode()
