"""What the sync and asyncio clients share: settings, metadata, request ids, channel options."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ferry_client._policy import DEFAULT_RETRY, REQUEST_ID_FIELD, RetryPolicy, retried_methods
from ferry_client.errors import REQUEST_ID_HEADER, FerryError

DEFAULT_TARGET = "localhost:8080"
DEFAULT_TIMEOUT = 30.0
TARGET_ENV = "FERRY_TARGET"
API_KEY_ENV = "FERRY_API_KEY"
USER_AGENT = "ferry-client/0.1.0"

Req = TypeVar("Req")
MetadataItems = Sequence[tuple[str, str | bytes]]


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Settings:
    target: str
    api_key: str
    tls: bool
    root_certificates: bytes | None
    timeout: float | None
    retry: RetryPolicy | None
    metadata: tuple[tuple[str, str | bytes], ...]
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def resolve(
        cls,
        target: str | None,
        api_key: str | None,
        tls: bool,
        root_certificates: bytes | None,
        timeout: float | None,
        retry: bool | RetryPolicy,
        metadata: MetadataItems,
        options: Sequence[tuple[str, Any]],
    ) -> Settings:
        policy = DEFAULT_RETRY if retry is True else (retry or None)
        return cls(
            target=target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
            api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV, ""),
            tls=tls or root_certificates is not None,
            root_certificates=root_certificates,
            timeout=timeout,
            retry=policy if isinstance(policy, RetryPolicy) else None,
            metadata=tuple((k.lower(), v) for k, v in metadata),
            options=tuple(options),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [("grpc.primary_user_agent", USER_AGENT)]
        if self.retry is not None:
            options += [("grpc.enable_retries", 1), ("grpc.service_config", self.retry.service_config())]
        else:
            options.append(("grpc.enable_retries", 0))
        return options + list(self.options)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)


class CallPlan:
    """One call's metadata, deadline and request, and whether ferry's retry hints apply to it."""

    RETRIED = retried_methods()

    def __init__(
        self,
        settings: Settings,
        method: str,
        timeout: float | None,
        metadata: MetadataItems | None,
        request: Any,
    ) -> None:
        self.method = method
        self.timeout = timeout if timeout is not None else settings.timeout
        self.deadline = time.monotonic() + self.timeout if self.timeout is not None else None
        items: list[tuple[str, str | bytes]] = list(settings.metadata)
        given = list(metadata or ())
        names = {k.lower() for k, _ in given}
        if settings.api_key and "authorization" not in names:
            items.append(("authorization", f"Bearer {settings.api_key}"))
        items += given
        self.request = request
        self.request_id = ""
        if method in REQUEST_ID_FIELD:
            self.request_id, self.request = _with_request_id(request, REQUEST_ID_FIELD[method], items)
            if REQUEST_ID_HEADER not in {k.lower() for k, _ in items}:
                items.append((REQUEST_ID_HEADER, self.request_id))
        self.metadata: tuple[tuple[str, str | bytes], ...] = tuple(items)
        self.retry = settings.retry if method in self.RETRIED else None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def hint_delay(self, err: FerryError, attempt: int) -> float | None:
        """Seconds to wait before trying again as ferry asked, or None to give up."""
        policy = self.retry
        if policy is None or err.retry_delay is None or attempt >= policy.hint_attempts:
            return None
        if err.code() not in policy.hint_status_codes or err.retry_delay > policy.max_hint_delay:
            return None
        remaining = self.remaining()
        if remaining is not None and err.retry_delay >= remaining - 0.05:
            return None
        return err.retry_delay

    def attempt_timeout(self) -> float | None:
        remaining = self.remaining()
        return None if remaining is None else max(0.001, remaining)


def _with_request_id(
    request: Any, field: str | None, metadata: list[tuple[str, str | bytes]]
) -> tuple[str, Any]:
    """The call's request id: the request's own, else the caller's `x-request-id` (left for the server
    to read, as it would without the client), else a new one written into the request's field."""
    header = next((v for k, v in metadata if k.lower() == REQUEST_ID_HEADER), None)
    current = getattr(request, field, "") if field else ""
    if current:
        return str(current), request
    if header:
        return (header.decode() if isinstance(header, bytes) else header), request
    request_id = new_request_id()
    if field is None or not hasattr(request, "CopyFrom"):
        return request_id, request
    copy = type(request)()
    copy.CopyFrom(request)
    setattr(copy, field, request_id)
    return request_id, copy
