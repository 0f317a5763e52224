"""Envoy's edge check (`envoy.service.auth.v3.Authorization/Check`, the ext_authz filter).

Envoy asks after its transcoder, so the request path is the gRPC method for REST and gRPC alike. This
is the request's one decision: authenticate, check the scope, count it against the rate limits; it
may also lease Envoy the same decision for more requests of the key (gateway/edge_lease.py). An
allowed request goes on with the caller's Principal (`x-ferry-principal`), which the service trusts
because Envoy also sends it the service token, so it does not ask the gateway again.
A refusal carries an HTTP status and OpenAI's error JSON as its body (errors.openai_error); for gRPC
requests Envoy turns the status into grpc-status (401 -> UNAUTHENTICATED, 403 -> PERMISSION_DENIED);
`x-ferry-grpc-status` tells the Lua filter the right code where Envoy's mapping has none
(429 -> RESOURCE_EXHAUSTED); a retryable refusal (429, or 503 while the key store is down) also
carries its google.rpc.RetryInfo for gRPC callers.
"""

from __future__ import annotations

import base64
import json
import logging
import math

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from ferry.auth.v1 import auth_pb2
from google.rpc import code_pb2, status_pb2
from opentelemetry import trace

from gateway import edge_lease
from gateway.authorizer import PUBLIC_PRINCIPAL, REFUSED_KEY, LocalAuthorizer
from gateway.edge_lease import EdgeLease
from services.common.context import (
    AUTHORIZATION_HEADER,
    CLIENT_ADDRESS_HEADER,
    PRINCIPAL_HEADER,
    bearer_token,
)
from services.common.edge import encode_principal
from services.common.errors import RpcError, openai_error
from services.recording import Recorder

log = logging.getLogger(__name__)

# Read (and removed) by envoy/ferry.lua: the grpc-status a gRPC caller should see for a refusal.
GRPC_STATUS_HINT = "x-ferry-grpc-status"
GRPC_DETAILS = "grpc-status-details-bin"
SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name


class EnvoyAuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, authorizer: LocalAuthorizer, recorder: Recorder) -> None:
        self.authorizer = authorizer
        self.recorder = recorder
        self.leases = edge_lease.LeaseGrantor(authorizer)

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        method = http.path.partition("?")[0]
        # This Check's server span (a child of Envoy's ext_authz span when Envoy traces): what was
        # checked and the decision; never the key itself (the principal is the key's name, keys/{id}).
        span = trace.get_current_span()
        span.set_attribute("ferry.auth.checked_method", method)
        check = auth_pb2.AuthorizeRequest(
            api_key=bearer_token(http.headers.get(AUTHORIZATION_HEADER)),
            method=method,
            client_address=client_address(request),
        )
        try:
            principal = await self.authorizer.authorize(check)
        except RpcError as err:
            # Checks are internal calls, not audited one by one (the service behind audits each call
            # it gets); a refusal at the edge never reaches a service, so it is audited here.
            self.recorder.operational(
                "edge.deny",
                principal=err.metadata.get(REFUSED_KEY, PUBLIC_PRINCIPAL),
                resource=method,
                code=getattr(code_pb2, err.code.name),
                message=err.message,
                request_id=http.headers.get("x-request-id", ""),
                attributes={"client_address": client_address(request)},
            )
            span.set_attributes({"ferry.auth.decision": "deny", "ferry.auth.reason": err.reason})
            return denied(err)
        span.set_attributes({"ferry.auth.decision": "allow", "enduser.id": principal.name})
        lease = None
        if http.headers.get(edge_lease.LEASE_HEADER) == edge_lease.WANT_LEASE:
            lease = await self.leases.grant(check, principal)
        if lease is not None:
            span.set_attribute("ferry.auth.lease_requests", lease.requests)
        return allowed(principal, lease)


def client_address(request: external_auth_pb2.CheckRequest) -> str:
    """The client's address as Envoy established it (ferry.lua writes it over anything a client sent,
    honouring `envoy.xff_num_trusted_hops`), so the check counts by the address the service is told;
    the TCP peer when the header is missing."""
    forwarded = request.attributes.request.http.headers.get(CLIENT_ADDRESS_HEADER, "")
    return forwarded or request.attributes.source.address.socket_address.address


def allowed(principal: auth_pb2.Principal, lease: EdgeLease | None = None) -> external_auth_pb2.CheckResponse:
    headers = []
    if principal.scopes:  # public methods (health) have no caller to forward
        headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=PRINCIPAL_HEADER, value=encode_principal(principal)),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(headers=headers),
        # The lease, if any, for envoy/edge_lease.lua (gateway/edge_lease.py).
        dynamic_metadata=lease.metadata() if lease is not None else None,
    )


def denied(err: RpcError) -> external_auth_pb2.CheckResponse:
    # HTTP status and OpenAI error type from the error catalogue (docs/errors.md).
    http_status = err.http_status
    if http_status >= 500:
        log.warning("edge check failed: %s %s", err.code.name, err.message)
    headers = [("content-type", "application/json")]
    if http_status == 401:
        headers.append(("www-authenticate", 'Bearer realm="ferry"'))
    if err.retry_after_seconds is not None:
        headers.append(("retry-after", str(max(1, math.ceil(err.retry_after_seconds)))))
    if err.retry_after_seconds is not None:
        # gRPC callers get what a service would answer: its code (RESOURCE_EXHAUSTED for a rate
        # limit, UNAVAILABLE when the key store is down) with RetryInfo.
        headers.append((GRPC_STATUS_HINT, str(getattr(code_pb2, err.code.name))))
        details = dict(err.to_status().trailing_metadata)[GRPC_DETAILS]  # type: ignore[attr-defined]
        headers.append((GRPC_DETAILS, base64.b64encode(details).decode()))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=getattr(code_pb2, err.code.name), message=err.message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),  # type: ignore[arg-type]
            headers=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v)) for k, v in headers
            ],
            body=json.dumps(openai_error(err)),
        ),
    )
