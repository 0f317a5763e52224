"""The secrets a local run needs when authentication is on: the service token and the admin key.

The service token (what ferry's processes and Envoy show each other) is fresh on every start unless
the settings name one. The admin key is the first API key: `FERRY_BOOTSTRAP_ADMIN_KEY` when set (no
file is written), else the content of `<home>/admin.key`, else a new key saved there (mode 0600) and
shown once. The gateway inserts it when absent and leaves it alone otherwise, so a revoked admin key
stays revoked.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from services.common.config import Settings
from services.common.tokens import new_key_secret

ADMIN_KEY_NAME = "admin.key"


@dataclass(frozen=True)
class AdminKey:
    secret: str
    # Where it is kept; None when it came from the settings (FERRY_BOOTSTRAP_ADMIN_KEY).
    path: Path | None
    # Made by this start: the start-up banner shows it, once.
    created: bool


def admin_key_path(settings: Settings) -> Path:
    return settings.home / ADMIN_KEY_NAME


def ensure_admin_key(settings: Settings) -> AdminKey:
    """The admin key to bootstrap: from the settings, from `<home>/admin.key`, or a new one saved there."""
    if settings.bootstrap_admin_key is not None:
        return AdminKey(settings.bootstrap_admin_key.get_secret_value(), None, created=False)
    path = admin_key_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_key_secret()
    try:
        # O_EXCL: two launchers starting at once must not overwrite each other's key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            # Copied or restored with loose permissions: the key is the keys to everything.
            path.chmod(0o600)
        existing = path.read_text().strip()
        if not existing:
            raise ValueError(f"{path} is empty: delete it to have a new admin key made") from None
        return AdminKey(existing, path, created=False)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return AdminKey(secret, path, created=True)


def with_credentials(settings: Settings) -> tuple[Settings, AdminKey | None]:
    """`settings` with a service token and a bootstrap admin key filled in when auth is on."""
    if not settings.auth.enabled:
        return settings, None
    auth = settings.auth
    if auth.service_token is None:
        auth = auth.model_copy(update={"service_token": SecretStr(secrets.token_urlsafe(32))})
    admin = ensure_admin_key(settings)
    updated = settings.model_copy(update={"auth": auth, "bootstrap_admin_key": SecretStr(admin.secret)})
    return updated, admin


def with_triton_secret(settings: Settings) -> Settings:
    """`settings` with a fresh Triton access secret for this start, unless the settings name one.

    Triton answers everything but health only to callers that show it (launcher/triton.py
    `restricted_flags`); the launcher hands it to ferry's processes through their environment.
    """
    triton = settings.triton
    if triton.access_secret is not None:
        return settings
    secret = SecretStr(secrets.token_urlsafe(32))
    return settings.model_copy(update={"triton": triton.model_copy(update={"access_secret": secret})})
