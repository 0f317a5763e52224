"""The signing secret of the key that created a job, asked of the gateway (KeysService/
GetWebhookSecret, internal) and kept in memory for `webhooks.secret_cache_seconds`.

The gateway holds the secrets sealed with the master key; only ferry's processes, with the service
token, get one back in plaintext, and only to sign.
"""

from __future__ import annotations

import time

import grpc
from ferry.keys.v1 import keys_pb2, keys_pb2_grpc

from services.common.config import Settings
from services.common.errors import Reason, RpcError, relay_error, rpc_error
from services.common.names import KEYS
from services.common.tokens import service_credentials


class SigningSecrets:
    TIMEOUT_SECONDS = 5.0

    def __init__(self, settings: Settings) -> None:
        self.address = settings.gateway.address
        self.metadata = service_credentials(settings.auth)
        self.ttl = settings.webhooks.secret_cache_seconds
        self._stub: keys_pb2_grpc.KeysServiceStub | None = None
        self._cache: dict[str, tuple[float, str]] = {}

    def _client(self) -> keys_pb2_grpc.KeysServiceStub:
        # Created on first use: a grpc.aio channel belongs to the running event loop.
        if self._stub is None:
            self._stub = keys_pb2_grpc.KeysServiceStub(grpc.aio.insecure_channel(self.address))
        return self._stub

    async def secret_for(self, creator: str) -> str:
        """`whsec_...` of the key `creator` (`keys/{id}`). RpcError: WEBHOOK_SECRET_MISSING when it has
        none (or the creator is not a key), KEY_NOT_FOUND, AUTH_UNAVAILABLE when the gateway is away."""
        if not creator.startswith(f"{KEYS}/"):
            raise rpc_error(
                Reason.WEBHOOK_SECRET_MISSING,
                f"{creator or 'an anonymous caller'} has no webhook signing secret: webhooks are signed"
                " with the secret of the API key that created the job",
            )
        cached = self._cache.get(creator)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            reply = await self._client().GetWebhookSecret(
                keys_pb2.GetWebhookSecretRequest(name=creator),
                metadata=self.metadata,
                timeout=self.TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                raise relay_error(err) from None
            raise rpc_error(
                Reason.AUTH_UNAVAILABLE,
                f"the gateway did not give the webhook signing secret ({err.code().name}); retry shortly",
            ) from None
        if self.ttl > 0:
            self._cache[creator] = (time.monotonic() + self.ttl, reply.secret)
        return str(reply.secret)

    def forget(self, creator: str) -> None:
        self._cache.pop(creator, None)


def describe(err: RpcError) -> str:
    return f"{err.reason}: {err.message}"
