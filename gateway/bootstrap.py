"""The bootstrap admin key (`FERRY_BOOTSTRAP_ADMIN_KEY`): inserted once, then left alone."""

from __future__ import annotations

import logging

from ferry.auth.v1 import auth_pb2

from gateway.authorizer import LocalAuthorizer
from gateway.store import KeyStore
from services.common.access import KEY_SCOPES
from services.common.config import Settings
from services.common.tokens import hash_key
from services.recording import Recorder

log = logging.getLogger(__name__)

BOOTSTRAP_CREATOR = "bootstrap"
MIN_BOOTSTRAP_KEY_LENGTH = 32


async def ensure_bootstrap_key(
    settings: Settings, store: KeyStore, authorizer: LocalAuthorizer, recorder: Recorder
) -> None:
    """Inserts the configured admin key unless its hash is in the table already: a key that exists
    (even revoked: an operator revoked it on purpose) is never changed."""
    secret = settings.bootstrap_admin_key
    if secret is None or not secret.get_secret_value():
        return
    if len(secret.get_secret_value()) < MIN_BOOTSTRAP_KEY_LENGTH:
        # Keys are stored as fast hashes, safe only for secrets nobody can guess.
        raise ValueError(
            f"FERRY_BOOTSTRAP_ADMIN_KEY is too short: use at least {MIN_BOOTSTRAP_KEY_LENGTH} random "
            "characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    key_hash = hash_key(secret.get_secret_value())
    if await store.by_hash(key_hash) is not None:
        return
    record = await store.insert(
        display_name="bootstrap admin",
        key_hash=key_hash,
        scopes=list(KEY_SCOPES),
        limits=auth_pb2.Limits(),
        expire_time=None,
        creator=BOOTSTRAP_CREATOR,
    )
    if record is None:  # another gateway replica inserted it meanwhile
        return
    authorizer.forget(record)
    log.info("bootstrap admin key created as %s", record.name)
    recorder.operational("key.bootstrap", principal=BOOTSTRAP_CREATOR, resource=record.name)
