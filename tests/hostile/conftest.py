"""Hostile input against the session stack: hypothesis profiles, the fuzzing keys and subjects, and
the checks every test ends with (no process restarted; every accepted generation recorded; sampled
refusals audited).

Hypothesis profiles: tests/hostile/profiles.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.auth.rpcs import Subjects
from tests.stack import RunningStack

# Generation limits of the fuzzing keys: whatever hypothesis makes, an accepted generation is cheap.
MAX_TOKENS = 4
MAX_PROMPT_TOKENS = 128


@dataclass
class Hostile:
    """The fuzzing keys, subjects, and what the tests noted for the end-of-test checks."""

    stack: RunningStack = field(repr=False)
    # "none" -> "", "inference" (inference+read), "admin" (every scope), "bogus"; not in failure reports
    keys: dict[str, str] = field(repr=False)
    subjects: Subjects = field(repr=False)
    accepted: list[tuple[str, str]] = field(default_factory=list)  # (request id, what)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (request id, what): audited
    examples: int = 0


# Examples sent in this session (all tests), for the terminal summary.
SENT = {"examples": 0}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SENT["examples"]:
        terminalreporter.write_line(f"hostile input: {SENT['examples']} examples sent to the stack")


@pytest.fixture(scope="session")
def hostile(stack: RunningStack) -> Iterator[Hostile]:
    limits = {"max_tokens": MAX_TOKENS, "max_prompt_tokens": MAX_PROMPT_TOKENS}
    user = stack.create_key(["inference", "read"], **limits)
    admin = stack.create_key(["inference", "read", "admin"], **limits)
    model = stack.settings.triton.default_model
    request_id = f"hostile-subject-{uuid.uuid4().hex[:10]}"
    with stack.http(user) as http:
        reply = http.post(
            "/v1/completions",
            json={"model": model, "prompt": "Hi", "max_tokens": 1},
            headers={"x-request-id": request_id},
        )
        assert reply.status_code == 200, reply.text
        grammar = http.post("/api/v1/grammars", json={"syntax": "SYNTAX_GBNF", "definition": 'root ::= "x"'})
        conversation = http.post("/api/v1/conversations", json={"model": model})
        job = http.post(
            "/api/v1/jobs",
            json={"request": {"completion": {"model": model, "prompt": "Hi", "max_tokens": 1}}},
        )
    with stack.http(admin) as http:
        grammar = http.post("/api/v1/grammars", json={"syntax": "SYNTAX_GBNF", "definition": 'root ::= "x"'})
    for made in (grammar, conversation, job):
        assert made.status_code == 200, made.text
    victim = stack.new_key(["read"], display_name="hostile-victim")
    subjects = Subjects(
        model=model,
        transaction=f"transactions/{request_id}",
        victim_key=victim.name,
        grammar=str(grammar.json()["name"]),
        # Deleting is fuzzed on names that do not exist (the subjects stay for the other methods).
        new_grammar=lambda: "grammars/hostile-gone",
        conversation=str(conversation.json()["name"]),
        new_conversation=lambda: "conversations/hostile-gone",
        job=str(job.json()["name"]),
    )
    keys = {"none": "", "inference": user, "admin": admin, "bogus": "ferry_" + "0" * 40}
    hostile = Hostile(stack, keys, subjects)
    yield hostile
    SENT["examples"] += hostile.examples


def _pids(stack: RunningStack) -> dict[str, int]:
    return {name: int(info["pid"]) for name, info in stack.supervisor().processes().items()}


def _wait_recorded(hostile: Hostile, timeout: float = 60.0) -> list[str]:
    """Request ids of accepted generations without a transaction after `timeout`."""
    missing = list(hostile.accepted)
    deadline = time.monotonic() + timeout
    with hostile.stack.http() as http:
        while missing and time.monotonic() < deadline:
            missing = [
                (rid, what)
                for rid, what in missing
                if http.get(f"/api/v1/transactions/{rid}").status_code != 200
            ]
            if missing:
                time.sleep(0.5)
    return [f"{rid} ({what})" for rid, what in missing]


def _unaudited(hostile: Hostile, sample: int = 3, timeout: float = 30.0) -> list[str]:
    """Of the first `sample` refusals noted, those without an audit event for their request id."""
    missing = list(hostile.refused[:sample])
    deadline = time.monotonic() + timeout
    with hostile.stack.http() as http:
        while missing and time.monotonic() < deadline:
            still = []
            for rid, what in missing:
                found = http.get("/api/v1/audit/events", params={"filter": f'request_id = "{rid}"'})
                assert found.status_code == 200, found.text
                if not found.json().get("events"):
                    still.append((rid, what))
            missing = still
            if missing:
                time.sleep(0.5)
    return [f"{rid} ({what})" for rid, what in missing]


@pytest.fixture
def checked(hostile: Hostile) -> Iterator[Hostile]:
    """`hostile`, and after the test: no process restarted (pids unchanged), every accepted generation
    recorded, sampled refusals audited."""
    before = _pids(hostile.stack)
    hostile.accepted.clear()
    hostile.refused.clear()
    yield hostile
    after = _pids(hostile.stack)
    changed = {name: (pid, after.get(name)) for name, pid in before.items() if after.get(name) != pid}
    assert not changed, f"processes restarted or died (pid before, after): {changed}"
    unrecorded = _wait_recorded(hostile)
    assert not unrecorded, f"accepted generations without a transaction record: {unrecorded}"
    unaudited = _unaudited(hostile)
    assert not unaudited, f"refusals without an audit event: {unaudited}"
