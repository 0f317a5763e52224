"""The gateway's AuthService as the other services call it: authorize a call, report token usage."""

from __future__ import annotations

import logging

import grpc
from ferry.auth.v1 import auth_pb2, auth_pb2_grpc

from services.common.config import Settings
from services.common.errors import Reason, relay_error, rpc_error
from services.common.tokens import service_credentials

log = logging.getLogger(__name__)

# The gateway's refusals, relayed to the caller as they are; any other failure is AUTH_UNAVAILABLE.
REFUSALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


class RemoteAuthorizer:
    """Asks the gateway over gRPC (every service but the gateway itself)."""

    TIMEOUT_SECONDS = 2.0

    def __init__(self, settings: Settings) -> None:
        self.address = settings.gateway.address
        self.metadata = service_credentials(settings.auth)
        self._stub: auth_pb2_grpc.AuthServiceStub | None = None

    def _client(self) -> auth_pb2_grpc.AuthServiceStub:
        # Created on first use: a grpc.aio channel belongs to the running event loop.
        if self._stub is None:
            self._stub = auth_pb2_grpc.AuthServiceStub(grpc.aio.insecure_channel(self.address))
        return self._stub

    async def authorize(self, request: auth_pb2.AuthorizeRequest) -> auth_pb2.Principal:
        try:
            response = await self._client().Authorize(
                request, metadata=self.metadata, timeout=self.TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in REFUSALS:
                raise relay_error(err) from None
            log.warning("gateway %s did not answer Authorize: %s", self.address, err.code().name)
            raise rpc_error(
                Reason.AUTH_UNAVAILABLE,
                "authentication is unavailable (the gateway did not answer); retry shortly",
            ) from None
        return response.principal

    async def record_usage(self, request: auth_pb2.RecordUsageRequest) -> None:
        try:
            await self._client().RecordUsage(request, metadata=self.metadata, timeout=self.TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as err:
            log.warning("gateway %s did not record usage: %s", self.address, err.code().name)
