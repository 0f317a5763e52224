"""The asyncio client: the same as `Client` on a grpc.aio channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from ferry.audit.v1 import audit_pb2_grpc
from ferry.conversations.v1 import conversations_pb2_grpc
from ferry.grammars.v1 import grammars_pb2_grpc
from ferry.inference.v1 import inference_pb2_grpc
from ferry.jobs.v1 import jobs_pb2_grpc
from ferry.keys.v1 import keys_pb2_grpc
from ferry.models.v1 import models_pb2_grpc
from ferry.openai.v1 import openai_pb2_grpc
from ferry.transactions.v1 import transactions_pb2_grpc

from ferry_client._base import DEFAULT_TIMEOUT, CallPlan, MetadataItems, Settings
from ferry_client._health import AsyncHealthStub
from ferry_client._policy import RetryPolicy
from ferry_client.errors import from_rpc_error

T = TypeVar("T")


def _details(details: Any, plan: CallPlan, timeout: float | None) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=timeout,
        metadata=grpc.aio.Metadata(*plan.metadata),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


def _method(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class _Unary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        plan = CallPlan(self.settings, _method(details), details.timeout, details.metadata, request)
        attempt = 0
        timeout = plan.timeout
        while True:
            call = await continuation(_details(details, plan, timeout), plan.request)
            try:
                return await call
            except grpc.RpcError as err:
                ferry_error = from_rpc_error(err)
            delay = plan.hint_delay(ferry_error, attempt)
            if delay is None:
                raise ferry_error
            await asyncio.sleep(delay)
            attempt += 1
            timeout = plan.attempt_timeout()


class _Streaming(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        plan = CallPlan(self.settings, _method(details), details.timeout, details.metadata, request)
        call = await continuation(_details(details, plan, plan.timeout), plan.request)
        return _converted(call)


async def _converted(call: Any) -> AsyncIterator[Any]:
    try:
        async for response in call:
            yield response
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


class AsyncStream(Generic[T]):
    """A server-streaming call of the AsyncClient, for `async with`: leaving the block, `break` inside
    it or `aclose()` cancels the call (ferry frees the engine slot). Errors are `FerryError`s."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._iterator: AsyncIterator[T] | None = None

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._iterator is None:
            self._iterator = self._call.__aiter__()
        try:
            return await self._iterator.__anext__()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancels the call unless it has ended (idempotent)."""
        if not self._call.done():
            self._call.cancel()

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def done(self) -> bool:
        return bool(self._call.done())

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()  # type: ignore[no-any-return]

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()


def astream(call: AsyncIterable[T]) -> AsyncStream[T]:
    """`async with ferry_client.astream(client.inference.GenerateStream(request)) as pieces:`"""
    return AsyncStream(call)


class AsyncClient:
    """`Client` for asyncio: the same arguments; the stubs are grpc.aio's (await unary calls,
    `async for` streams). Use it as `async with AsyncClient() as ferry:` or `await close()`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: bool | RetryPolicy = True,
        metadata: MetadataItems = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = Settings.resolve(
            target, api_key, tls, root_certificates, timeout, retry, metadata, options
        )
        interceptors = [_Unary(self.settings), _Streaming(self.settings)]
        credentials = self.settings.credentials()
        self.channel: grpc.aio.Channel = (
            grpc.aio.secure_channel(
                self.settings.target, credentials, self.settings.channel_options(), interceptors=interceptors
            )
            if credentials is not None
            else grpc.aio.insecure_channel(
                self.settings.target, self.settings.channel_options(), interceptors=interceptors
            )
        )
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.openai = openai_pb2_grpc.OpenAIServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelsServiceStub(self.channel)
        self.transactions = transactions_pb2_grpc.TransactionsServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.keys = keys_pb2_grpc.KeysServiceStub(self.channel)
        self.grammars = grammars_pb2_grpc.GrammarsServiceStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobsServiceStub(self.channel)
        self.conversations = conversations_pb2_grpc.ConversationsServiceStub(self.channel)
        self.health = AsyncHealthStub(self.channel)

    @property
    def target(self) -> str:
        return self.settings.target

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
