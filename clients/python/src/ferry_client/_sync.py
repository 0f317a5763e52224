"""The synchronous client: one channel, the typed stubs of every service, and the interceptor that
gives every call its key, deadline, request id, retries and typed errors."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

import grpc
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
from ferry_client._health import HealthStub
from ferry_client._policy import RetryPolicy
from ferry_client.errors import FerryError, from_rpc_error

T = TypeVar("T")


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _CallDetails(_Details, grpc.ClientCallDetails):
    pass


class Stream(Generic[T]):
    """A server-streaming call: iterate it for the responses.

    Leaving a `for` loop early (`break`), `close()`, leaving a `with` block or dropping the object
    cancels the call, so ferry stops generating and frees the engine slot. Errors, also mid-stream,
    are `FerryError`s. The grpc.Call methods (`code()`, `trailing_metadata()`...) are there too.
    """

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return next(self._call)  # type: ignore[no-any-return]
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            call.cancel()

    def close(self) -> None:
        """Cancels the call unless it has ended (idempotent)."""
        if not self._call.done():
            self._call.cancel()

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def done(self) -> bool:
        return bool(self._call.done())

    def is_active(self) -> bool:
        return bool(self._call.is_active())

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return bool(self._call.add_callback(callback))

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> grpc.StatusCode | None:
        return self._call.code()  # type: ignore[no-any-return]

    def details(self) -> str | None:
        return self._call.details()  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        # The rest of the underlying call's surface (grpc.Future's result(), exception(), ...).
        if name == "_call":
            raise AttributeError(name)
        return getattr(self._call, name)


def stream(call: Iterator[T]) -> Stream[T]:
    """The typed `Stream` of a server-streaming call, for `with` blocks:
    `with ferry_client.stream(client.inference.GenerateStream(request)) as pieces: ...`."""
    return call if isinstance(call, Stream) else Stream(call)


class _Interceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _plan(self, details: grpc.ClientCallDetails, request: Any) -> tuple[CallPlan, _CallDetails]:
        plan = CallPlan(self.settings, details.method, details.timeout, details.metadata, request)
        new = _CallDetails(
            details.method,
            plan.timeout,
            plan.metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        return plan, new

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        plan, new = self._plan(details, request)
        attempt = 0
        while True:
            outcome = continuation(new, plan.request)
            err = outcome if isinstance(outcome, grpc.RpcError) else outcome.exception()
            if err is None:
                return outcome
            if not isinstance(err, grpc.RpcError):
                return outcome  # not a gRPC failure: let it raise as it is
            ferry_error = from_rpc_error(err)
            delay = plan.hint_delay(ferry_error, attempt)
            if delay is None:
                raise ferry_error from None
            time.sleep(delay)
            attempt += 1
            new = new._replace(timeout=plan.attempt_timeout())

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        plan, new = self._plan(details, request)
        return Stream(continuation(new, plan.request))


class Client:
    """ferry's gRPC API over one channel (Envoy's listener serves every service).

    `target`: host:port (default `$FERRY_TARGET`, else localhost:8080); `api_key` (default
    `$FERRY_API_KEY`) goes as `authorization: Bearer <key>` on every call; `tls` / `root_certificates`
    for a TLS channel; `timeout`: the deadline in seconds of every call that sets none (None: no
    deadline); `retry`: True (the default `RetryPolicy`), a `RetryPolicy`, or False; `metadata`: sent
    on every call; `options`: extra gRPC channel arguments.
    """

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
        credentials = self.settings.credentials()
        raw = (
            grpc.secure_channel(self.settings.target, credentials, self.settings.channel_options())
            if credentials is not None
            else grpc.insecure_channel(self.settings.target, self.settings.channel_options())
        )
        self._raw_channel = raw
        self.channel: grpc.Channel = grpc.intercept_channel(raw, _Interceptor(self.settings))
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.openai = openai_pb2_grpc.OpenAIServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelsServiceStub(self.channel)
        self.transactions = transactions_pb2_grpc.TransactionsServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.keys = keys_pb2_grpc.KeysServiceStub(self.channel)
        self.grammars = grammars_pb2_grpc.GrammarsServiceStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobsServiceStub(self.channel)
        self.conversations = conversations_pb2_grpc.ConversationsServiceStub(self.channel)
        self.health = HealthStub(self.channel)

    @property
    def target(self) -> str:
        return self.settings.target

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["Client", "FerryError", "Stream", "stream"]
