"""The jobs API on the real stack: checks at create, ownership, cancelling a running job (its engine
slot is freed), NATS request-reply generation with a key, and interactive requests served while jobs
keep the engine busy (TTFT measured with and without a backlog)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.jobs.clients import completion_job, metric, nats_request, query, wait_ended, wait_until
from tests.jobs.conftest import MODEL
from tests.stack import RunningStack

pytestmark = pytest.mark.stack


def _reason(response: httpx.Response) -> str:
    for detail in response.json().get("details", []):
        if "reason" in detail:
            return str(detail["reason"])
    return ""


def _violations(response: httpx.Response) -> list[str]:
    return [
        v["field"]
        for d in response.json().get("details", [])
        for v in d.get("fieldViolations", d.get("field_violations", []))
    ]


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({}, "job.request"),
        (
            {"request": {"chat_completion": {"model": MODEL, "messages": []}}},
            "job.request.chat_completion.messages",
        ),
        (
            {"request": {"completion": {"model": MODEL, "prompt": "x", "max_tokens": 1, "stream": True}}},
            "job.request.completion.stream",
        ),
        (
            {"request": {"completion": {"model": MODEL, "prompt": "x", "temperature": -1}}},
            "job.request.completion.temperature",
        ),
    ],
)
def test_a_request_the_inference_service_would_refuse_is_refused_at_create(
    jobs_stack: RunningStack, job: dict[str, Any], field: str
) -> None:
    with jobs_stack.http() as http:
        before = query(jobs_stack, "SELECT count(*) FROM jobs")[0][0]
        refused = http.post("/api/v1/jobs", json=job)
        assert refused.status_code == 400, refused.text
        assert field in _violations(refused), refused.text
        assert query(jobs_stack, "SELECT count(*) FROM jobs")[0][0] == before  # nothing stored


def test_a_key_sees_only_its_own_jobs_unless_admin(jobs_stack: RunningStack) -> None:
    owner, other = jobs_stack.create_key(["inference", "read"]), jobs_stack.create_key(["inference", "read"])
    with jobs_stack.http(owner) as mine, jobs_stack.http(other) as theirs, jobs_stack.http() as admin:
        created = mine.post("/api/v1/jobs", json=completion_job(MODEL, "Hi", 2))
        assert created.status_code == 200, created.text
        name = created.json()["name"]
        assert mine.get(f"/api/v1/{name}").status_code == 200
        for response in (
            theirs.get(f"/api/v1/{name}"),
            theirs.post(f"/api/v1/{name}:cancel", json={}),
            theirs.post(f"/api/v1/{name}:wait", json={"timeout_seconds": 1}),
        ):
            assert response.status_code == 404, response.text
            assert _reason(response) == "JOB_NOT_FOUND"
        listed_by_other = [
            j["name"] for j in theirs.get("/api/v1/jobs", params={"page_size": 1000}).json().get("jobs", [])
        ]
        assert name not in listed_by_other
        listed_by_owner = [j["name"] for j in mine.get("/api/v1/jobs").json()["jobs"]]
        assert name in listed_by_owner
        assert admin.get(f"/api/v1/{name}").status_code == 200  # admin sees every job
        # Request ids are each key's own: another key using mine gets a job of its own, not mine.
        request_id = f"mine-{uuid.uuid4().hex[:8]}"
        first = mine.post(
            "/api/v1/jobs", params={"request_id": request_id}, json=completion_job(MODEL, "a", 1)
        )
        assert first.status_code == 200, first.text
        reused = theirs.post(
            "/api/v1/jobs", params={"request_id": request_id}, json=completion_job(MODEL, "a", 1)
        )
        assert reused.status_code == 200, reused.text
        assert reused.json()["name"] != first.json()["name"]
        assert theirs.get(f"/api/v1/{first.json()['name']}").status_code == 404
        again = mine.post(
            "/api/v1/jobs", params={"request_id": request_id}, json=completion_job(MODEL, "a", 1)
        )
        assert again.json()["name"] == first.json()["name"]  # and mine still finds my first job
        wait_ended(mine, [name], timeout=60)


def test_cancelling_a_running_job_stops_its_generation_and_frees_the_slot(jobs_stack: RunningStack) -> None:
    in_flight = {"model": MODEL}
    with jobs_stack.http() as http:
        wait_until(
            lambda: metric(jobs_stack, "inference", "ferry_inference_requests_in_flight", in_flight) == 0,
            120,
            "the engine idle",
        )
        created = http.post("/api/v1/jobs", json=completion_job(MODEL, "Write a very long story:", 3000))
        assert created.status_code == 200, created.text
        name = created.json()["name"]
        wait_until(
            lambda: http.get(f"/api/v1/{name}").json()["state"] == "STATE_RUNNING", 60, "the job running"
        )
        wait_until(
            lambda: metric(jobs_stack, "inference", "ferry_inference_requests_in_flight", in_flight) == 1,
            30,
            "its generation holding a slot",
        )
        cancelled = http.post(f"/api/v1/{name}:cancel", json={})
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "STATE_CANCELLED"
        # The slot is freed long before 3000 tokens could have been generated.
        wait_until(
            lambda: metric(jobs_stack, "inference", "ferry_inference_requests_in_flight", in_flight) == 0,
            30,
            "the slot freed",
        )
        job_id = name.removeprefix("jobs/")
        wait_until(
            lambda: (
                query(jobs_stack, "SELECT status FROM transactions WHERE request_id = %s", job_id)
                == [("CANCELLED",)]
            ),
            30,
            "the generation recorded as cancelled",
        )
        tokens = query(jobs_stack, "SELECT completion_tokens FROM transactions WHERE request_id = %s", job_id)
        assert tokens[0][0] < 3000
        # Cancelling an ended job returns it unchanged.
        again = http.post(f"/api/v1/{name}:cancel", json={})
        assert (
            again.json()["state"] == "STATE_CANCELLED"
            and again.json()["end_time"] == cancelled.json()["end_time"]
        )
        assert "result" not in http.get(f"/api/v1/{name}").json()


def test_nats_request_reply_generates_with_a_key_and_is_recorded(jobs_stack: RunningStack) -> None:
    key = jobs_stack.create_key(["inference"])
    prefix = jobs_stack.settings.nats.generate_prefix
    request_id = f"nats-gen-{uuid.uuid4().hex[:8]}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    headers, data = asyncio.run(
        nats_request(
            jobs_stack,
            f"{prefix}.chat_completion",
            json.dumps(body).encode(),
            {"Authorization": f"Bearer {key}", "X-Request-Id": request_id},
        )
    )
    assert "Ferry-Error" not in headers, data
    answer = json.loads(data)
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] >= 1
    wait_until(
        lambda: (
            query(jobs_stack, "SELECT status FROM transactions WHERE request_id = %s", request_id)
            == [("SUCCEEDED",)]
        ),
        30,
        "the NATS generation's transaction record",
    )
    # Without a key: the gateway's refusal, as an error object.
    headers, data = asyncio.run(
        nats_request(jobs_stack, f"{prefix}.chat_completion", json.dumps(body).encode(), {})
    )
    assert headers.get("Ferry-Error") == "UNAUTHENTICATED"
    assert json.loads(data)["error"]["code"] == 401
    # Not a request of the subject: INVALID_ARGUMENT.
    headers, data = asyncio.run(
        nats_request(
            jobs_stack, f"{prefix}.chat_completion", b"{not json", {"Authorization": f"Bearer {key}"}
        )
    )
    assert headers.get("Ferry-Error") == "INVALID_ARGUMENT"


async def _ttfts(stack: RunningStack, count: int) -> tuple[list[float], list[int]]:
    """Time to first token of `count` streamed interactive chats, one after another (and statuses)."""
    ttfts, statuses = [], []
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a color."}],
        "max_tokens": 8,
        "stream": True,
    }
    async with stack.async_http() as http:
        for _ in range(count):
            started = time.monotonic()
            first = None
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                statuses.append(response.status_code)
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: ") and '"content"' in line:
                        first = time.monotonic() - started
            if first is not None:
                ttfts.append(first)
    return ttfts, statuses


@pytest.mark.timeout(600)
def test_interactive_requests_are_served_while_jobs_saturate_the_engine(jobs_stack: RunningStack) -> None:
    """The note's measurement: TTFT idle, then with a backlog of jobs keeping every spare slot busy.
    Interactive requests are all answered (no 429) while the jobs wait their turn."""
    samples = 10
    idle, idle_statuses = asyncio.run(_ttfts(jobs_stack, samples))
    with jobs_stack.http() as http:
        names = [
            http.post("/api/v1/jobs", json=completion_job(MODEL, f"Story {i}:", 48)).json()["name"]
            for i in range(40)
        ]
        wait_until(
            lambda: (
                metric(jobs_stack, "inference", "ferry_inference_requests_in_flight", {"model": MODEL}) >= 3
            ),
            60,
            "the jobs filling the spare slots",
        )
        deferred_before = metric(
            jobs_stack, "inference", "ferry_grpc_server_handled_total", {"grpc_code": "RESOURCE_EXHAUSTED"}
        )
        busy, busy_statuses = asyncio.run(_ttfts(jobs_stack, samples))
        still_queued = sum(1 for n in names if http.get(f"/api/v1/{n}").json()["state"] == "STATE_QUEUED")
        ended = wait_ended(http, names, timeout=400)
    assert idle_statuses == [200] * samples and busy_statuses == [200] * samples
    assert all(job["state"] == "STATE_SUCCEEDED" for job in ended.values())
    deferred = (
        metric(
            jobs_stack, "inference", "ferry_grpc_server_handled_total", {"grpc_code": "RESOURCE_EXHAUSTED"}
        )
        - deferred_before
    )
    report = {
        "idle_ttft_ms": {"median": round(1000 * statistics.median(idle)), "max": round(1000 * max(idle))},
        "backlog_ttft_ms": {"median": round(1000 * statistics.median(busy)), "max": round(1000 * max(busy))},
        "jobs": len(names),
        "jobs_still_queued_after_the_interactive_run": still_queued,
        "background_deferrals_during_it": deferred,
    }
    print(f"\nTTFT with and without a job backlog: {json.dumps(report)}")
