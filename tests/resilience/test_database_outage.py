"""PostgreSQL faults under steady generation load, through Envoy (REST and native gRPC), on the
package's shared stack (tests/resilience/conftest.py; the trivial `bench-stream` model, so Triton
costs nothing; two replicas of the gateway, inference and transactions services).

What a user would notice:
- PostgreSQL paused for 15 s (SIGSTOP to the postmaster and every child: to its clients it looks like
  a network partition): a key that was in use keeps working, no refusal at all; a key never seen
  gets 503 / UNAVAILABLE with a retry hint; once PostgreSQL is back, every answered request has its
  one transaction record (they waited in the spools);
- PostgreSQL killed (SIGKILL): supervisord restarts it, and records flow again within a bounded time
  (measured and printed; the assertion is only a generous bound), while generation never stopped.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable

import grpc
import httpx
import psutil
import psycopg
import pytest
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from google.rpc import error_details_pb2

from launcher.postgres import socket_dir
from launcher.supervisor import socket_path
from services.common.errors import error_details
from services.common.tokens import new_key_secret
from tests.resilience.support import FAST_MODEL, Load, Outcome, wait_for
from tests.stack import RunningStack, keyed_channel

pytestmark = pytest.mark.stack

MODEL = FAST_MODEL
PAUSE_SECONDS = 15.0
# Generous: records and restarts on a loaded 2-core machine.
WARM_UP_TIMEOUT_SECONDS = 60.0
DRAIN_TIMEOUT_SECONDS = 90.0
RECOVERY_BOUND_SECONDS = 60.0
# Each load thread pauses this long between requests: steady, light load.
THINK_SECONDS = 0.05


# -- load --------------------------------------------------------------------------------------------


def rest_generate(client: httpx.Client) -> Callable[[str], Outcome]:
    def call(request_id: str) -> Outcome:
        reply = client.post(
            f"/api/v1/models/{MODEL}:generate",
            json={"request_id": request_id, "prompt": "one two three", "sampling": {"max_tokens": 4}},
        )
        return reply.status_code == 200, str(reply.status_code), "retry-after" in reply.headers

    return call


def grpc_generate(channel: grpc.Channel) -> Callable[[str], Outcome]:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)

    def call(request_id: str) -> Outcome:
        request = inference_pb2.GenerateRequest(
            model=MODEL,
            request_id=request_id,
            prompt="one two three",
            sampling=inference_pb2.SamplingParams(max_tokens=4),
        )
        try:
            stub.Generate(request, timeout=30)
        except grpc.RpcError as err:
            metadata = dict(err.trailing_metadata() or ()) | dict(err.initial_metadata() or ())  # type: ignore[attr-defined]
            hint = "retry-after" in metadata or isinstance(
                error_details(err).get("RetryInfo"), error_details_pb2.RetryInfo
            )
            return False, err.code().name, hint  # type: ignore[attr-defined]
        return True, "OK", False

    return call


# -- PostgreSQL --------------------------------------------------------------------------------------


def postgres_processes(stack: RunningStack) -> list[psutil.Process]:
    """The postmaster supervisord runs, and its children."""
    postmaster = psutil.Process(stack.supervisor().pid("postgres"))
    return [postmaster, *postmaster.children(recursive=True)]


def transactions_of(stack: RunningStack, request_ids: list[str]) -> dict[str, int]:
    with psycopg.connect(stack.database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM transactions WHERE request_id = ANY(%s) GROUP BY request_id",
            (request_ids,),
        ).fetchall()
    return {row[0]: int(row[1]) for row in rows}


def wait_recorded(stack: RunningStack, request_ids: list[str], timeout: float) -> dict[str, int]:
    """Until every request id has its transaction (the spools drain); the counts found."""
    deadline = time.monotonic() + timeout
    found: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            found = transactions_of(stack, request_ids)
        except psycopg.OperationalError:
            found = {}
        if len(found) == len(request_ids):
            break
        time.sleep(0.5)
    return found


def gateway_metric(stack: RunningStack, name: str) -> float:
    text = httpx.get(stack.metrics_urls["gateway"], timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported by the gateway")


def gateway_metrics_urls(stack: RunningStack) -> list[str]:
    """Every gateway replica's metrics page."""
    gateway = stack.settings.gateway
    return [f"http://{gateway.host}:{metrics}/metrics" for _, metrics in gateway.replica_ports()]


def gateway_checks(url: str) -> float:
    """The key checks (Envoy's ext_authz) one gateway replica allowed."""
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith("ferry_grpc_server_handled_total{") and 'grpc_method="Check"' in line:
            if 'grpc_code="OK"' in line:
                return float(line.split()[-1])
    return 0.0


# -- the tests ---------------------------------------------------------------------------------------


def test_a_paused_database_refuses_no_known_key(stack: RunningStack) -> None:
    known = stack.create_key(["inference"])
    unknown = new_key_secret()
    # The gateway's log of this test only (the stack is shared).
    gateway_log = stack.settings.log_dir / "gateway.log"
    log_start = gateway_log.stat().st_size
    load = Load(think_seconds=THINK_SECONDS)
    known_rest, unknown_rest = stack.http(known, timeout=30), stack.http(unknown, timeout=30)
    known_grpc, unknown_grpc = (
        keyed_channel(stack.grpc_target, known),
        keyed_channel(stack.grpc_target, unknown),
    )
    try:
        for i in range(2):
            load.run(f"known-rest-{i}", rest_generate(known_rest))
            load.run(f"known-grpc-{i}", grpc_generate(known_grpc))
        load.run("unknown-rest", rest_generate(unknown_rest))
        load.run("unknown-grpc", grpc_generate(unknown_grpc))
        # Warm: every known-key thread answered a few times (both gateway replicas saw the key), the
        # unknown key was tried.
        wait_for(load.each_answered(5, "known"), WARM_UP_TIMEOUT_SECONDS, "the known key answered")
        wait_for(load.each_tried(2, "unknown"), WARM_UP_TIMEOUT_SECONDS, "the unknown key tried")
        processes = postgres_processes(stack)
        for proc in processes:
            proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            time.sleep(PAUSE_SECONDS)
            degraded = gateway_metric(stack, "ferry_gateway_key_store_degraded")
            health = httpx.get(f"{stack.rest}/healthz", timeout=5).status_code
        finally:
            for proc in processes:
                proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        # Every known-key thread answered again after the pause.
        wait_for(
            load.each_answered(2, "known", since=resumed), DRAIN_TIMEOUT_SECONDS, "answers after the pause"
        )
    finally:
        load.finish()
        known_rest.close()
        unknown_rest.close()
        known_grpc.close()
        unknown_grpc.close()

    # What the edge and the gateway saw (printed for the record; the assertions follow).
    gateway_lines = httpx.get(stack.metrics_urls["gateway"], timeout=5).text.splitlines()
    print(
        "gateway Check outcomes:",
        [line for line in gateway_lines if "Authorization" in line and "_handled" in line],
    )
    envoy_stats = httpx.get(f"{stack.envoy_admin}/stats", timeout=5).text.splitlines()
    print(
        "envoy:",
        [
            line
            for line in envoy_stats
            if (
                line.startswith("cluster.gateway.")
                and ("ejections_enforced_total" in line or "retry" in line)
            )
            or "ext_authz" in line
        ],
    )
    known_answers = load.of("known")
    refused = [a for a in known_answers if not a.ok]
    during = [a for a in known_answers if a.started >= paused and a.ended <= resumed]
    print(
        f"known key: {len(known_answers)} requests, {len(during)} during the {PAUSE_SECONDS:.0f} s pause, "
        f"{len(refused)} refused"
    )
    assert during, "no request with the known key was answered during the pause"
    assert not refused, f"the known key was refused: {[(a.status, a.request_id) for a in refused[:5]]}"
    assert degraded == 1.0, "the gateway did not report the degraded key store"
    assert health == 200

    unknown_answers = load.of("unknown")
    in_pause = [a for a in unknown_answers if a.started >= paused + 0.5 and a.ended <= resumed]
    statuses = sorted({a.status for a in in_pause})
    unavailable = [a for a in in_pause if a.status in ("503", "UNAVAILABLE")]
    print(f"unknown key during the pause: {len(in_pause)} requests, answers {statuses}")
    # 401 / UNAUTHENTICATED only while the miss cached before the pause lasts (auth.cache_seconds).
    assert set(statuses) <= {"503", "UNAVAILABLE", "401", "UNAUTHENTICATED"}, statuses
    assert unavailable, "the unknown key never got 503 / UNAVAILABLE during the pause"
    assert all(a.retry_hint for a in unavailable), "a 503 / UNAVAILABLE came without a retry hint"
    assert not any(a.ok for a in unknown_answers)

    answered = [a.request_id for a in known_answers]
    started = time.monotonic()
    found = wait_recorded(stack, answered, DRAIN_TIMEOUT_SECONDS)
    print(
        f"{len(found)} of {len(answered)} records in PostgreSQL {time.monotonic() - started:.1f} s after the check began"
    )
    missing = sorted(set(answered) - set(found))
    assert not missing, f"{len(missing)} answered requests have no transaction, e.g. {missing[:3]}"
    assert all(count == 1 for count in found.values())
    assert gateway_metric(stack, "ferry_gateway_key_store_degraded") == 0.0
    with gateway_log.open("rb") as file:
        file.seek(log_start)
        log = file.read().decode(errors="replace")
    entered, left = log.count("DEGRADED, serving keys"), log.count("key store reachable again")
    print(f"gateway log: {entered} line(s) entering the degraded state, {left} leaving it")
    assert entered >= 1 and left == entered


def test_a_killed_database_is_restarted_and_records_flow(stack: RunningStack) -> None:
    known = stack.create_key(["inference"])
    generate = rest_generate(stack.http(known, timeout=30))
    # Seen by the gateway before the crash: by both replicas (each keeps its own records).
    checked_before = [gateway_checks(url) for url in gateway_metrics_urls(stack)]

    def seen_by_every_replica() -> bool:
        assert generate(str(uuid.uuid4()))[0]
        return all(
            gateway_checks(url) > n
            for url, n in zip(gateway_metrics_urls(stack), checked_before, strict=True)
        )

    wait_for(seen_by_every_replica, WARM_UP_TIMEOUT_SECONDS, "the key checked by both gateway replicas")
    old = stack.supervisor().pid("postgres")
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    # Generation does not wait for the database: the key was seen, records spool.
    during = str(uuid.uuid4())
    ok, status, _ = generate(during)
    assert ok, f"generation failed right after PostgreSQL was killed: {status}"

    def back() -> bool:
        info = stack.supervisor().process("postgres")
        if info["statename"] != "RUNNING" or info["pid"] == old:
            return False
        try:
            with psycopg.connect(stack.database_url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    while not back():
        assert time.monotonic() - killed < RECOVERY_BOUND_SECONDS, "PostgreSQL was not restarted"
        time.sleep(0.2)
    restarted = time.monotonic() - killed
    after = str(uuid.uuid4())
    ok, status, _ = generate(after)
    assert ok, status
    found = wait_recorded(stack, [during, after], RECOVERY_BOUND_SECONDS)
    flowing = time.monotonic() - killed
    print(
        f"SIGKILL -> PostgreSQL accepting connections again {restarted:.1f} s; "
        f"-> the records of requests made meanwhile and after it in PostgreSQL {flowing:.1f} s"
    )
    assert found == {during: 1, after: 1}, found
    assert flowing < RECOVERY_BOUND_SECONDS
    # Every service that owns tables reconnected by itself: all SERVING again, so /readyz is 200.
    while httpx.get(f"{stack.rest}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() - killed < RECOVERY_BOUND_SECONDS, "not every service recovered"
        time.sleep(0.2)
    print(
        f"SIGKILL -> /readyz 200 again (every service's pool reconnected) {time.monotonic() - killed:.1f} s"
    )


def test_database_and_unix_sockets_are_owner_only(stack: RunningStack) -> None:
    """Nothing local but ferry's own user reaches the embedded PostgreSQL (its data and its socket:
    trust authentication admits whoever can connect), supervisord's control socket, Envoy's admin
    socket, the spools (prompts and outputs on their way to PostgreSQL) or the logs. (Triton's
    python-backend shared-memory regions are not checked: the backend makes them 0644 itself,
    whatever the umask.)"""
    settings = stack.settings
    pgdata = settings.home / "pgdata"
    paths = [
        pgdata,
        socket_dir(pgdata) / ".s.PGSQL.5432",
        socket_path(settings),
        *settings.run_dir.glob("*.sock"),
        *(p for p in settings.spool_dir.rglob("*") if p.is_file()),
        # (supervisord.out is the test harness's own copy of supervisord's output.)
        *(p for p in settings.log_dir.rglob("*") if p.is_file() and p.name != "supervisord.out"),
    ]
    open_to_others = {str(p): oct(p.stat().st_mode & 0o777) for p in paths if p.stat().st_mode & 0o077}
    assert not open_to_others, open_to_others
    assert len(paths) >= 6, paths  # the data dir, PostgreSQL's, supervisord's and Envoy's sockets, ...
