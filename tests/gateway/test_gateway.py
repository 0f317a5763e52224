"""The gateway process end to end: keys in real PostgreSQL, Authorize decisions and rate limits,
and Envoy's ext_authz Check (the `ferry keys` command is tested in tests/cli)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ferry.auth.v1 import auth_pb2, auth_pb2_grpc
from ferry.keys.v1 import keys_pb2, keys_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import code_pb2, status_pb2

from services.common.config import REPO_ROOT
from services.common.errors import error_details
from services.common.tokens import hash_key
from tests.gateway.conftest import ADMIN_KEY, SERVICE_TOKEN, Gateway, start_gateway

ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
SERVICE = (("authorization", f"Bearer {SERVICE_TOKEN}"),)
GENERATE = "/ferry.inference.v1.InferenceService/Generate"
LIST_MODELS = "/ferry.models.v1.ModelsService/ListModels"
LIST_TRANSACTIONS = "/ferry.transactions.v1.TransactionsService/ListTransactions"
LOAD_MODEL = "/ferry.models.v1.ModelsService/LoadModel"


async def create(keys: keys_pb2_grpc.KeysServiceStub, name: str, *scopes: str, **fields: Any) -> keys_pb2.Key:
    limits = fields.pop("limits", None)
    key = keys_pb2.Key(display_name=name, scopes=list(scopes or ["inference"]), **fields)
    if limits:
        key.limits.CopyFrom(auth_pb2.Limits(**limits))
    created: keys_pb2.Key = await keys.CreateKey(keys_pb2.CreateKeyRequest(key=key), metadata=ADMIN)
    return created


async def authorize(
    auth: auth_pb2_grpc.AuthServiceStub, secret: str, method: str = GENERATE, **fields: Any
) -> auth_pb2.Principal:
    reply = await auth.Authorize(
        auth_pb2.AuthorizeRequest(api_key=secret, method=method, **fields), metadata=SERVICE
    )
    principal: auth_pb2.Principal = reply.principal
    return principal


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# -- keys ----------------------------------------------------------------------------------------


async def test_create_get_list_revoke(keys: keys_pb2_grpc.KeysServiceStub) -> None:
    created = await create(keys, "ci runner", "inference", "read", limits={"requests_per_minute": 7})
    assert created.secret.startswith("fry_")
    assert created.name.startswith("keys/")
    assert created.state == keys_pb2.Key.State.STATE_ACTIVE
    assert created.creator.startswith("keys/")  # the bootstrap admin key's principal
    assert list(created.scopes) == ["inference", "read"]

    fetched = await keys.GetKey(keys_pb2.GetKeyRequest(name=created.name), metadata=ADMIN)
    assert fetched.secret == ""  # shown once, in CreateKey's answer only
    assert fetched.display_name == "ci runner"
    assert fetched.limits.requests_per_minute == 7

    listed = await keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=ADMIN)
    assert created.name in [k.name for k in listed.keys]
    assert all(k.secret == "" for k in listed.keys)

    revoked = await keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=created.name), metadata=ADMIN)
    assert revoked.state == keys_pb2.Key.State.STATE_REVOKED
    again = await keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=created.name), metadata=ADMIN)
    assert again.revoke_time == revoked.revoke_time  # idempotent: the first revocation stands

    active = await keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=ADMIN)
    assert created.name not in [k.name for k in active.keys]
    everything = await keys.ListKeys(keys_pb2.ListKeysRequest(show_inactive=True), metadata=ADMIN)
    assert created.name in [k.name for k in everything.keys]

    missing = await refusal(keys.GetKey(keys_pb2.GetKeyRequest(name="keys/nosuchkey"), metadata=ADMIN))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_list_pages(keys: keys_pb2_grpc.KeysServiceStub) -> None:
    made = {(await create(keys, f"page {i}")).name for i in range(5)}
    seen: list[keys_pb2.Key] = []
    token = ""
    while True:
        page = await keys.ListKeys(keys_pb2.ListKeysRequest(page_size=2, page_token=token), metadata=ADMIN)
        assert len(page.keys) <= 2
        seen += page.keys
        token = page.next_page_token
        if not token:
            break
    names = [k.name for k in seen]
    assert made <= set(names)
    assert len(names) == len(set(names))  # no key on two pages
    times = [k.create_time.ToDatetime() for k in seen]
    assert times == sorted(times, reverse=True)  # newest first
    bad = await refusal(keys.ListKeys(keys_pb2.ListKeysRequest(page_token="garbage"), metadata=ADMIN))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_only_the_hash_is_stored(keys: keys_pb2_grpc.KeysServiceStub, gateway: Gateway) -> None:
    created = await create(keys, "hash check")
    with psycopg.connect(gateway.database_url) as conn:
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
        row = conn.execute(
            "SELECT key_hash FROM api_keys WHERE id = %s", (created.name.removeprefix("keys/"),)
        ).fetchone()
    assert row is not None and row[0] == hash_key(created.secret)
    dump = repr(rows)
    assert created.secret not in dump
    assert ADMIN_KEY not in dump
    assert created.secret.removeprefix("fry_") not in dump


async def test_audit_events_never_hold_the_secret(
    keys: keys_pb2_grpc.KeysServiceStub, gateway: Gateway
) -> None:
    created = await create(keys, "audit check")
    await keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=created.name), metadata=ADMIN)
    await asyncio.sleep(0.2)
    # No audit service runs here: the events wait in the gateway's spool (SQLite, maybe in its WAL).
    spooled = b"".join(p.read_bytes() for p in (gateway.home / "spool").glob("gateway.db*"))
    for action in (b"key.bootstrap", b"key.create", b"key.revoke"):
        assert action in spooled
    assert created.name.encode() in spooled
    assert created.secret.encode() not in spooled
    assert ADMIN_KEY.encode() not in spooled
    logged = (gateway.home / "gateway.log").read_text()
    assert created.secret not in logged and ADMIN_KEY not in logged


@pytest.mark.parametrize(
    ("key", "field"),
    [
        (keys_pb2.Key(scopes=["read"]), "key.display_name"),
        (keys_pb2.Key(display_name="   ", scopes=["read"]), "key.display_name"),
        (keys_pb2.Key(display_name="x"), "key.scopes"),
        (keys_pb2.Key(display_name="x", scopes=["internal"]), "key.scopes"),
        (keys_pb2.Key(display_name="x", scopes=["read", "root"]), "key.scopes"),
        (
            keys_pb2.Key(display_name="x", scopes=["read"], limits=auth_pb2.Limits(requests_per_minute=-1)),
            "key.limits.requests_per_minute",
        ),
        (
            keys_pb2.Key(display_name="x", scopes=["read"], limits=auth_pb2.Limits(max_tokens=-5)),
            "key.limits.max_tokens",
        ),
        (keys_pb2.Key(display_name="x", scopes=["read"], ttl=duration_pb2.Duration(seconds=0)), "key.ttl"),
        (keys_pb2.Key(display_name="x", scopes=["read"], ttl=duration_pb2.Duration(seconds=-3)), "key.ttl"),
        (
            keys_pb2.Key(display_name="x", scopes=["read"], expire_time=timestamp_pb2.Timestamp(seconds=1)),
            "key.expire_time",
        ),
    ],
)
async def test_create_rejects_bad_input(
    keys: keys_pb2_grpc.KeysServiceStub, key: keys_pb2.Key, field: str
) -> None:
    err = await refusal(keys.CreateKey(keys_pb2.CreateKeyRequest(key=key), metadata=ADMIN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = error_details(err)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert [v.field for v in violations] == [field]


async def test_keys_service_needs_admin(keys: keys_pb2_grpc.KeysServiceStub) -> None:
    reader = await create(keys, "reader", "read")
    anonymous = await refusal(keys.ListKeys(keys_pb2.ListKeysRequest()))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = await refusal(
        keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=(("authorization", f"Bearer {reader.secret}"),))
    )
    assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED
    service = await refusal(keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=SERVICE))
    assert service.code() == grpc.StatusCode.PERMISSION_DENIED  # the service token is internal only


# -- Authorize -----------------------------------------------------------------------------------


async def test_authorize_accepts_and_refuses(
    keys: keys_pb2_grpc.KeysServiceStub, auth: auth_pb2_grpc.AuthServiceStub
) -> None:
    key = await create(keys, "inference only", "inference", limits={"max_tokens": 64})
    principal = await authorize(auth, key.secret, GENERATE)
    assert principal.name == key.name
    assert list(principal.scopes) == ["inference"]
    assert principal.limits.max_tokens == 64
    assert (await authorize(auth, key.secret, LIST_MODELS)).name == key.name  # inference or read

    cases = {
        "": (GENERATE, grpc.StatusCode.UNAUTHENTICATED, "no API key"),
        "fry_not-a-key": (GENERATE, grpc.StatusCode.UNAUTHENTICATED, "not valid"),
        key.secret: (LIST_TRANSACTIONS, grpc.StatusCode.PERMISSION_DENIED, "needs read"),
    }
    for secret, (method, code, words) in cases.items():
        err = await refusal(authorize(auth, secret, method))
        assert err.code() == code
        assert words in (err.details() or "")
        if secret:
            assert secret not in (err.details() or "")  # never echoes the key
    admin = await refusal(authorize(auth, key.secret, LOAD_MODEL))
    assert admin.code() == grpc.StatusCode.PERMISSION_DENIED

    # The Authorize RPC itself is internal: a key cannot ask it.
    direct = await refusal(
        auth.Authorize(
            auth_pb2.AuthorizeRequest(api_key=key.secret, method=GENERATE),
            metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
        )
    )
    assert direct.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_revocation_is_immediate(
    keys: keys_pb2_grpc.KeysServiceStub, auth: auth_pb2_grpc.AuthServiceStub
) -> None:
    key = await create(keys, "to revoke")
    await authorize(auth, key.secret)  # now in the gateway's cache
    await keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=key.name), metadata=ADMIN)
    err = await refusal(authorize(auth, key.secret))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (err.details() or "")


async def test_expired_key(keys: keys_pb2_grpc.KeysServiceStub, auth: auth_pb2_grpc.AuthServiceStub) -> None:
    key = await create(keys, "short lived", ttl=duration_pb2.Duration(seconds=1))
    assert key.HasField("expire_time")
    await authorize(auth, key.secret)
    await asyncio.sleep(1.1)
    err = await refusal(authorize(auth, key.secret))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (err.details() or "")
    fetched = await keys.GetKey(keys_pb2.GetKeyRequest(name=key.name), metadata=ADMIN)
    assert fetched.state == keys_pb2.Key.State.STATE_EXPIRED


async def test_requests_per_minute(
    keys: keys_pb2_grpc.KeysServiceStub, auth: auth_pb2_grpc.AuthServiceStub
) -> None:
    key = await create(keys, "three a minute", limits={"requests_per_minute": 3})
    for _ in range(3):
        principal = await authorize(auth, key.secret)
    assert principal.limits.requests_per_minute == 3
    assert not principal.report_usage  # no token window: services need not report tokens
    err = await refusal(authorize(auth, key.secret))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details(err)["RetryInfo"].retry_delay.ToTimedelta().total_seconds()  # type: ignore[attr-defined]
    assert 50 < retry <= 60
    trailers = dict(err.trailing_metadata() or ())
    assert 50 < int(trailers["retry-after"]) <= 60
    assert "requests per minute" in (err.details() or "")
    # Other keys are not affected.
    other = await create(keys, "unaffected")
    await authorize(auth, other.secret)


async def test_tokens_per_minute(
    keys: keys_pb2_grpc.KeysServiceStub, auth: auth_pb2_grpc.AuthServiceStub
) -> None:
    key = await create(keys, "hundred tokens", "inference", limits={"tokens_per_minute": 100})
    await authorize(auth, key.secret, GENERATE)
    await auth.RecordUsage(
        auth_pb2.RecordUsageRequest(principal=key.name, completion_tokens=60), metadata=SERVICE
    )
    await authorize(auth, key.secret, GENERATE)  # 40 left
    await auth.RecordUsage(  # overflows: the window takes what remains
        auth_pb2.RecordUsageRequest(principal=key.name, completion_tokens=500), metadata=SERVICE
    )
    err = await refusal(authorize(auth, key.secret, GENERATE))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens per minute" in (err.details() or "")
    assert "RetryInfo" in error_details(err)
    # Listing models generates nothing: not held back by the token window.
    await authorize(auth, key.secret, LIST_MODELS)


async def test_per_address_limits(postgres_url: str, tmp_path: Path) -> None:
    """A second gateway replica over the same database, with per-address limits."""
    limited = start_gateway(
        tmp_path / "home",
        postgres_url,
        FERRY_AUTH__RATE_LIMITS__PER_ADDRESS_REQUESTS_PER_MINUTE="2",
        FERRY_AUTH__RATE_LIMITS__PER_ADDRESS_TOKENS_PER_MINUTE="50",
    )
    try:
        with psycopg.connect(postgres_url) as conn:  # the replica found the bootstrap key in place
            row = conn.execute("SELECT count(*) FROM api_keys WHERE creator = 'bootstrap'").fetchone()
        assert row == (1,)
        async with grpc.aio.insecure_channel(limited.address) as channel:
            keys = keys_pb2_grpc.KeysServiceStub(channel)
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            # Admin calls come from 127.0.0.1 (2 a minute there): keys for the test first.
            first = await create(keys, "address a")
            second = await create(keys, "address b")
            for _ in range(2):
                await authorize(auth, first.secret, LIST_MODELS, client_address="203.0.113.7")
            err = await refusal(authorize(auth, second.secret, LIST_MODELS, client_address="203.0.113.7"))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "from this address" in (err.details() or "")
            await authorize(auth, second.secret, LIST_MODELS, client_address="198.51.100.9")

            await auth.RecordUsage(
                auth_pb2.RecordUsageRequest(
                    principal=second.name, client_address="192.0.2.1", completion_tokens=50
                ),
                metadata=SERVICE,
            )
            tokens = await refusal(authorize(auth, first.secret, GENERATE, client_address="192.0.2.1"))
            assert tokens.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tokens per minute from this address" in (tokens.details() or "")
            # The gateway tells services to report tokens when a token window applies.
            principal = await authorize(auth, second.secret, LIST_MODELS, client_address="198.51.100.9")
            assert principal.report_usage

            # Wrong keys count too, before any lookup: guessing is limited like any traffic.
            for guess in ("fry_guess-1", "fry_guess-2"):
                wrong = await refusal(authorize(auth, guess, LIST_MODELS, client_address="203.0.113.99"))
                assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
            flood = await refusal(authorize(auth, second.secret, LIST_MODELS, client_address="203.0.113.99"))
            assert flood.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        limited.stop()


# -- Envoy's ext_authz Check ----------------------------------------------------------------------


def check_request(path: str, secret: str = "", address: str = "192.0.2.10") -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.path = path
    http.method = "POST"
    if secret:
        http.headers["authorization"] = f"Bearer {secret}"
    request.attributes.source.address.socket_address.address = address
    return request


async def test_ext_authz_check(
    keys: keys_pb2_grpc.KeysServiceStub, channel: grpc.aio.Channel, gateway: Gateway
) -> None:
    check = external_auth_pb2_grpc.AuthorizationStub(channel)
    key = await create(keys, "edge", "inference", limits={"requests_per_minute": 2})

    # The edge check is the request's one decision: it counts, and forwards who the caller is.
    for _ in range(2):
        allowed = await check.Check(check_request(GENERATE, key.secret), metadata=SERVICE)
        assert allowed.status.code == code_pb2.OK
        forwarded = {h.header.key: h.header.value for h in allowed.ok_response.headers}
        principal = auth_pb2.Principal.FromString(base64.urlsafe_b64decode(forwarded["x-ferry-principal"]))
        assert principal.name == key.name and list(principal.scopes) == ["inference"]
    limited = await check.Check(check_request(GENERATE, key.secret), metadata=SERVICE)
    assert limited.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert limited.denied_response.status.code == 429
    headers = {h.header.key: h.header.value for h in limited.denied_response.headers}
    assert int(headers["retry-after"]) >= 1
    # gRPC callers get RESOURCE_EXHAUSTED with RetryInfo (envoy/ferry.lua reads the hint).
    assert headers["x-ferry-grpc-status"] == str(code_pb2.RESOURCE_EXHAUSTED)
    details = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    assert details.code == code_pb2.RESOURCE_EXHAUSTED

    cases = [
        (check_request(GENERATE), 401, code_pb2.UNAUTHENTICATED),
        (check_request(GENERATE, "fry_wrong"), 401, code_pb2.UNAUTHENTICATED),
        (check_request(LIST_TRANSACTIONS, key.secret), 403, code_pb2.PERMISSION_DENIED),
    ]
    for request, http_status, code in cases:
        denied = await check.Check(request, metadata=SERVICE)
        assert denied.status.code == code
        assert denied.denied_response.status.code == http_status
        headers = {h.header.key: h.header.value for h in denied.denied_response.headers}
        assert headers["content-type"] == "application/json"
        assert ("www-authenticate" in headers) == (http_status == 401)
        body = json.loads(denied.denied_response.body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "fry_wrong" not in denied.denied_response.body

    # Refusals at the edge are audited (no service sees them), without the presented key.
    await asyncio.sleep(0.2)
    spooled = b"".join(p.read_bytes() for p in (gateway.home / "spool").glob("gateway.db*"))
    assert b"edge.deny" in spooled and b"fry_wrong" not in spooled

    # Health needs no key, at the edge either.
    public = await check.Check(check_request("/grpc.health.v1.Health/Check"), metadata=SERVICE)
    assert public.status.code == code_pb2.OK

    # An edge lease only when Envoy asks for one (envoy/edge_lease.lua sends x-ferry-lease: want).
    free = await create(keys, "leased", "inference")
    plain = await check.Check(check_request(LIST_MODELS, free.secret), metadata=SERVICE)
    assert plain.status.code == code_pb2.OK and "lease_requests" not in plain.dynamic_metadata
    wanted = check_request(LIST_MODELS, free.secret)
    wanted.attributes.request.http.headers["x-ferry-lease"] = "want"
    leased = await check.Check(wanted, metadata=SERVICE)
    assert leased.dynamic_metadata["lease_requests"] >= 2
    assert 0 < leased.dynamic_metadata["lease_ttl_ms"] <= 2000
    principal = auth_pb2.Principal.FromString(
        base64.urlsafe_b64decode(leased.dynamic_metadata["lease_principal"])
    )
    assert principal.name == free.name

    # Only Envoy (holding the service token) may ask.
    for metadata in ((), (("authorization", f"Bearer {ADMIN_KEY}"),)):
        err = await refusal(check.Check(check_request(GENERATE, key.secret), metadata=metadata))
        assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def test_not_serving_without_database(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from launcher.ports import free_ports
    from tests.gateway.conftest import gateway_env

    port, metrics_port, nowhere = free_ports(3)
    env = gateway_env(tmp_path, f"postgresql://postgres@127.0.0.1:{nowhere}/none", port, metrics_port)
    with open(tmp_path / "gateway.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway"], env=env, cwd=REPO_ROOT, stdout=log, stderr=log
        )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            grpc.channel_ready_future(channel).result(timeout=20)
            live = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=2)
            assert live.status == health_pb2.HealthCheckResponse.SERVING
            ready = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
            keys = keys_pb2_grpc.KeysServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=ADMIN, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        process.terminate()
        process.wait(15)
