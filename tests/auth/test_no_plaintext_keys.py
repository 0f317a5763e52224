"""Key secrets are never kept in plaintext: not in PostgreSQL, not in any file of the stack's home
(logs, Envoy's access log, spools, the database files), not in transactions or audit events. Key
changes are audit events naming the admin who made them."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from psycopg import sql

from services.common.tokens import hash_key, new_key_secret
from tests.stack import RunningStack, keyed_channel

pytestmark = pytest.mark.stack

# Files that hold the bootstrap admin key on purpose, readable by their owner only: the operator's
# copy, and supervisord's configuration (the gateway's program environment). No other secret.
ADMIN_KEY_HOLDERS = frozenset({"admin.key", "supervisord.conf"})


def _use_a_key_everywhere(stack: RunningStack, model: str, request_id: str) -> tuple[str, str]:
    """A key created, used (REST and gRPC, allowed and refused), revoked and used again; returns its
    name and secret. Also presents a key that was never issued."""
    key = stack.new_key(["inference"], display_name="plaintext-probe")
    with stack.http(key.secret) as http:
        reply = http.post(
            "/v1/completions",
            json={"model": model, "prompt": "Hi", "max_tokens": 1},
            headers={"x-request-id": request_id},
        )
        assert reply.status_code == 200, reply.text
        assert http.get("/api/v1/audit/events").status_code == 403
    with keyed_channel(stack.service_targets["inference"], key.secret) as channel:
        inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            inference_pb2.GenerateRequest(
                model=f"models/{model}",
                request_id=f"{request_id}-grpc",
                prompt="Hi",
                sampling=inference_pb2.SamplingParams(max_tokens=1),
            ),
            timeout=30,
        )
    stack.revoke_key(key.name)
    never_issued = new_key_secret()
    stack.issued_secrets.append(never_issued)
    for secret in (key.secret, never_issued):
        with stack.http(secret) as http:
            stack.within_revocation_bound(lambda: http.get("/v1/models").status_code == 401)
        with keyed_channel(stack.service_targets["models"], secret) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/ferry.models.v1.ModelsService/ListModels")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return key.name, key.secret


def _wait_for(what: str, check: Callable[[], Any], seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return result


def _all_pages(http: httpx.Client, path: str, items: str, **params: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = ""
    while True:
        reply = http.get(path, params={**params, "page_size": "1000", "page_token": token})
        assert reply.status_code == 200, reply.text
        out += reply.json().get(items, [])
        token = reply.json().get("next_page_token", "")
        if not token:
            return out


def _database_text(url: str) -> str:
    """Every row of every table outside PostgreSQL's own schemas, as text."""
    rows: list[str] = []
    with psycopg.connect(url) as db:
        tables = db.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        assert any(name == "api_keys" for _, name in tables), tables
        for schema, name in tables:
            query = sql.SQL("SELECT t::text FROM {}.{} AS t").format(
                sql.Identifier(schema), sql.Identifier(name)
            )
            rows += [row[0] for row in db.execute(query)]
    return "\n".join(rows)


def _pattern(secrets: set[str]) -> re.Pattern[bytes]:
    return re.compile(b"|".join(re.escape(s.encode()) for s in secrets))


def _files(home: Path) -> list[Path]:
    """Every regular file under the stack's home but the shared model files."""
    return [
        path
        for path in home.rglob("*")
        if path.is_file() and not path.is_symlink() and "models" not in path.relative_to(home).parts[:1]
    ]


def test_no_secret_in_plaintext_anywhere(stack: RunningStack, model: str) -> None:
    since = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    request_id = f"plaintext-{uuid.uuid4().hex[:10]}"
    name, secret = _use_a_key_everywhere(stack, model, request_id)
    secrets = {secret, stack.admin_key, *stack.issued_secrets}

    with stack.http() as http:
        # Wait until what the key did is recorded, so that the search covers it.
        _wait_for(
            "the probe's generations to be recorded",
            lambda: all(
                http.get(f"/api/v1/transactions/{rid}").status_code == 200
                for rid in (request_id, f"{request_id}-grpc")
            ),
        )
        transactions = _all_pages(
            http, "/api/v1/transactions", "transactions", filter=f'create_time >= "{since}"'
        )
        assert {t["principal"] for t in transactions if t["request_id"] == request_id} == {name}
        events = _all_pages(http, "/api/v1/audit/events", "events", filter=f'event_time >= "{since}"')
        assert any(e["principal"] == name for e in events)
    records = str(transactions) + str(events)
    assert not [s for s in secrets if s in records], "a key secret is in transactions or audit events"

    database = _database_text(stack.database_url)
    assert hash_key(secret) in database  # the right place was searched: the key's hash is there
    assert not [s for s in secrets if s in database], "a key secret is stored in PostgreSQL"

    everything = _pattern(secrets)
    all_but_admin = _pattern(secrets - {stack.admin_key})
    files = _files(stack.settings.home)
    access_log = stack.settings.log_dir / "envoy-access.log"
    # Envoy flushes its access log every second: wait until the probe's requests are in it.
    _wait_for("the access log to show the probe", lambda: request_id.encode() in access_log.read_bytes(), 5)
    assert access_log in files
    leaks = []
    for path in files:
        try:
            content = path.read_bytes()
        except PermissionError:  # PostgreSQL's files when not root: the SQL dump above covers them
            continue
        if path.name in ADMIN_KEY_HOLDERS:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
            found = all_but_admin.search(content)
        else:
            found = everything.search(content)
        if found:
            leaks.append(str(path.relative_to(stack.settings.home)))
    assert not leaks, f"key secrets in plaintext in {leaks}"


def test_key_changes_are_audit_events_by_the_admin(stack: RunningStack) -> None:
    key = stack.new_key(["read"], display_name="audited")
    stack.revoke_key(key.name)
    with stack.http() as http:

        def events(action: str) -> list[dict[str, Any]]:
            wanted = f'action = "{action}" AND resource = "{key.name}"'
            return _all_pages(http, "/api/v1/audit/events", "events", filter=wanted)

        for action in ("key.create", "key.revoke"):
            found = _wait_for(f"a {action} event", partial(events, action))
            assert len(found) == 1 and found[0]["principal"] == stack.admin_principal, found
            assert found[0]["source"] == "gateway"
