"""The check every service runs on every call, through the shared interceptor.

One decision per request, by the gateway (authenticate the key, check the scope, count the call
against its rate limits):
- through Envoy, its edge check (ext_authz) asks the gateway, which answers with the caller's
  Principal; Envoy forwards it (`x-ferry-principal`) beside the service token (`x-ferry-edge`), and the
  service trusts it (services/common/edge.py), re-checking the scope, without another round trip;
- on a service port, the service asks the gateway itself (services/common/gateway_client.py).
ferry's processes call each other with the service token (services/common/tokens.py), which grants
only the `internal` scope (services/common/access.py).
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Protocol

from ferry.auth.v1 import auth_pb2

from services.common.access import INTERNAL, UNVERIFIED_PRINCIPAL, required_scopes
from services.common.config import Settings
from services.common.edge import client_address, edge_principal
from services.common.errors import permission_denied
from services.common.gateway_client import RemoteAuthorizer
from services.common.interceptor import Call
from services.common.tokens import SERVICE_PRINCIPAL, is_service_token, service_principal

# The caller of the RPC being handled, for servicers that apply per-key limits (inference).
principal_var: ContextVar[auth_pb2.Principal | None] = ContextVar("principal", default=None)


class Authorizer(Protocol):
    async def authorize(self, request: auth_pb2.AuthorizeRequest) -> auth_pb2.Principal:
        """Raises RpcError (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED) to refuse."""
        ...

    async def record_usage(self, request: auth_pb2.RecordUsageRequest) -> None: ...


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
        if not scopes:
            # Self-authenticated (a signed webhook): no key is asked for, a key sent grants nothing,
            # and the servicer refuses the call unless its own check passes, then names the caller.
            principal = auth_pb2.Principal(name=UNVERIFIED_PRINCIPAL)
        elif is_service_token(self.auth, call.credential):
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
