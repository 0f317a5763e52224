"""Two replicas of the models, transactions, gateway and inference services behind Envoy; one of each
is killed (SIGKILL) under steady load, over gRPC and REST alike.

What a user would notice: no read fails while a replica dies (Envoy retries it on the other one and
the health checks and outlier detection take the dead one out of rotation), and the replica that
supervisord restarts is back in rotation and serving once it answers its health check again.
Generation is not retried after a reset: a generation in flight on the killed inference replica may
fail (UNAVAILABLE / 503, the client may retry it), never one sent once the replica is out of
rotation, and the records tell no answer the client did not get.

The package's shared stack (tests/resilience/conftest.py: the trivial `bench-stream` model, two
replicas of models, transactions, gateway and inference, the setting `make run` offers for this).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial

import grpc
import httpx
import psycopg
import pytest
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from ferry.models.v1 import models_pb2, models_pb2_grpc
from ferry.transactions.v1 import transactions_pb2, transactions_pb2_grpc

from launcher import envoy
from launcher.stack import replica_name
from tests.resilience.support import (
    Load,
    Outcome,
    clusters,
    healthy,
    replica_address,
    wait_for,
)
from tests.stack import RunningStack

pytestmark = pytest.mark.stack

REPLICATED = ("models", "transactions", "gateway")
# Generation (unary: retried under the request's id only when no replica got it, never after a reset):
# the inference processes, which Envoy reaches for generations through its generation cluster.
GENERATING = "inference"
GENERATION_CLUSTER = envoy.GENERATION_CLUSTER
# At most this long after the kill for the replica to come back.
RECOVERY_TIMEOUT_SECONDS = 60.0
# Each load thread pauses this long between calls: steady, light load (2 shared cores).
PAUSE_SECONDS = 0.02


def taken_out(stack: RunningStack, cluster: str, address: str) -> bool:
    return not healthy(stack, cluster, address)


def successes(stack: RunningStack, cluster: str, address: str) -> int:
    return int(clusters(stack).get((cluster, address), {}).get("rq_success", "0"))


def serving(stack: RunningStack, cluster: str, address: str, before: int) -> bool:
    """The replica answered requests successfully since it had `before` successes."""
    return successes(stack, cluster, address) > before


# -- steady read load --------------------------------------------------------------------------------


def start_load(stack: RunningStack, rest: httpx.Client) -> Load:
    channel = stack.channel()
    models = models_pb2_grpc.ModelsServiceStub(channel)
    transactions = transactions_pb2_grpc.TransactionsServiceStub(channel)
    model = stack.settings.triton.default_model

    def grpc_list_models(_: str) -> None:
        reply = models.ListModels(models_pb2.ListModelsRequest(), timeout=30)
        assert any(m.name == f"models/{model}" for m in reply.models), reply

    def grpc_get_model(_: str) -> None:
        models.GetModel(models_pb2.GetModelRequest(name=f"models/{model}"), timeout=30)

    def grpc_list_transactions(_: str) -> None:
        transactions.ListTransactions(transactions_pb2.ListTransactionsRequest(page_size=1), timeout=30)

    def rest_get(path: str) -> Callable[[str], None]:
        def call(_: str) -> None:
            response = rest.get(path)
            assert response.status_code == 200, (response.status_code, response.text[:200])

        return call

    load = Load(think_seconds=PAUSE_SECONDS)
    load.run("grpc ListModels", grpc_list_models)
    load.run("grpc GetModel", grpc_get_model)
    load.run("grpc ListTransactions", grpc_list_transactions)
    load.run("REST GET /api/v1/models", rest_get("/api/v1/models"))
    load.run("REST GET /api/v1/transactions", rest_get("/api/v1/transactions?page_size=1"))
    return load


def test_a_killed_replica_costs_clients_nothing_and_comes_back(stack: RunningStack) -> None:
    supervisor = stack.supervisor()
    second = {name: replica_address(stack, name, 1) for name in REPLICATED}
    # Both replicas of each service are in rotation before anything happens.
    wait_for(
        lambda: all(healthy(stack, n, replica_address(stack, n, i)) for n in REPLICATED for i in (0, 1)),
        30,
        "every replica healthy in Envoy",
    )
    retries_before = {n: stack.envoy_stat(f"cluster.{n}.upstream_rq_retry") for n in REPLICATED}

    # (The stack is shared: replica 1 serving this test's load is counted from here.)
    served_before = {n: successes(stack, n, second[n]) for n in REPLICATED}
    with stack.http() as rest:
        load = start_load(stack, rest)
        try:
            for name in REPLICATED:
                wait_for(
                    partial(serving, stack, name, second[name], served_before[name]),
                    30,
                    f"{name}'s replica 1 serving",
                )
            old_pids = {n: supervisor.pid(replica_name(n, 1)) for n in REPLICATED}
            killed_at = time.monotonic()
            for name in REPLICATED:
                supervisor.signal(replica_name(name, 1), "KILL")
            # Seconds from the kill until Envoy took the replica out, had it healthy again, and sent
            # it requests that succeeded.
            out_at: dict[str, float] = {}
            back_at: dict[str, float] = {}
            serving_at: dict[str, float] = {}
            for name in REPLICATED:
                wait_for(partial(taken_out, stack, name, second[name]), 10, f"{name}'s killed replica out")
                out_at[name] = round(time.monotonic() - killed_at, 2)
            for name in REPLICATED:
                wait_for(
                    partial(healthy, stack, name, second[name]),
                    RECOVERY_TIMEOUT_SECONDS,
                    f"{name}'s restarted replica healthy again",
                )
                back_at[name] = round(time.monotonic() - killed_at, 2)
                served = successes(stack, name, second[name])
                wait_for(
                    partial(serving, stack, name, second[name], served),
                    30,
                    f"{name}'s restarted replica serving again",
                )
                serving_at[name] = round(time.monotonic() - killed_at, 2)
            # A little more load on the recovered pair: a few more answers on every thread.
            wait_for(load.each_answered(5, since=time.monotonic()), 30, "load after the recovery")
        finally:
            load.finish()

    new_pids = {n: supervisor.pid(replica_name(n, 1)) for n in REPLICATED}
    assert all(new_pids[n] != old_pids[n] for n in REPLICATED), "supervisord restarted the replicas"
    retries = {n: stack.envoy_stat(f"cluster.{n}.upstream_rq_retry") - retries_before[n] for n in REPLICATED}
    ejections = {
        n: stack.envoy_stat(f"cluster.{n}.outlier_detection.ejections_enforced_total") for n in REPLICATED
    }
    errors = load.failures()
    print(
        f"\nreplica kill under load: {load.calls} reads, {len(errors)} errors; "
        f"taken out after {out_at} s; healthy again after {back_at} s; serving again after "
        f"{serving_at} s (from the kill); Envoy retries {retries}; outlier ejections {ejections}"
    )
    assert load.calls > 0
    assert errors == [], f"{len(errors)} of {load.calls} reads failed: {errors[:5]}"


def recorded_generations(stack: RunningStack, request_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{request id: (status, output)} of the transaction records found (one per id: the primary key)."""
    with psycopg.connect(stack.database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT request_id, status, output FROM transactions WHERE request_id = ANY(%s)", (request_ids,)
        ).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def test_a_killed_inference_replica_fails_only_the_generations_in_flight_on_it(stack: RunningStack) -> None:
    """Unary generations (native gRPC with the body's request_id, OpenAI REST with x-request-id)
    while one of two inference replicas is SIGKILLed. Envoy does not retry a generation after a reset
    (the dead replica may have recorded its start: docs/deploy.md, "Resilience"), so a generation in
    flight on it at the kill (or sent to it in the moment before Envoy saw its connection close) may
    end with UNAVAILABLE / 503, which the client may retry itself. What a user can count on: only
    those fail (at most one per load thread: each has one call in flight);
    every generation answered has exactly one SUCCEEDED record holding the output the client got; and
    every generation sent once the dead replica is out of rotation is answered. (A failed one may be
    recorded SUCCEEDED when the kill fell between its record and its answer leaving: reported.)"""
    supervisor = stack.supervisor()
    second = replica_address(stack, GENERATING, 1)
    model = stack.settings.triton.default_model
    wait_for(partial(healthy, stack, GENERATION_CLUSTER, second), 30, "inference replica 1 healthy")
    retries_before = stack.envoy_stat(f"cluster.{GENERATION_CLUSTER}.upstream_rq_retry")
    served_before = successes(stack, GENERATION_CLUSTER, second)
    native = inference_pb2_grpc.InferenceServiceStub(stack.channel())
    # What each client got: {request id: output}.
    outputs: dict[str, str] = {}

    def grpc_generate(request_id: str) -> Outcome:
        try:
            reply = native.Generate(
                inference_pb2.GenerateRequest(
                    model=f"models/{model}",
                    request_id=request_id,
                    prompt=f"count {random.random()}",
                    sampling=inference_pb2.SamplingParams(max_tokens=8),
                ),
                timeout=60,
            )
        except grpc.RpcError as error:
            return False, error.code().name, False  # type: ignore[attr-defined]
        outputs[request_id] = reply.text
        return bool(reply.text), "OK", False

    with stack.http() as rest:

        def rest_completion(request_id: str) -> Outcome:
            response = rest.post(
                "/v1/completions",
                json={"model": model, "prompt": f"count {random.random()}", "max_tokens": 8},
                headers={"x-request-id": request_id},
            )
            if response.status_code != 200:
                return False, str(response.status_code), "retry-after" in response.headers
            outputs[request_id] = response.json()["choices"][0]["text"]
            return True, "200", False

        load = Load(think_seconds=PAUSE_SECONDS)
        load.run("grpc Generate", grpc_generate)
        load.run("REST /v1/completions", rest_completion)
        threads = len(load.threads)
        try:
            wait_for(
                partial(serving, stack, GENERATION_CLUSTER, second, served_before),
                30,
                "inference replica 1 serving",
            )
            killed_at = time.monotonic()
            supervisor.signal(replica_name(GENERATING, 1), "KILL")
            signalled_at = time.monotonic()
            wait_for(partial(taken_out, stack, GENERATION_CLUSTER, second), 10, "the killed replica out")
            out_at = time.monotonic()
            wait_for(
                partial(healthy, stack, GENERATION_CLUSTER, second), RECOVERY_TIMEOUT_SECONDS, "replica back"
            )
            back = round(time.monotonic() - killed_at, 2)
            served = successes(stack, GENERATION_CLUSTER, second)
            wait_for(partial(serving, stack, GENERATION_CLUSTER, second, served), 30, "replica serving again")
            serving_after = round(time.monotonic() - killed_at, 2)
        finally:
            load.finish()
    answers = load.of()
    failed = [a for a in answers if not a.ok]
    answered = [a.request_id for a in answers if a.ok]
    print(
        f"\ninference replica kill under generation load: {len(answers)} generations, "
        f"{len(failed)} failed (in flight on the killed replica: {[a.status for a in failed]}); "
        f"out of rotation after {out_at - killed_at:.2f} s, healthy again after {back} s, serving after "
        f"{serving_after} s; Envoy retries "
        f"{stack.envoy_stat(f'cluster.{GENERATION_CLUSTER}.upstream_rq_retry') - retries_before}"
    )
    # Only what was in flight at the kill fails, and as a retryable UNAVAILABLE / 503.
    assert len(failed) <= threads, f"more failures than calls in flight: {load.failures()}"
    for a in failed:
        assert a.status in ("UNAVAILABLE", "503"), a
        # Sent to the replica before Envoy saw it die: before the kill, or in the moment until Envoy
        # saw its connection close (a stream sent on it then is reset, not refused: not retried).
        assert a.started <= out_at and a.ended >= killed_at, f"not in flight at the kill: {a}"
        print(f"  {a.name} failed {a.started - signalled_at:+.3f} s from the kill signal, {a.status}")
    # Once the dead replica is out of rotation, every generation is answered (until it is back, and after).
    late = [a for a in answers if a.started >= out_at and not a.ok]
    assert not late, f"generations sent after the replica was taken out failed: {late[:5]}"

    # Every answered id has its one SUCCEEDED record holding what the client got (the dead replica's
    # spool is delivered once it is back).
    found: dict[str, tuple[str, str]] = {}

    def all_recorded() -> bool:
        found.update(recorded_generations(stack, answered))
        return all(found.get(i, ("",))[0] == "SUCCEEDED" for i in answered)

    wait_for(all_recorded, 60, "every answered generation recorded SUCCEEDED", every=0.5)
    wrong = [(i, found[i][1], outputs[i]) for i in answered if found[i][1] != outputs[i]]
    assert not wrong, f"records whose output is not what the client got: {wrong[:3]}"
    failed_records = recorded_generations(stack, [a.request_id for a in failed])
    print(f"records of the failed generations: {sorted(status for status, _ in failed_records.values())}")
    # A failed generation (every one was in flight at the kill: asserted above) may still be recorded
    # SUCCEEDED: the replica writes the record before its answer leaves, and the kill can fall between
    # the two (the answer is then lost in transit; the client may retry with the same id). Seen once in
    # a few dozen kills; reported here, not an error.
    claimed = {i: status for i, (status, _) in failed_records.items() if status == "SUCCEEDED"}
    if claimed:
        print(f"  recorded SUCCEEDED but lost in transit at the kill: {sorted(claimed)}")
