"""The access table (services/common/access.py) and the per-call check (services/common/auth.py).

Enforcement against the real gateway, Envoy and services is tested in tests/auth; here: the table
read from the protos, credentials parsing, and the decisions a service takes without the gateway.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from ferry.auth.v1 import auth_pb2
from google.api import annotations_pb2
from pydantic import SecretStr

from services.common import access, auth, edge, gateway_client, tokens
from services.common.config import AuthSettings, Settings
from services.common.context import bearer_token
from services.common.errors import RpcError
from services.common.interceptor import Call

TOKEN = "service-token-for-tests"


def ferry_methods() -> list[Any]:
    return [
        method
        for module in access.PROTO_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def test_every_ferry_rpc_declares_who_may_call_it() -> None:
    undeclared = [m.full_name for m in ferry_methods() if not m.GetOptions().HasExtension(auth_pb2.access)]
    assert undeclared == []


def test_declared_scopes_are_known_ones() -> None:
    known = {*access.KEY_SCOPES, access.INTERNAL}
    for method in ferry_methods():
        declared = method.GetOptions().Extensions[auth_pb2.access]
        scopes = set(declared.scopes)
        # A self-authenticated method (a signed webhook) is granted by no key: it declares no scope.
        assert (not scopes) if declared.self_authenticated else (scopes and scopes <= known), method.full_name


def test_self_authenticated_methods_need_no_scope() -> None:
    ingest = "/ferry.jobs.v1.JobsService/IngestWebhook"
    assert access.required_scopes(ingest) == frozenset()
    assert access.is_self_authenticated(ingest)
    assert not access.is_self_authenticated("/ferry.jobs.v1.JobsService/CreateJob")
    assert not access.is_self_authenticated("/grpc.health.v1.Health/Check")


def test_internal_methods_are_exactly_those_without_rest_mapping() -> None:
    # Envoy refuses internal methods at the edge; a REST route to one would be a hole.
    for method in ferry_methods():
        internal = access.INTERNAL in method.GetOptions().Extensions[auth_pb2.access].scopes
        assert internal != method.GetOptions().HasExtension(annotations_pb2.http), method.full_name


def test_scope_table() -> None:
    assert access.required_scopes("/ferry.openai.v1.OpenAIService/CreateChatCompletion") == {"inference"}
    assert access.required_scopes("/ferry.models.v1.ModelsService/LoadModel") == {"admin"}
    assert access.required_scopes("/ferry.transactions.v1.TransactionsService/ListTransactions") == {"read"}
    assert access.required_scopes("/ferry.keys.v1.KeysService/CreateKey") == {"admin"}
    assert access.required_scopes("/grpc.health.v1.Health/Check") is None
    # Unknown methods are admin-only rather than open.
    assert access.required_scopes("/ferry.nope.v1.Nope/Do") == {"admin"}


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", ""), ("", ""), (None, ""), ("abc", "")],
)
def test_bearer_token(header: str | None, token: str) -> None:
    assert bearer_token(header) == token


def test_new_keys_are_random_and_stored_as_hashes() -> None:
    first, second = tokens.new_key_secret(), tokens.new_key_secret()
    assert first != second and first.startswith("fry_") and len(first) > 40
    assert tokens.hash_key(first) != first and len(tokens.hash_key(first)) == 64


def call(method: str, credential: str = "", edge_token: str = "", forwarded: str = "") -> Call:
    service, _, name = method.lstrip("/").partition("/")
    return Call(
        service=service,
        method=name,
        request_id="r1",
        peer="ipv4:10.1.2.3:5555",
        metadata={},
        credential=credential,
        edge_token=edge_token,
        edge_client_address=forwarded,
    )


def test_forwarded_client_address_is_trusted_only_from_envoy() -> None:
    settings = AuthSettings(service_token=SecretStr(TOKEN))
    assert (
        edge.client_address(call("/a.B/C", forwarded="203.0.113.9", edge_token=TOKEN), settings)
        == "203.0.113.9"
    )
    # A caller on a service port cannot choose the address its limits are counted under.
    assert (
        edge.client_address(call("/a.B/C", forwarded="203.0.113.9", edge_token="guess"), settings)
        == "10.1.2.3"
    )
    assert (
        edge.client_address(call("/a.B/C", forwarded="not-an-ip", edge_token=TOKEN), settings) == "10.1.2.3"
    )
    assert edge.peer_address("ipv6:[::1]:5000") == "::1"


class RecordingAuthorizer:
    def __init__(self) -> None:
        self.asked: list[auth_pb2.AuthorizeRequest] = []

    async def authorize(self, request: auth_pb2.AuthorizeRequest) -> auth_pb2.Principal:
        self.asked.append(request)
        return auth_pb2.Principal(name="keys/k1", scopes=["inference"])

    async def record_usage(self, request: auth_pb2.RecordUsageRequest) -> None:
        return None


def observer(enabled: bool = True) -> tuple[auth.AuthObserver, RecordingAuthorizer]:
    settings = Settings(auth=AuthSettings(enabled=enabled, service_token=SecretStr(TOKEN)))
    authorizer = RecordingAuthorizer()
    return auth.AuthObserver(settings, authorizer), authorizer


CHAT = "/ferry.openai.v1.OpenAIService/CreateChatCompletion"
APPEND = "/ferry.audit.v1.AuditService/AppendEvents"


async def test_calls_are_authorized_by_the_gateway_with_method_and_address() -> None:
    obs, authorizer = observer()
    c = call(CHAT, credential="fry_x")
    await obs.on_start(c, None)
    assert c.principal == "keys/k1"
    assert auth.principal_var.get() is not None
    assert [(r.api_key, r.method, r.client_address) for r in authorizer.asked] == [
        ("fry_x", CHAT, "10.1.2.3")
    ]


async def test_health_needs_no_key() -> None:
    obs, authorizer = observer()
    await obs.on_start(call("/grpc.health.v1.Health/Check"), None)
    assert authorizer.asked == []


async def test_the_service_token_grants_internal_methods_only() -> None:
    obs, authorizer = observer()
    internal = call(APPEND, credential=TOKEN)
    await obs.on_start(internal, None)
    assert internal.principal == tokens.SERVICE_PRINCIPAL
    with pytest.raises(RpcError) as err:
        await obs.on_start(call(CHAT, credential=TOKEN), None)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert authorizer.asked == []


async def test_a_key_never_reaches_internal_methods() -> None:
    obs, authorizer = observer()
    with pytest.raises(RpcError) as err:
        await obs.on_start(call(APPEND, credential="fry_admin"), None)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert authorizer.asked == []


async def test_a_signed_webhook_passes_without_a_key_as_unverified() -> None:
    # IngestWebhook proves itself with its signature (checked by the Jobs service): no key is asked
    # for, and a key sent with it is not looked at (it would grant nothing).
    obs, authorizer = observer()
    for credential in ("", "fry_admin"):
        ingest = call("/ferry.jobs.v1.JobsService/IngestWebhook", credential=credential)
        await obs.on_start(ingest, None)
        assert ingest.principal == access.UNVERIFIED_PRINCIPAL
        principal = auth.principal_var.get()
        assert principal is not None and list(principal.scopes) == []
    assert authorizer.asked == []


async def test_with_auth_off_nothing_is_asked() -> None:
    obs, authorizer = observer(enabled=False)
    await obs.on_start(call(CHAT), None)
    assert authorizer.asked == []


async def test_an_unreachable_gateway_refuses_with_unavailable() -> None:
    settings = Settings(auth=AuthSettings(service_token=SecretStr(TOKEN)))
    settings.gateway.port = 1  # nothing listens there
    remote = gateway_client.RemoteAuthorizer(settings)
    remote.TIMEOUT_SECONDS = 0.5
    with pytest.raises(RpcError) as err:
        await remote.authorize(auth_pb2.AuthorizeRequest(api_key="fry_x", method=CHAT))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.retry_after_seconds == 1.0


def test_a_forwarded_principal_is_trusted_only_with_the_edge_token() -> None:
    settings = AuthSettings(service_token=SecretStr(TOKEN))
    principal = auth_pb2.Principal(name="keys/k9", scopes=["read"])
    header = edge.encode_principal(principal)
    forwarded = call(CHAT, edge_token=TOKEN)
    forwarded.edge_principal = header
    assert edge.edge_principal(forwarded, settings) == principal
    forged = call(CHAT, edge_token="guess")
    forged.edge_principal = header
    assert edge.edge_principal(forged, settings) is None
    garbled = call(CHAT, edge_token=TOKEN)
    garbled.edge_principal = "%%%not-base64"
    assert edge.edge_principal(garbled, settings) is None


async def test_a_forwarded_principal_spares_the_gateway_but_not_the_scope_check() -> None:
    obs, authorizer = observer()
    forwarded = call(CHAT, credential="fry_x", edge_token=TOKEN)
    forwarded.edge_principal = edge.encode_principal(auth_pb2.Principal(name="keys/k9", scopes=["inference"]))
    await obs.on_start(forwarded, None)
    assert forwarded.principal == "keys/k9" and authorizer.asked == []
    read_only = call(CHAT, credential="fry_x", edge_token=TOKEN)
    read_only.edge_principal = edge.encode_principal(auth_pb2.Principal(name="keys/k8", scopes=["read"]))
    with pytest.raises(RpcError) as err:
        await obs.on_start(read_only, None)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


class CountingAuthorizer(RecordingAuthorizer):
    def __init__(self) -> None:
        super().__init__()
        self.usage: list[auth_pb2.RecordUsageRequest] = []

    async def record_usage(self, request: auth_pb2.RecordUsageRequest) -> None:
        self.usage.append(request)


async def test_generated_tokens_are_reported_only_where_a_token_limit_applies() -> None:
    settings = Settings(auth=AuthSettings(service_token=SecretStr(TOKEN)))
    authorizer = CountingAuthorizer()
    obs = auth.AuthObserver(settings, authorizer)
    limited = auth_pb2.Principal(name="keys/k1", report_usage=True)
    obs.record_usage(limited, "10.0.0.1", 7)
    obs.record_usage(auth_pb2.Principal(name="keys/k2"), "10.0.0.1", 7)  # no limit: nothing to count
    obs.record_usage(tokens.service_principal(), "10.0.0.1", 7)
    for task in list(obs._background):
        await task
    assert [(u.principal, u.completion_tokens) for u in authorizer.usage] == [("keys/k1", 7)]
