"""Keys with one scope each, and the existing things the authorization tests act on."""

from __future__ import annotations

import time
import uuid

import pytest

from services.common.access import KEY_SCOPES
from tests.auth.rpcs import Subjects
from tests.stack import RunningStack


@pytest.fixture(scope="session")
def scoped_keys(stack: RunningStack) -> dict[str, str]:
    """A secret per key scope (`inference`, `read`, `admin`), each key holding that scope alone."""
    return {scope: stack.create_key([scope], display_name=f"only-{scope}") for scope in KEY_SCOPES}


@pytest.fixture(scope="session")
def model(stack: RunningStack) -> str:
    return stack.settings.triton.default_model


@pytest.fixture(scope="session")
def subjects(stack: RunningStack, model: str, scoped_keys: dict[str, str]) -> Subjects:
    """A recorded generation (for GetTransaction), a key to revoke (for RevokeKey) and grammars (one to
    read and update, fresh ones to delete)."""
    request_id = f"auth-subject-{uuid.uuid4().hex[:10]}"
    with stack.http() as http:
        reply = http.post(
            "/v1/completions",
            json={"model": model, "prompt": "Hi", "max_tokens": 1},
            headers={"x-request-id": request_id},
        )
        assert reply.status_code == 200, reply.text
        deadline = time.monotonic() + 20
        while http.get(f"/api/v1/transactions/{request_id}").status_code != 200:
            assert time.monotonic() < deadline, "the subject generation was not recorded"
            time.sleep(0.2)
    victim = stack.new_key(["read"], display_name="to-revoke")

    def new_grammar() -> str:
        with stack.http() as http:
            made = http.post("/api/v1/grammars", json={"syntax": "SYNTAX_GBNF", "definition": 'root ::= "x"'})
            assert made.status_code == 200, made.text
            return str(made.json()["name"])

    def new_conversation() -> str:
        # The `inference` key's own: the matrix calls conversation RPCs with that key.
        with stack.http(scoped_keys["inference"]) as http:
            made = http.post("/api/v1/conversations", json={"model": model})
            assert made.status_code == 200, made.text
            return str(made.json()["name"])

    with stack.http(scoped_keys["inference"]) as http:
        # The `inference` key's own job: the matrix calls job RPCs with that key.
        job = http.post(
            "/api/v1/jobs",
            json={"request": {"completion": {"model": model, "prompt": "Hi", "max_tokens": 1}}},
        )
        assert job.status_code == 200, job.text

    return Subjects(
        model=model,
        transaction=f"transactions/{request_id}",
        victim_key=victim.name,
        grammar=new_grammar(),
        new_grammar=new_grammar,
        conversation=new_conversation(),
        new_conversation=new_conversation,
        job=str(job.json()["name"]),
    )
