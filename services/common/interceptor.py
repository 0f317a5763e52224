"""The one server interceptor every service runs: request ids, drain, metrics, rich errors, observers.

Observers (audit, authentication) plug in here so that every RPC of every service passes the same
checks whether it arrives through Envoy or directly on a service port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from services.common.context import (
    AUTHORIZATION_HEADER,
    CLIENT_ADDRESS_HEADER,
    EDGE_HEADER,
    PRINCIPAL_HEADER,
    REQUEST_ID_HEADER,
    accept_request_id,
    bearer_token,
    request_id_var,
)
from services.common.errors import (
    OPENAI_ERROR_METADATA,
    Reason,
    RpcError,
    internal_error,
    openai_error_json,
    rpc_error,
)
from services.common.metrics import RPC_HANDLED, RPC_IN_FLIGHT, RPC_LATENCY, child

log = logging.getLogger(__name__)

# Infrastructure services answer during drain and are not counted as in-flight work.
UNOBSERVED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# Services whose REST paths are OpenAI's (/v1/*): their errors also carry OpenAI's error JSON
# (errors.OPENAI_ERROR_METADATA), which ferry.lua makes the REST body.
OPENAI_SERVICES = frozenset({"ferry.openai.v1.OpenAIService"})
# The top-level fields of a REST body as the caller sent them (ferry.lua): those the request message
# does not define were dropped by Envoy's transcoder, and are logged at debug level.
BODY_FIELDS_HEADER = "x-ferry-body-fields"


@dataclass
class Call:
    """What observers learn about one RPC."""

    service: str
    method: str
    request_id: str
    peer: str
    metadata: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    principal: str = "anonymous"
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    # The presented key and Envoy's forwarded-client headers: kept out of `metadata` (and repr),
    # so that nothing that logs or records a call can leak them.
    credential: str = field(default="", repr=False)
    edge_token: str = field(default="", repr=False)
    edge_client_address: str = ""
    edge_principal: str = field(default="", repr=False)
    # The client's IP address as authentication established it.
    client_address: str = ""
    # A response message went out: an error now ends a started response (a stream's trailers).
    responded: bool = False
    # The top-level fields of the REST body, comma-separated (BODY_FIELDS_HEADER); empty for gRPC.
    body_fields: str = ""

    @property
    def full_method(self) -> str:
        return f"/{self.service}/{self.method}"


# The RPC being handled, for servicers that record who called what (principal, full method).
current_call: ContextVar[Call | None] = ContextVar("current_call", default=None)


class CallObserver(Protocol):
    async def on_start(self, call: Call, request: Any) -> None:
        """May raise RpcError to refuse the call before the servicer runs."""

    async def on_end(self, call: Call) -> None: ...


class Lifecycle:
    """Tracks in-flight RPCs so that a drain can wait for them, and refuses new work while draining."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class ServingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, lifecycle: Lifecycle, observers: list[CallObserver] | None = None) -> None:
        self.lifecycle = lifecycle
        self.observers = observers or []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service, _, method = details.method.lstrip("/").partition("/")  # type: ignore[attr-defined]
        if handler is None or service in UNOBSERVED_SERVICES:
            return handler
        return _wrap(handler, service, method, self)

    def _start(self, service: str, method: str, context: grpc.aio.ServicerContext) -> Call:
        metadata = {
            k: (v if isinstance(v, str) else "<binary>") for k, v in context.invocation_metadata() or ()
        }
        rid = accept_request_id(metadata.get(REQUEST_ID_HEADER))
        request_id_var.set(rid)
        call = Call(
            service=service,
            method=method,
            request_id=rid,
            peer=context.peer(),
            metadata=metadata,
            credential=bearer_token(metadata.pop(AUTHORIZATION_HEADER, None)),
            edge_token=bearer_token(metadata.pop(EDGE_HEADER, None)),
            edge_client_address=metadata.pop(CLIENT_ADDRESS_HEADER, ""),
            edge_principal=metadata.pop(PRINCIPAL_HEADER, ""),
            body_fields=metadata.pop(BODY_FIELDS_HEADER, ""),
        )
        current_call.set(call)
        return call

    @asynccontextmanager
    async def observed(
        self, call: Call, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """The shared bookkeeping around one RPC body (unary or streaming)."""
        context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
        self.lifecycle.enter()
        child(RPC_IN_FLIGHT, call.service).inc()
        try:
            if self.lifecycle.draining:
                raise rpc_error(Reason.DRAINING, "server is shutting down")
            if call.body_fields and isinstance(request, Message) and log.isEnabledFor(logging.DEBUG):
                ignored = undefined_fields(request, call.body_fields.split(","))
                if ignored:
                    log.debug(
                        "%s: ignored fields the API does not define: %s", call.method, ", ".join(ignored)
                    )
            for observer in self.observers:
                await observer.on_start(call, request)
            # After authentication: an anonymous caller learns nothing about the method's messages.
            if isinstance(request, UndecodableRequest):
                raise rpc_error(Reason.INVALID_ARGUMENT, request.message)
            yield
            code = context.code()
            call.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
        except RpcError as err:
            await _abort(call, context, err)
        except grpc.aio.AbortError:
            code = context.code()
            call.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):
            call.code, call.message = grpc.StatusCode.CANCELLED, "cancelled by the client"
            raise
        except Exception as exc:
            log.exception("unhandled error in %s", call.full_method)
            await _abort(call, context, internal_error(exc))
        finally:
            elapsed = time.monotonic() - call.started
            labels = (call.service, call.method, call.code.name)
            child(RPC_HANDLED, *labels).inc()
            child(RPC_LATENCY, *labels).observe(elapsed)
            child(RPC_IN_FLIGHT, call.service).dec()
            self.lifecycle.leave()
            for observer in self.observers:
                try:
                    await observer.on_end(call)
                except Exception:
                    log.exception("call observer failed")

    async def run(
        self, call: Call, request: Any, context: grpc.aio.ServicerContext, body: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Runs one unary-response RPC body with the shared bookkeeping around it."""
        async with self.observed(call, request, context):
            return await body()


def undefined_fields(request: Message, sent: list[str]) -> list[str]:
    """The fields in `sent` that the request message does not have, by proto or JSON name."""
    fields = request.DESCRIPTOR.fields
    defined = {f.name for f in fields} | {f.json_name for f in fields}
    return [name for name in sent if name not in defined]


async def _abort(call: Call, context: grpc.aio.ServicerContext, err: RpcError) -> None:
    call.code, call.message = err.code, err.message
    status = err.to_status()
    # abort replaces the trailing metadata set by `observed`: the request id goes with the status.
    metadata = [*status.trailing_metadata, (REQUEST_ID_HEADER, call.request_id)]  # type: ignore[attr-defined]
    # Before any response message the error is the whole REST answer; once a stream has started, its
    # last event already carried the error (services/inference/openai_api/chunks.py).
    if call.service in OPENAI_SERVICES and not call.responded:
        metadata.append((OPENAI_ERROR_METADATA, openai_error_json(err)))
    await context.abort_with_status(status._replace(trailing_metadata=tuple(metadata)))  # type: ignore[attr-defined]


class UndecodableRequest:
    """A request payload that does not parse as the method's message. gRPC would answer UNKNOWN for
    the deserializer's exception before any ferry code runs; as this placeholder it reaches
    `observed`, which refuses it with INVALID_ARGUMENT once the caller is authenticated (audited and
    counted like any refusal)."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"the request is not a valid serialized {type_name} message ({error})"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return UndecodableRequest(type_name, exc)

    return parse


# Handler field and factory by (request streaming, response streaming).
_HANDLERS: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _wrap(
    handler: grpc.RpcMethodHandler, service: str, method: str, interceptor: ServingInterceptor
) -> grpc.RpcMethodHandler:
    field, factory = _HANDLERS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    inner = getattr(handler, field)
    # Observers see the request message of unary-request RPCs; a request stream is the servicer's.
    observed = (lambda request: None) if handler.request_streaming else (lambda request: request)

    async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = interceptor._start(service, method, context)
        return await interceptor.run(call, observed(request), context, lambda: inner(request, context))

    async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # A streaming-response RPC body with the same bookkeeping, relayed right here (one async
        # generator per message, not two). An async generator, not a coroutine using context.write,
        # because other interceptors (OpenTelemetry's) iterate streaming handlers with `async for`;
        # errors raised mid-stream still pass through `observed` and end the stream with their rich
        # status.
        call = interceptor._start(service, method, context)
        async with interceptor.observed(call, observed(request), context):
            async for item in inner(request, context):
                call.responded = True
                yield item

    behavior = stream_response if handler.response_streaming else unary_response
    deserializer = handler.request_deserializer
    if not handler.request_streaming:
        deserializer = _tolerant(deserializer)
    return factory(behavior, deserializer, handler.response_serializer)
