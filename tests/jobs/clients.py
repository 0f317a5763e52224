"""What the jobs tests do with the stack: create jobs over REST, gRPC and NATS, wait for them, read
the database and the metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable
from typing import Any

import httpx
import nats
import psycopg
from ferry.jobs.v1 import jobs_pb2

from tests.stack import RunningStack

Job = jobs_pb2.Job
ENDED = {"STATE_SUCCEEDED", "STATE_FAILED", "STATE_CANCELLED"}


def completion_job(model: str, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A job's REST body: a completion request."""
    return {"request": {"completion": {"model": model, "prompt": prompt, "max_tokens": max_tokens}}, **extra}


def nats_url(stack: RunningStack) -> str:
    return stack.settings.nats.servers[0]


def client_login(stack: RunningStack) -> dict[str, str]:
    """The embedded server's client user (the launcher's fresh password of this start)."""
    nats_settings = stack.stack.settings.nats
    assert nats_settings.client_password is not None
    return {"user": nats_settings.client_user, "password": nats_settings.client_password.get_secret_value()}


async def submit_over_nats(
    stack: RunningStack, key: str, bodies: Iterable[tuple[str, dict[str, Any]]], timeout: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Publishes each (message id, CreateJobRequest JSON) to the submit subject with the key, asking
    for the answer on an inbox; returns the answers by message id (a Job, or {"error": ...})."""
    nc = await nats.connect(nats_url(stack), **client_login(stack))
    answers: dict[str, dict[str, Any]] = {}
    done = asyncio.Event()
    bodies = list(bodies)
    try:
        inbox = nc.new_inbox()

        async def on_answer(msg: Any) -> None:
            answer = json.loads(msg.data)
            answers[answer.get("metadata", {}).get("msg_id", f"error-{len(answers)}")] = answer
            if len(answers) == len(bodies):
                done.set()

        await nc.subscribe(inbox, cb=on_answer)
        js = nc.jetstream()
        for msg_id, body in bodies:
            await js.publish(
                stack.settings.nats.submit_subject,
                json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {key}", "Nats-Msg-Id": msg_id, "Ferry-Reply-To": inbox},
            )
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await nc.close()
    return answers


async def nats_request(
    stack: RunningStack, subject: str, body: bytes, headers: dict[str, str], timeout: float = 60.0
) -> tuple[dict[str, str], bytes]:
    nc = await nats.connect(nats_url(stack), **client_login(stack))
    try:
        reply = await nc.request(subject, body, timeout=timeout, headers=headers)
    finally:
        await nc.close()
    return dict(reply.headers or {}), reply.data


def wait_ended(http: httpx.Client, names: Iterable[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Each job once it ended (WaitJob, bounded); jobs still running at the deadline as they stand."""
    deadline = time.monotonic() + timeout
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        while True:
            left = deadline - time.monotonic()
            answer = http.post(f"/api/v1/{name}:wait", json={"timeout_seconds": max(0.1, min(left, 20))})
            if answer.status_code == 503 and left > 0:
                time.sleep(0.5)  # the edge's auth check timed out on a loaded machine: ask again
                continue
            assert answer.status_code == 200, answer.text
            out[name] = answer.json()
            if out[name]["state"] in ENDED or left <= 0:
                break
    return out


def count_ended(http: httpx.Client, names: set[str]) -> int:
    """How many of `names` have ended (one ListJobs walk of the caller's jobs)."""
    ended, token = 0, ""
    while True:
        response = http.get("/api/v1/jobs", params={"page_size": 1000, "page_token": token})
        if response.status_code == 503:
            return -1  # the edge's auth check timed out on a loaded machine: the caller asks again
        assert response.status_code == 200, response.text
        page = response.json()
        ended += sum(1 for job in page.get("jobs", []) if job["name"] in names and job["state"] in ENDED)
        token = page.get("next_page_token", "")
        if not token:
            return ended


def query(stack: RunningStack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def metric(stack: RunningStack, service: str, name: str, labels: dict[str, str] | None = None) -> float:
    """A gauge or counter's value from a service's /metrics (0 when absent)."""
    text = httpx.get(stack.metrics_urls[service], timeout=5).text
    want = labels or {}
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in want.items()):
            total += float(match.group(2))
    return total


def wait_until(condition: Any, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(every)
