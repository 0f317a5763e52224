"""Done-when of issue 16 (items 1-4) on the real stack with a real NATS server: 50 jobs submitted
through REST, gRPC and NATS while the worker is killed with SIGKILL and the NATS server is restarted:
every job completes exactly once (one result, one transaction record, the try that answered), none is
lost; a job that always fails ends FAILED after the configured attempts."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import nats
import pytest
from ferry.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from tests.jobs.clients import (
    client_login,
    completion_job,
    count_ended,
    nats_url,
    query,
    submit_over_nats,
    wait_ended,
    wait_until,
)
from tests.jobs.conftest import MAX_ATTEMPTS, MODEL, NOWHERE
from tests.stack import RunningStack, keyed_channel

pytestmark = pytest.mark.stack

JOBS_PER_PATH = {"rest": 17, "grpc": 17, "nats": 16}
# A few tokens each: long enough that the kill and the restart find jobs running.
MAX_TOKENS = 12


@pytest.mark.timeout(600)
def test_fifty_jobs_complete_exactly_once_through_a_killed_worker_and_a_nats_restart(
    jobs_stack: RunningStack,
) -> None:
    run = uuid.uuid4().hex[:8]
    key = jobs_stack.create_key(["inference", "read"])
    names: list[str] = []
    with jobs_stack.http(key) as http:
        for i in range(JOBS_PER_PATH["rest"]):
            body = completion_job(MODEL, f"Fact {i}: the sky is", MAX_TOKENS)
            created = http.post("/api/v1/jobs", params={"request_id": f"rest-{run}-{i}"}, json=body)
            assert created.status_code == 200, created.text
            names.append(created.json()["name"])
        # A retried create is the first job (AIP-155).
        again = http.post(
            "/api/v1/jobs",
            params={"request_id": f"rest-{run}-0"},
            json=completion_job(MODEL, "Fact 0: the sky is", MAX_TOKENS),
        )
        assert again.json()["name"] == names[0]

        channel = keyed_channel(jobs_stack.grpc_target, key)
        stub = jobs_pb2_grpc.JobsServiceStub(channel)
        for i in range(JOBS_PER_PATH["grpc"]):
            job = jobs_pb2.Job(
                request=jobs_pb2.JobRequest(
                    completion=openai_pb2.CreateCompletionRequest(
                        model=MODEL,
                        prompt=struct_pb2.Value(string_value=f"Note {i}: water is"),
                        max_tokens=MAX_TOKENS,
                    )
                )
            )
            created_job = stub.CreateJob(
                jobs_pb2.CreateJobRequest(job=job, request_id=f"grpc-{run}-{i}"), timeout=10
            )
            assert created_job.state == jobs_pb2.Job.STATE_QUEUED
            names.append(created_job.name)
        channel.close()

        nats_bodies = [
            (
                f"nats-{run}-{i}",
                {
                    "job": {
                        "request": {
                            "chat_completion": {
                                "model": MODEL,
                                "messages": [{"role": "user", "content": f"Say {i}."}],
                                "max_tokens": MAX_TOKENS,
                            }
                        },
                        "metadata": {"msg_id": f"nats-{run}-{i}"},
                    }
                },
            )
            for i in range(JOBS_PER_PATH["nats"])
        ]
        answers = asyncio.run(submit_over_nats(jobs_stack, key, nats_bodies))
        assert set(answers) == {msg_id for msg_id, _ in nats_bodies}, answers
        names += [answer["name"] for answer in answers.values()]
        # A message published twice with the same Nats-Msg-Id is one job.
        assert len(set(names)) == 50

        # Part-way: the worker dies without warning; supervisord starts another.
        wanted = set(names)
        wait_until(lambda: count_ended(http, wanted) >= 8, 120, "8 jobs ended")
        supervisor = jobs_stack.supervisor()
        worker_pid = supervisor.pid("jobs-worker-0")
        os.kill(worker_pid, signal.SIGKILL)
        killed_at = count_ended(http, wanted)
        # Later: the NATS server restarts (its JetStream files under $FERRY_HOME/nats keep the queue).
        wait_until(lambda: count_ended(http, wanted) >= min(50, killed_at + 10), 180, "10 more jobs ended")
        restarted_at = count_ended(http, wanted)
        supervisor.stop("nats")
        supervisor.start("nats")
        assert supervisor.pid("jobs-worker-0") != worker_pid

        ended = wait_ended(http, names, timeout=300)

    states = {name: job["state"] for name, job in ended.items()}
    assert list(states.values()) == ["STATE_SUCCEEDED"] * 50, {
        n: s for n, s in states.items() if s != "STATE_SUCCEEDED"
    }
    ids = [name.removeprefix("jobs/") for name in names]
    # One result per job.
    results = query(
        jobs_stack, "SELECT job_id, count(*) FROM job_results WHERE job_id = ANY(%s) GROUP BY job_id", ids
    )
    assert len(results) == 50 and all(count == 1 for _, count in results)
    attempts = dict(query(jobs_stack, "SELECT id, attempts FROM jobs WHERE id = ANY(%s)", ids))
    retried = sorted(job_id for job_id, n in attempts.items() if n > 1)
    # The kill met work in progress: some job was interrupted and ran again.
    assert retried, f"the SIGKILL (after {killed_at} ended) interrupted no job: nothing was tested"
    # Exactly once: no job has two tries that succeeded (a double run would show as a second one).
    succeeded_tries = query(
        jobs_stack,
        "SELECT job_id, count(*) FROM job_attempts WHERE job_id = ANY(%s) AND end_time IS NOT NULL "
        "AND error_code = '' GROUP BY job_id",
        ids,
    )
    assert len(succeeded_tries) == 50, succeeded_tries
    assert all(count == 1 for _, count in succeeded_tries), [row for row in succeeded_tries if row[1] != 1]

    # One transaction record per job, keyed by the job's id, and it is the try that answered.
    def recorded() -> list[tuple[str, str, int]]:
        return query(
            jobs_stack,
            "SELECT request_id, status, completion_tokens FROM transactions WHERE request_id = ANY(%s)",
            ids,
        )

    wait_until(
        lambda: sum(1 for _, status, _ in recorded() if status == "SUCCEEDED") == 50,
        60,
        "every job's transaction record SUCCEEDED",
        every=0.5,
    )
    for request_id, _status, tokens in recorded():
        answer = ended[f"jobs/{request_id}"]
        usage = next(iter(answer["result"].values()))["usage"]
        assert tokens == usage["completion_tokens"]
        assert answer["transaction"] == f"transactions/{request_id}"
    print(
        f"\n50 jobs: worker killed after {killed_at} ended, NATS restarted after {restarted_at}; "
        f"{len(retried)} ran more than once ({retried}); every one SUCCEEDED with one result and one record"
    )


def test_a_job_that_always_fails_ends_failed_after_the_configured_attempts(jobs_stack: RunningStack) -> None:
    with jobs_stack.http() as http:
        # Accepted at create (a well-formed request for a configured model); its upstream is unreachable.
        created = http.post("/api/v1/jobs", json=completion_job(NOWHERE, "Hello", 4))
        assert created.status_code == 200, created.text
        job = wait_ended(http, [created.json()["name"]], timeout=120)[created.json()["name"]]
    assert job["state"] == "STATE_FAILED"
    assert job["attempts"] == MAX_ATTEMPTS
    assert job["error_code"] == "UNAVAILABLE" and job["error_message"]
    assert "result" not in job
    job_id = job["name"].removeprefix("jobs/")
    tries = query(
        jobs_stack, "SELECT attempt, error_code FROM job_attempts WHERE job_id = %s ORDER BY attempt", job_id
    )
    assert tries == [(n, "UNAVAILABLE") for n in range(1, MAX_ATTEMPTS + 1)]


def test_a_job_created_while_nats_is_down_is_queued_when_it_returns(jobs_stack: RunningStack) -> None:
    supervisor = jobs_stack.supervisor()
    supervisor.stop("nats")
    try:
        with jobs_stack.http() as http:
            created = http.post("/api/v1/jobs", json=completion_job(MODEL, "Stored first:", 2))
            # Accepted: the job is in PostgreSQL; the outbox publishes it once NATS is back.
            assert created.status_code == 200, created.text
            name = created.json()["name"]
            assert http.get(f"/api/v1/{name}").json()["state"] == "STATE_QUEUED"
    finally:
        supervisor.start("nats")
    with jobs_stack.http() as http:
        job = wait_ended(http, [name], timeout=120)[name]
    assert job["state"] == "STATE_SUCCEEDED" and job["attempts"] == 1


def test_a_cancelled_queued_job_is_skipped_by_the_worker(jobs_stack: RunningStack) -> None:
    supervisor = jobs_stack.supervisor()
    supervisor.stop("jobs-worker-0")
    try:
        with jobs_stack.http() as http:
            created = http.post("/api/v1/jobs", json=completion_job(MODEL, "Never run:", 2))
            name = created.json()["name"]
            cancelled = http.post(f"/api/v1/{name}:cancel", json={})
            assert cancelled.json()["state"] == "STATE_CANCELLED" and cancelled.json()["attempts"] == 0
            # A job created after it runs once the worker is back: the queue moved past the cancelled one.
            after = http.post("/api/v1/jobs", json=completion_job(MODEL, "Runs:", 2)).json()["name"]
    finally:
        supervisor.start("jobs-worker-0")
    with jobs_stack.http() as http:
        assert wait_ended(http, [after], timeout=120)[after]["state"] == "STATE_SUCCEEDED"
        job = http.get(f"/api/v1/{name}").json()
    assert job["state"] == "STATE_CANCELLED" and job["attempts"] == 0 and not job.get("transaction")
    assert query(
        jobs_stack, "SELECT count(*) FROM transactions WHERE request_id = %s", name.removeprefix("jobs/")
    ) == [(0,)]


def test_a_job_submitted_over_nats_in_protobuf_is_answered_in_protobuf(jobs_stack: RunningStack) -> None:
    key = jobs_stack.create_key(["inference"])
    request = jobs_pb2.CreateJobRequest(
        job=jobs_pb2.Job(
            request=jobs_pb2.JobRequest(
                completion=openai_pb2.CreateCompletionRequest(
                    model=MODEL, prompt=struct_pb2.Value(string_value="Hi"), max_tokens=2
                )
            )
        ),
        request_id=f"proto-{uuid.uuid4().hex[:8]}",
    )

    async def submit() -> tuple[dict[str, str], bytes]:
        nc = await nats.connect(nats_url(jobs_stack), **client_login(jobs_stack))
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.jetstream().publish(
                jobs_stack.settings.nats.submit_subject,
                request.SerializeToString(),
                headers={
                    "Authorization": f"Bearer {key}",
                    "Content-Type": "application/protobuf",
                    "Ferry-Reply-To": inbox,
                },
            )
            answer = await sub.next_msg(timeout=30)
            return dict(answer.headers or {}), answer.data
        finally:
            await nc.close()

    headers, data = asyncio.run(submit())
    assert headers.get("Content-Type") == "application/protobuf" and "Ferry-Error" not in headers
    job = jobs_pb2.Job.FromString(data)
    assert job.name.startswith("jobs/") and job.state == jobs_pb2.Job.STATE_QUEUED
    with jobs_stack.http(key) as http:
        assert wait_ended(http, [job.name], timeout=120)[job.name]["state"] == "STATE_SUCCEEDED"
