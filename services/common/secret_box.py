"""Encryption at rest for secrets ferry must be able to read back (webhook signing secrets).

A key's API secret is stored as a hash, but an HMAC signing secret cannot be: signing needs the secret
itself. Such secrets are sealed with ferry's master key (`master_key` setting, else
`<home>/master.key`, created owner-only on first use) and bound to what they belong to (the
`context`, e.g. `keys/3f9a0c12b7e4`), so a sealed value copied onto another row does not open.

Sealing is AES-256-GCM (the `cryptography` package) under a random 96-bit nonce, with the context as
associated data: a value that was altered, or moved to another context, or sealed under another master
key does not open. The `v1.` prefix names the scheme, so a later one can sit beside it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.common.config import Settings

VERSION = b"v1"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
MASTER_KEY_FILE = "master.key"


class SealError(Exception):
    """A sealed value that does not open: another master key, another context, or altered."""


class SecretBox:
    def __init__(self, master_key: bytes) -> None:
        if len(master_key) < KEY_BYTES:
            raise ValueError(f"the master key must be at least {KEY_BYTES} bytes")
        # A key of its own for this purpose, so the master key can serve other purposes later.
        self._aead = AESGCM(hmac.new(master_key, b"ferry secret box", hashlib.sha256).digest())

    def seal(self, plaintext: str, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = self._aead.encrypt(nonce, plaintext.encode(), VERSION + context.encode())
        return f"{VERSION.decode()}.{base64.urlsafe_b64encode(nonce + ciphertext).decode()}"

    def open(self, sealed: str, context: str) -> str:
        version, _, body = sealed.partition(".")
        if version.encode() != VERSION:
            raise SealError(f"unknown sealing scheme {version!r}")
        try:
            raw = base64.urlsafe_b64decode(body)
        except (binascii.Error, ValueError):
            raise SealError("not a sealed value") from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise SealError("not a sealed value")
        try:
            plaintext = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], VERSION + context.encode())
        except InvalidTag:
            raise SealError("the sealed value does not open with this master key and context") from None
        return plaintext.decode()


def parse_master_key(text: str) -> bytes:
    """32+ bytes written as hex or (url-safe) base64."""
    value = text.strip()
    try:
        key = bytes.fromhex(value)
    except ValueError:
        try:
            key = base64.b64decode(value.replace("-", "+").replace("_", "/") + "==", validate=False)
        except (binascii.Error, ValueError):
            raise ValueError("the master key is neither hex nor base64") from None
    if len(key) < KEY_BYTES:
        raise ValueError(f"the master key must be at least {KEY_BYTES} bytes (got {len(key)})")
    return key


def master_key(settings: Settings) -> bytes:
    """The `master_key` setting, else `<home>/master.key` (created with mode 0600 when missing)."""
    if settings.master_key is not None:
        return parse_master_key(settings.master_key.get_secret_value())
    path = Path(settings.home) / MASTER_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two processes starting at once keep the first one's key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(KEY_BYTES) + "\n")
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} must be readable by its owner only (chmod 600)")
    return parse_master_key(path.read_text())


def secret_box(settings: Settings) -> SecretBox:
    return SecretBox(master_key(settings))
