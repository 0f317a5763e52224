"""What Envoy (the edge) tells a service about a request, trusted only beside the service token.

Envoy forwards the caller's address (`x-ferry-client-address`) and the Principal its edge check
established (`x-ferry-principal`) with the service token (`x-ferry-edge`); a caller on a service port
cannot forge them without that token.
"""

from __future__ import annotations

import base64
import ipaddress
import logging

from ferry.auth.v1 import auth_pb2
from google.protobuf.message import DecodeError

from services.common.config import AuthSettings
from services.common.context import EDGE_HEADER, PRINCIPAL_HEADER
from services.common.interceptor import Call
from services.common.tokens import is_service_token

log = logging.getLogger(__name__)


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


def encode_principal(principal: auth_pb2.Principal) -> str:
    """The Principal as an HTTP header value (what the gateway hands Envoy for the service)."""
    return base64.urlsafe_b64encode(principal.SerializeToString()).decode()


def on_behalf_metadata(auth: AuthSettings, principal: auth_pb2.Principal | None) -> list[tuple[str, str]]:
    """Metadata with which a ferry process calls another on a caller's behalf: the caller's Principal
    beside the service token, as Envoy forwards it, so the callee checks the caller's own scopes and
    records the call as theirs. Empty with authentication off (or no principal)."""
    token = auth.service_token
    if not auth.enabled or token is None or principal is None:
        return []
    return [
        (EDGE_HEADER, f"Bearer {token.get_secret_value()}"),
        (PRINCIPAL_HEADER, encode_principal(principal)),
    ]


def edge_principal(call: Call, auth: AuthSettings) -> auth_pb2.Principal | None:
    """The Principal Envoy's edge check established, when the call provably came through Envoy."""
    if not call.edge_principal or not is_service_token(auth, call.edge_token):
        return None
    try:
        return auth_pb2.Principal.FromString(base64.urlsafe_b64decode(call.edge_principal))
    except (ValueError, DecodeError):
        log.warning("ignoring a malformed %s header", PRINCIPAL_HEADER)
        return None
