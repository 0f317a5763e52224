"""The secrets callers present: the service token ferry's processes share, and API key secrets."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from ferry.auth.v1 import auth_pb2

from services.common.access import INTERNAL
from services.common.config import AuthSettings
from services.common.context import AUTHORIZATION_HEADER

# Who calls with the service token; it holds the `internal` scope alone.
SERVICE_PRINCIPAL = "services/ferry"
KEY_PREFIX = "fry_"


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


def service_principal() -> auth_pb2.Principal:
    return auth_pb2.Principal(name=SERVICE_PRINCIPAL, display_name="ferry services", scopes=[INTERNAL])


def new_key_secret() -> str:
    """A fresh API key: 256 random bits, recognisable by its prefix (secret scanners, people)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    """What the database keeps instead of a key. A fast hash is enough for 256-bit random secrets
    (no dictionary to try); a bootstrap key chosen by a person should be as long."""
    return hashlib.sha256(secret.encode()).hexdigest()
