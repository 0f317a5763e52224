"""KeysService: create, list, get and revoke API keys (admin). Every change is an audit event.

Each key also gets a webhook signing secret (Standard Webhooks, `whsec_...`) for the job webhooks it
asks for: shown once (CreateKey's and RotateWebhookSecret's answers), kept sealed with the master key
(signing needs the secret itself, so it cannot be hashed), and read back only by ferry's own Jobs
service (GetWebhookSecret, internal).
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timedelta

import grpc
from ferry.keys.v1 import keys_pb2, keys_pb2_grpc

from gateway.authorizer import LocalAuthorizer
from gateway.store import LIMIT_FIELDS, KeyStore
from services.common import listing
from services.common.access import KEY_SCOPES
from services.common.errors import Reason, internal_error, invalid_argument, not_found, rpc_error
from services.common.interceptor import current_call
from services.common.names import KEY_ID, KEYS, resource_id
from services.common.secret_box import SealError, SecretBox
from services.common.timestamps import now, to_datetime, to_micros
from services.common.tokens import hash_key, new_key_secret
from services.recording import Recorder

MAX_DISPLAY_NAME = 200
# Standard Webhooks allows 24 to 64 bytes of secret.
WEBHOOK_SECRET_BYTES = 32
WEBHOOK_SECRET_PREFIX = "whsec_"


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(WEBHOOK_SECRET_BYTES)).decode()


class KeysServicer(keys_pb2_grpc.KeysServiceServicer):
    def __init__(
        self, store: KeyStore, authorizer: LocalAuthorizer, recorder: Recorder, box: SecretBox
    ) -> None:
        self.store = store
        self.authorizer = authorizer
        self.recorder = recorder
        self.box = box

    async def CreateKey(
        self, request: keys_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.Key:
        if not request.HasField("key"):
            raise invalid_argument("key", "is required")
        key = request.key
        display_name = key.display_name.strip()
        if not display_name:
            raise invalid_argument("key.display_name", "is required")
        if len(display_name) > MAX_DISPLAY_NAME:
            raise invalid_argument("key.display_name", f"is longer than {MAX_DISPLAY_NAME} characters")
        scopes = _scopes(list(key.scopes))
        for name in LIMIT_FIELDS:
            if getattr(key.limits, name) < 0:
                raise invalid_argument(f"key.limits.{name}", "must not be negative (0: the default)")
        expire_time = _expire_time(key)
        secret = new_key_secret()
        caller = _caller()
        record = await self.store.insert(
            display_name=display_name,
            key_hash=hash_key(secret),
            scopes=scopes,
            limits=key.limits,
            expire_time=expire_time,
            creator=caller[0],
        )
        if record is None:  # a 256-bit collision: never in practice
            raise rpc_error(Reason.KEY_COLLISION, "key collision; try again")
        self.authorizer.forget(record)
        self.recorder.operational(
            "key.create",
            principal=caller[0],
            resource=record.name,
            request_id=caller[1],
            attributes={"display_name": display_name, "scopes": ",".join(scopes)},
        )
        webhook_secret = new_webhook_secret()
        await self.store.set_webhook_secret(record.id, self.box.seal(webhook_secret, record.name))
        created = record.to_proto()
        created.secret = secret
        created.webhook_secret = webhook_secret
        return created

    async def ListKeys(
        self, request: keys_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.ListKeysResponse:
        page = listing.page(
            request.page_size,
            request.page_token,
            query=("keys", str(request.show_inactive)),
            key=("time", "text"),
        )
        records = await self.store.page(
            show_inactive=request.show_inactive, after=page.after, size=page.limit
        )
        shown, token = page.split(records, lambda r: (r.create_time, r.id))
        return keys_pb2.ListKeysResponse(keys=[r.to_proto() for r in shown], next_page_token=token)

    async def GetKey(
        self, request: keys_pb2.GetKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.Key:
        record = await self.store.by_id(resource_id(request.name, KEYS, KEY_ID))
        if record is None:
            raise not_found("key", request.name)
        return record.to_proto()

    async def RevokeKey(
        self, request: keys_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.Key:
        revoked = await self.store.revoke(resource_id(request.name, KEYS, KEY_ID))
        if revoked is None:
            raise not_found("key", request.name)
        record, revoked_now = revoked
        # Calls through this gateway are refused from now on; other replicas within cache_seconds.
        self.authorizer.forget(record)
        if revoked_now:  # a second revocation changes nothing and is not audited again
            principal, request_id = _caller()
            self.recorder.operational(
                "key.revoke", principal=principal, resource=record.name, request_id=request_id
            )
        return record.to_proto()

    async def RotateWebhookSecret(
        self, request: keys_pb2.RotateWebhookSecretRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.Key:
        key_id = resource_id(request.name, KEYS, KEY_ID)
        webhook_secret = new_webhook_secret()
        record = await self.store.set_webhook_secret(
            key_id, self.box.seal(webhook_secret, f"{KEYS}/{key_id}")
        )
        if record is None:
            raise not_found("key", request.name)
        principal, request_id = _caller()
        self.recorder.operational(
            "key.rotate_webhook_secret", principal=principal, resource=record.name, request_id=request_id
        )
        rotated = record.to_proto()
        rotated.webhook_secret = webhook_secret
        return rotated

    async def GetWebhookSecret(
        self, request: keys_pb2.GetWebhookSecretRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.GetWebhookSecretResponse:
        found = await self.store.webhook_secret(resource_id(request.name, KEYS, KEY_ID))
        if found is None:
            raise not_found("key", request.name)
        record, sealed = found
        if sealed is None:
            raise rpc_error(
                Reason.WEBHOOK_SECRET_MISSING,
                f"{record.name} has no webhook signing secret; an admin issues one with"
                f" POST /api/v1/{record.name}:rotateWebhookSecret",
                metadata={"key": record.name},
            )
        try:
            return keys_pb2.GetWebhookSecretResponse(secret=self.box.open(sealed, record.name))
        except SealError as exc:  # another master key than the one that sealed it: a deployment error
            raise internal_error(exc) from exc


def _caller() -> tuple[str, str]:
    """(principal, request id) of the RPC being handled."""
    call = current_call.get()
    return (call.principal, call.request_id) if call else ("system", "")


def _scopes(scopes: list[str]) -> list[str]:
    if not scopes:
        raise invalid_argument("key.scopes", f"needs at least one of {', '.join(KEY_SCOPES)}")
    unknown = [s for s in scopes if s not in KEY_SCOPES]
    if unknown:
        raise invalid_argument(
            "key.scopes", f"unknown scope {unknown[0]!r} (a key may hold {', '.join(KEY_SCOPES)})"
        )
    return sorted(set(scopes), key=KEY_SCOPES.index)


def _expire_time(key: keys_pb2.Key) -> datetime | None:
    which = key.WhichOneof("expiration")
    if which == "ttl":
        micros = to_micros(key.ttl, "key.ttl")
        if micros <= 0:
            raise invalid_argument("key.ttl", "must be positive")
        try:
            return now() + timedelta(microseconds=micros)
        except OverflowError:
            raise invalid_argument("key.ttl", "is too long") from None
    if which == "expire_time":
        expire_time = to_datetime(key.expire_time, "key.expire_time")
        if expire_time <= now():
            raise invalid_argument("key.expire_time", "must be in the future")
        return expire_time
    return None
