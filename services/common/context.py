"""Per-request context (request id, principal) carried through contextvars to logs and records."""

from __future__ import annotations

import uuid
from contextvars import ContextVar

from services.common.names import is_request_id

REQUEST_ID_HEADER = "x-request-id"
AUTHORIZATION_HEADER = "authorization"
# Envoy sets these on every request it forwards: the service token (as `Bearer <token>`) proves that
# the client address beside it was written by Envoy, not by a caller on a service port.
EDGE_HEADER = "x-ferry-edge"
CLIENT_ADDRESS_HEADER = "x-ferry-client-address"
# The caller as Envoy's edge check (the gateway) established it; trusted with the edge token only.
PRINCIPAL_HEADER = "x-ferry-principal"

request_id_var: ContextVar[str] = ContextVar("request_id", default="")


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """Keep a client's request id when it is well formed; otherwise assign a fresh one."""
    if value and is_request_id(value):
        return value
    return new_request_id()


def metadata_value(metadata: object, key: str) -> str | None:
    """First value of `key` in gRPC invocation metadata (a sequence of (key, value) pairs)."""
    for item in metadata or ():  # type: ignore[attr-defined]
        k, v = item[0], item[1]
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def bearer_token(header: str | None) -> str:
    """The key in `authorization: Bearer <key>`; empty when absent or another scheme."""
    if not header:
        return ""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
