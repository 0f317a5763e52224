"""Who may call what: the access table (read from the protos), credentials, and the check that every
service runs on every call through the shared interceptor.

Each ferry RPC declares `option (ferry.auth.v1.access)` with the scopes that grant it. One decision per
request, by the gateway (authenticate the key, check the scope, count the call against its rate limits):
- through Envoy, its edge check (ext_authz) asks the gateway, which answers with the caller's
  Principal; Envoy forwards it (`x-ferry-principal`) beside the service token (`x-ferry-edge`), and the
  service trusts it, re-checking the scope, without another round trip;
- on a service port, the service asks the gateway itself (`AuthService/Authorize`).
ferry's processes call each other with the service token (`auth.service_token`), which grants only
the `internal` scope.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
from contextvars import ContextVar
from functools import lru_cache
from typing import Protocol

import grpc
from ferry.audit.v1 import audit_pb2
from ferry.auth.v1 import auth_pb2, auth_pb2_grpc
from ferry.inference.v1 import inference_pb2
from ferry.keys.v1 import keys_pb2
from ferry.models.v1 import models_pb2
from ferry.openai.v1 import openai_pb2
from ferry.transactions.v1 import transactions_pb2
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError

from services.common.config import AuthSettings, Settings
from services.common.context import AUTHORIZATION_HEADER, PRINCIPAL_HEADER
from services.common.errors import RpcError, relay_error
from services.common.interceptor import UNOBSERVED_SERVICES, Call

log = logging.getLogger(__name__)

INFERENCE, READ, ADMIN, INTERNAL = "inference", "read", "admin", "internal"
# What an API key may hold; `internal` belongs to the service token alone.
KEY_SCOPES = (INFERENCE, READ, ADMIN)
SERVICE_PRINCIPAL = "services/ferry"


# Every ferry API, so that the default descriptor pool knows each method's access option.
PROTO_FILES = (
    audit_pb2,
    auth_pb2,
    inference_pb2,
    keys_pb2,
    models_pb2,
    openai_pb2,
    transactions_pb2,
)

# Services that carry no access option because their protos are not ferry's: Envoy's ext_authz
# check is asked only by Envoy, which sends the service token (`grpc_service.initial_metadata`).
FOREIGN_SERVICE_SCOPES = {"envoy.service.auth.v3.Authorization": frozenset({INTERNAL})}

# The caller of the RPC being handled, for servicers that apply per-key limits (inference).
principal_var: ContextVar[auth_pb2.Principal | None] = ContextVar("principal", default=None)


@lru_cache(maxsize=512)
def required_scopes(full_method: str) -> frozenset[str] | None:
    """Scopes that grant `/package.Service/Method`, any one of them; None for public methods
    (health, reflection). A method without the access option, or unknown, is admin-only."""
    service, _, method = full_method.lstrip("/").partition("/")
    if service in UNOBSERVED_SERVICES:
        return None
    if service in FOREIGN_SERVICE_SCOPES:
        return FOREIGN_SERVICE_SCOPES[service]
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    except KeyError:
        return frozenset({ADMIN})
    if descriptor is None:
        return frozenset({ADMIN})
    access = descriptor.GetOptions().Extensions[auth_pb2.access]
    return frozenset(access.scopes) or frozenset({ADMIN})


def is_service_token(auth: AuthSettings, presented: str) -> bool:
    token = auth.service_token
    return bool(presented and token) and hmac.compare_digest(
        presented.encode(), token.get_secret_value().encode() if token else b""
    )


def service_credentials(auth: AuthSettings) -> tuple[tuple[str, str], ...]:
    """Metadata with which ferry's processes call each other."""
    if not auth.enabled or auth.service_token is None:
        return ()
    return ((AUTHORIZATION_HEADER, f"Bearer {auth.service_token.get_secret_value()}"),)


def peer_address(peer: str) -> str:
    """The IP address in a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


def client_address(call: Call, auth: AuthSettings) -> str:
    """Envoy's word for the client's address when the request came through Envoy, else the peer's."""
    forwarded = call.edge_client_address
    if forwarded and is_service_token(auth, call.edge_token):
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            pass
    return peer_address(call.peer)


KEY_PREFIX = "fry_"


def new_key_secret() -> str:
    """A fresh API key: 256 random bits, recognisable by its prefix (secret scanners, people)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    """What the database keeps instead of a key. A fast hash is enough for 256-bit random secrets
    (no dictionary to try); a bootstrap key chosen by a person should be as long."""
    return hashlib.sha256(secret.encode()).hexdigest()


def encode_principal(principal: auth_pb2.Principal) -> str:
    """The Principal as an HTTP header value (what the gateway hands Envoy for the service)."""
    return base64.urlsafe_b64encode(principal.SerializeToString()).decode()


def edge_principal(call: Call, auth: AuthSettings) -> auth_pb2.Principal | None:
    """The Principal Envoy's edge check established, when the call provably came through Envoy."""
    if not call.edge_principal or not is_service_token(auth, call.edge_token):
        return None
    try:
        return auth_pb2.Principal.FromString(base64.urlsafe_b64decode(call.edge_principal))
    except (ValueError, DecodeError):
        log.warning("ignoring a malformed %s header", PRINCIPAL_HEADER)
        return None


def service_principal() -> auth_pb2.Principal:
    return auth_pb2.Principal(name=SERVICE_PRINCIPAL, display_name="ferry services", scopes=[INTERNAL])


class Authorizer(Protocol):
    async def authorize(self, request: auth_pb2.AuthorizeRequest) -> auth_pb2.Principal:
        """Raises RpcError (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED) to refuse."""
        ...

    async def record_usage(self, request: auth_pb2.RecordUsageRequest) -> None: ...


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
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE,
                "authentication is unavailable (the gateway did not answer); retry shortly",
                "AUTH_UNAVAILABLE",
                retry_after_seconds=1.0,
            ) from None
        return response.principal

    async def record_usage(self, request: auth_pb2.RecordUsageRequest) -> None:
        try:
            await self._client().RecordUsage(request, metadata=self.metadata, timeout=self.TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as err:
            log.warning("gateway %s did not record usage: %s", self.address, err.code().name)


REFUSALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


class AuthObserver:
    """The CallObserver that authenticates and authorizes every call before its servicer runs.

    First among a service's observers, so that the audit observer sees the principal.
    """

    def __init__(self, settings: Settings, authorizer: Authorizer | None = None) -> None:
        self.auth = settings.auth
        self.authorizer: Authorizer = authorizer or RemoteAuthorizer(settings)
        self._background: set[asyncio.Task[None]] = set()

    async def on_start(self, call: Call, request: object) -> None:
        scopes = required_scopes(call.full_method)
        if scopes is None or not self.auth.enabled:
            return
        call.client_address = client_address(call, self.auth)
        if is_service_token(self.auth, call.credential):
            if INTERNAL not in scopes:
                raise permission_denied(call.full_method, scopes)
            principal = service_principal()
        elif INTERNAL in scopes and call.credential:
            # Only ferry's own processes hold the internal scope: no need to ask the gateway.
            raise permission_denied(call.full_method, scopes)
        elif (forwarded := edge_principal(call, self.auth)) is not None:
            # Decided (and counted) at the edge; the scope check is repeated as a second line.
            if not scopes.intersection(forwarded.scopes):
                raise permission_denied(call.full_method, scopes)
            principal = forwarded
        else:
            principal = await self.authorizer.authorize(
                auth_pb2.AuthorizeRequest(
                    api_key=call.credential, method=call.full_method, client_address=call.client_address
                )
            )
        call.principal = principal.name
        principal_var.set(principal)

    async def on_end(self, call: Call) -> None:
        return None

    def record_usage(self, principal: auth_pb2.Principal, address: str, completion_tokens: int) -> None:
        """Counts generated tokens against the caller's tokens-per-minute limits, off the request path."""
        if not self.auth.enabled or principal.name == SERVICE_PRINCIPAL or completion_tokens <= 0:
            return
        if not principal.report_usage:
            return  # no token window to fill (the gateway says): spare it a call
        task = asyncio.create_task(
            self.authorizer.record_usage(
                auth_pb2.RecordUsageRequest(
                    principal=principal.name, client_address=address, completion_tokens=completion_tokens
                )
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def unauthenticated(message: str = "a valid API key is required (Authorization: Bearer <key>)") -> RpcError:
    return RpcError(grpc.StatusCode.UNAUTHENTICATED, message, "UNAUTHENTICATED")


def permission_denied(method: str, scopes: frozenset[str]) -> RpcError:
    wanted = " or ".join(sorted(scopes))
    return RpcError(
        grpc.StatusCode.PERMISSION_DENIED,
        f"this key lacks the scope for {method}: needs {wanted}",
        "SCOPE_MISSING",
        metadata={"method": method, "required_scopes": ",".join(sorted(scopes))},
    )


def rate_limited(what: str, retry_after_seconds: float) -> RpcError:
    return RpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"rate limit reached: {what}; retry after {retry_after_seconds:.0f} s",
        "RATE_LIMITED",
        metadata={"limit": what},
        retry_after_seconds=retry_after_seconds,
    )
