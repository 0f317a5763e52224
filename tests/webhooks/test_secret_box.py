"""Sealing secrets at rest (services/common/secret_box.py): what opens, what does not, the key file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.common.config import Settings
from services.common.secret_box import SealError, SecretBox, master_key, parse_master_key

KEY = bytes(range(32))


def test_a_sealed_secret_opens_with_its_key_and_context_only() -> None:
    box = SecretBox(KEY)
    sealed = box.seal("whsec_c2VjcmV0", "keys/a")
    assert "c2VjcmV0" not in sealed and sealed.startswith("v1.")
    assert box.open(sealed, "keys/a") == "whsec_c2VjcmV0"
    assert box.seal("whsec_c2VjcmV0", "keys/a") != sealed  # a fresh nonce each time
    with pytest.raises(SealError):
        box.open(sealed, "keys/b")  # copied onto another key's row
    with pytest.raises(SealError):
        SecretBox(bytes(32)).open(sealed, "keys/a")  # another master key
    tampered = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    with pytest.raises(SealError):
        box.open(tampered, "keys/a")
    with pytest.raises(SealError):
        box.open("v2.xyz", "keys/a")


def test_long_secrets_roundtrip() -> None:
    box = SecretBox(KEY)
    text = "x" * 1000 + "é"
    assert box.open(box.seal(text, "c"), "c") == text


def test_master_key_from_settings_hex_or_base64() -> None:
    assert parse_master_key(KEY.hex()) == KEY
    assert parse_master_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=") == KEY
    with pytest.raises(ValueError):
        parse_master_key("abcd")
    assert master_key(Settings(master_key=SecretStr(KEY.hex()))) == KEY


def test_master_key_file_is_created_owner_only_and_kept(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    first = master_key(settings)
    path = tmp_path / "master.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert master_key(settings) == first
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        master_key(settings)
