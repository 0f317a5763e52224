"""Loss-free recording: the spool delivers through outages and crashes, each record exactly once."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ferry.audit.v1 import audit_pb2
from ferry.transactions.v1 import transactions_pb2 as tx
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.common.config import REPO_ROOT, ServiceSettings
from services.common.interceptor import Lifecycle
from services.common.server import Runtime
from services.recording import HEALTH_NAME, Recorder, SpoolLocked
from tests.records.conftest import Database, Services, free_port
from tests.stack import wait_serving

Status = tx.Transaction.Status


@pytest.fixture(autouse=True)
def _spool_tests_need_one_database(database: Database) -> None:
    # These tests exercise the spool and its delivery, not PostgreSQL: the embedded server is enough,
    # unless the user named a server of their own.
    if database.kind == "external" and not os.environ.get("DATABASE_URL"):
        pytest.skip("recording tests run on the embedded server (set DATABASE_URL to run them on yours too)")


async def _list(transactions: Any, filter_: str) -> list[tx.Transaction]:
    out: list[tx.Transaction] = []
    token = ""
    while True:
        page = await transactions.ListTransactions(
            tx.ListTransactionsRequest(filter=filter_, page_size=1000, page_token=token)
        )
        out += page.transactions
        token = page.next_page_token
        if not token:
            return out


async def _audit_events(audit: Any, filter_: str) -> list[audit_pb2.AuditEvent]:
    page = await audit.ListEvents(audit_pb2.ListEventsRequest(filter=filter_, page_size=1000))
    return list(page.events)


async def test_recorded_fields_in_progress_then_complete(
    services: Services, transactions: Any, audit: Any
) -> None:
    recorder = Recorder(services.settings(), f"fields-{uuid.uuid4().hex[:6]}")
    await recorder.start()
    try:
        rid = uuid.uuid4().hex
        recorder.transaction_started(
            rid,
            model="gemma-3-270m",
            principal="key-123",
            operation="/ferry.inference.v1.InferenceService/Generate",
            messages=[("system", "Be brief."), {"role": "user", "content": "Hi"}],
            parameters={"temperature": 0.2, "max_tokens": 32, "stop": ["\n"]},
            trace_id="0af7651916cd43dd8448eb211c80319c",
        )
        assert await recorder.flush(15)
        started = await transactions.GetTransaction(tx.GetTransactionRequest(name=f"transactions/{rid}"))
        assert started.status == Status.STATUS_IN_PROGRESS and not started.HasField("complete_time")
        recorder.transaction_finished(
            rid,
            status="succeeded",
            output="Hello!",
            finish_reason="stop",
            prompt_tokens=9,
            completion_tokens=2,
            ttft=0.125,
            latency=0.5,
        )
        event_id = recorder.operational("model.load", resource="models/gemma-3-270m", principal="admin")
        assert await recorder.flush(15)
        done = await transactions.GetTransaction(tx.GetTransactionRequest(name=f"transactions/{rid}"))
    finally:
        await recorder.stop()
        recorder.close()
    assert done.status == Status.STATUS_SUCCEEDED
    assert (done.principal, done.model, done.operation) == (
        "key-123",
        "gemma-3-270m",
        "/ferry.inference.v1.InferenceService/Generate",
    )
    assert [(m.role, m.content) for m in done.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert dict(done.parameters) == {"temperature": 0.2, "max_tokens": 32, "stop": ["\n"]}
    assert (done.output, done.finish_reason) == ("Hello!", "stop")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (9, 2, 11)
    assert (done.time_to_first_token.ToMilliseconds(), done.latency.ToMilliseconds()) == (125, 500)
    assert done.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert done.create_time == started.create_time and done.HasField("complete_time")
    events = await _audit_events(
        audit, "action = model.load AND principal = admin AND resource = models/gemma-3-270m"
    )
    assert event_id in {e.event_id for e in events}


async def _health(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
        return int(reply.status)


async def _until_health(address: str, status: int, seconds: float, failure: str) -> None:
    """Until the server's overall health is `status`; fails with `failure` after `seconds`."""
    deadline = time.monotonic() + seconds
    while await _health(address, "") != status:
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.2)


async def test_outage_spools_then_delivers_exactly_once(
    services: Services, transactions: Any, audit: Any
) -> None:
    """Transactions and Audit are down: recording still works (locally, fast), health says degraded
    but the process keeps SERVING; once they are back, every record arrives exactly once."""
    settings = services.settings(recording={"degraded_depth": 10, "max_backoff_seconds": 0.5})
    # A real health service, as a served process would have, to watch `ferry.recording`.
    port = free_port()
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    endpoint = ServiceSettings(port=port, metrics_port=0)
    runtime = Runtime("producer", settings, endpoint, server, health, Lifecycle(), [])
    await runtime.set_serving(True)

    principal = f"outage-{uuid.uuid4().hex[:8]}"
    recorder = Recorder(settings, principal)
    n = 40
    services.stop("transactions", "audit")
    try:
        await recorder.start(runtime)
        costs = []
        for i in range(n):
            rid = f"{principal}-{i}"
            t0 = time.perf_counter()
            recorder.transaction_started(rid, model="gemma-3-270m", principal=principal, prompt="x" * 2000)
            recorder.transaction_finished(rid, status="succeeded", output="y" * 500, completion_tokens=100)
            recorder.audit(
                audit_pb2.AuditEvent(
                    kind=audit_pb2.AuditEvent.Kind.KIND_RPC, request_id=rid, principal=principal
                )
            )
            costs.append(time.perf_counter() - t0)
        print(
            f"3 spool writes per request: median {sorted(costs)[n // 2] * 1e6:.0f} us, max {max(costs) * 1e6:.0f} us"
        )
        assert sorted(costs)[n // 2] < 0.01  # local work only, even with both services down
        await asyncio.sleep(1.5)
        txn_depth, audit_depth = recorder.depth()
        assert txn_depth == n and audit_depth >= n
        assert recorder.degraded
        assert REGISTRY.get_sample_value("ferry_recording_spool_depth", {"kind": "transaction"}) == n
        assert (REGISTRY.get_sample_value("ferry_recording_delivery_lag_seconds", {"kind": "audit"}) or 0) > 1
        assert (
            REGISTRY.get_sample_value("ferry_recording_delivery_failures_total", {"kind": "transaction"}) or 0
        ) > 0
        assert REGISTRY.get_sample_value("ferry_recording_degraded") == 1
        assert await _health(f"127.0.0.1:{port}", HEALTH_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(f"127.0.0.1:{port}", "") == health_pb2.HealthCheckResponse.SERVING
    finally:
        services.start("transactions", "audit")
    try:
        assert await recorder.flush(30), recorder.depth()
        records = await _list(transactions, f"principal = {principal}")
        assert sorted(r.request_id for r in records) == sorted(f"{principal}-{i}" for i in range(n))
        assert {r.status for r in records} == {Status.STATUS_SUCCEEDED}
        assert all(r.prompt == "x" * 2000 and r.usage.completion_tokens == 100 for r in records)
        events = await _audit_events(audit, f"principal = {principal} AND kind = RPC")
        assert sorted(e.request_id for e in events) == sorted(f"{principal}-{i}" for i in range(n))
        await asyncio.sleep(1.5)
        assert not recorder.degraded
        assert REGISTRY.get_sample_value("ferry_recording_spool_depth", {"kind": "transaction"}) == 0
        assert await _health(f"127.0.0.1:{port}", HEALTH_NAME) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await recorder.stop()
        recorder.close()
        await server.stop(None)
    verdict = await audit.VerifyChain(audit_pb2.VerifyChainRequest())
    assert verdict.valid, verdict.description


def _producer(services: Services, name: str, principal: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.records.producer", name, principal, mode],
        env=services.env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _run_until_killed(
    services: Services, name: str, principal: str, answered_before_kill: int
) -> dict[str, set[str]]:
    """Runs the producer, SIGKILLs it once it answered enough requests; returns what it printed."""
    proc = _producer(services, name, principal, "serve")
    seen: dict[str, set[str]] = {"started": set(), "answered": set(), "open": set()}
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        what, rid = line.split()
        seen[what].add(rid)
        if len(seen["answered"]) >= answered_before_kill or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)  # no chance to flush, finish or close anything
    proc.wait()
    for line in proc.stdout:  # lines written just before the kill
        what, rid = line.split()
        seen[what].add(rid)
    return seen


def _recover(services: Services, name: str, principal: str) -> None:
    proc = _producer(services, name, principal, "recover")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0 and out.strip().endswith("delivered"), out


async def _check_after_crash(transactions: Any, principal: str, seen: dict[str, set[str]]) -> None:
    records = {r.request_id: r for r in await _list(transactions, f"principal = {principal}")}
    # Every request that was started is there, once (the request id is the primary key). The kill may
    # land between a spool write and its print: at most one record more than the prints say.
    assert seen["started"] <= set(records) and len(set(records) - seen["started"]) <= 1
    # Every answered request is recorded as succeeded, with its output.
    for rid in seen["answered"]:
        assert records[rid].status == Status.STATUS_SUCCEEDED, rid
        assert records[rid].output == f"output {int(rid.rsplit('-', 1)[1])}"
    # The ones cut off mid-way are incomplete (one may have finished right before the kill, unanswered).
    unanswered = set(records) - seen["answered"]
    incomplete = {rid for rid in unanswered if records[rid].status == Status.STATUS_INCOMPLETE}
    assert seen["open"] <= incomplete and len(unanswered - incomplete) <= 1
    assert incomplete, "the kill should leave at least one request open"
    for rid in incomplete:
        assert "exited before" in records[rid].error_message


async def test_kill_9_while_delivering(services: Services, transactions: Any) -> None:
    """Services up: records are being delivered while the producer is killed; after the restart every
    answered request is recorded once, the cut-off ones as incomplete."""
    principal = f"kill-{uuid.uuid4().hex[:8]}"
    seen = _run_until_killed(services, principal, principal, answered_before_kill=60)
    _recover(services, principal, principal)
    await _check_after_crash(transactions, principal, seen)
    # Recovering again changes nothing: no duplicates, no second outcome.
    before = {r.request_id: r for r in await _list(transactions, f"principal = {principal}")}
    _recover(services, principal, principal)
    after = {r.request_id: r for r in await _list(transactions, f"principal = {principal}")}
    assert after == before


async def test_kill_9_during_an_outage(services: Services, transactions: Any) -> None:
    """Transactions down while the producer runs and dies: everything waits in its spool, then arrives."""
    principal = f"outage-kill-{uuid.uuid4().hex[:8]}"
    services.stop("transactions")
    try:
        seen = _run_until_killed(services, principal, principal, answered_before_kill=30)
    finally:
        services.start("transactions")
    _recover(services, principal, principal)
    await _check_after_crash(transactions, principal, seen)


async def test_invalid_record_is_set_aside_not_blocking(services: Services, transactions: Any) -> None:
    recorder = Recorder(services.settings(), f"dead-{uuid.uuid4().hex[:6]}")
    await recorder.start()
    try:
        recorder.transaction_started("not a valid id!", model="m")  # the service refuses this one
        good = uuid.uuid4().hex
        recorder.transaction_started(good, model="m")
        recorder.transaction_finished(good, status="failed", error_code="INTERNAL", error_message="boom")
        assert await recorder.flush(15)
        assert recorder.spool is not None and recorder.spool.dead_count() == 1
        record = await transactions.GetTransaction(tx.GetTransactionRequest(name=f"transactions/{good}"))
        assert (record.status, record.error_code, record.error_message) == (
            Status.STATUS_FAILED,
            "INTERNAL",
            "boom",
        )
    finally:
        await recorder.stop()
        recorder.close()


def _dead_letters(recorder: Recorder) -> list[tuple[str, bytes, str]]:
    """(kind, payload, error) of the records set aside, read from the spool file itself."""
    db = sqlite3.connect(f"file:{recorder.path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT kind, payload, error FROM dead ORDER BY seq").fetchall()
    finally:
        db.close()


async def test_refused_merged_record_keeps_its_start(services: Services, transactions: Any) -> None:
    """A short request whose start and outcome go out as one call, refused as invalid: nothing of the
    request is lost. An invalid outcome (a negative token count) leaves the start recorded in progress
    and only the outcome set aside; an invalid start (its request id) sets the whole record aside."""
    settings = services.settings(recording={"merge_window_seconds": 5.0})
    recorder = Recorder(settings, f"dead-merge-{uuid.uuid4().hex[:6]}")
    await recorder.start()
    bad_outcome, bad_start = uuid.uuid4().hex, f"not a valid id {uuid.uuid4().hex}"
    before = await asyncio.to_thread(_handled, services, "transactions")
    try:
        for rid, prompt, tokens in ((bad_outcome, "keep me", -1), (bad_start, "me too", 2)):
            recorder.transaction_started(rid, model="m", principal="keys/k1", prompt=prompt)
            recorder.transaction_finished(rid, status="succeeded", output="hi", prompt_tokens=tokens)
        assert await recorder.flush(15)
        started = await transactions.GetTransaction(
            tx.GetTransactionRequest(name=f"transactions/{bad_outcome}")
        )
        dead = await asyncio.to_thread(_dead_letters, recorder)
    finally:
        await recorder.stop()
        recorder.close()
    after = await asyncio.to_thread(_handled, services, "transactions")
    assert (started.status, started.prompt, started.principal) == (
        Status.STATUS_IN_PROGRESS,
        "keep me",
        "keys/k1",
    )
    # The batch is refused (all or none), then each on its own: merged, then the start alone: two
    # creates for each request; one completion, for the valid start.
    assert after["CreateTransaction"] - before["CreateTransaction"] == 4
    assert after["CompleteTransaction"] - before["CompleteTransaction"] == 1
    assert [kind for kind, _, _ in dead] == ["transaction", "transaction"]
    outcome = tx.CompleteTransactionRequest.FromString(dead[0][1])
    assert (outcome.name, outcome.usage.prompt_tokens) == (f"transactions/{bad_outcome}", -1)
    assert "must not be negative" in dead[0][2]
    whole = tx.Transaction.FromString(dead[1][1])
    assert (whole.request_id, whole.prompt, whole.principal, whole.status, whole.output) == (
        bad_start,
        "me too",
        "keys/k1",
        Status.STATUS_SUCCEEDED,
        "hi",
    )
    assert "request_id" in dead[1][2]


def _handled(services: Services, name: str) -> collections.Counter[str]:
    """RPCs the named service has answered so far, by method (its own metrics endpoint)."""
    url = f"http://127.0.0.1:{services.ports[name][1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    calls: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ferry_grpc_server_handled_total":
                calls[sample.labels["grpc_method"]] += int(sample.value)
    return calls


async def _wait_for_status(
    transactions: Any, request_id: str, status: tx.Transaction.Status.ValueType, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            record = await transactions.GetTransaction(
                tx.GetTransactionRequest(name=f"transactions/{request_id}")
            )
            if record.status == status:
                return
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, f"{request_id} never became {Status.Name(status)}"
        await asyncio.sleep(0.05)


async def test_short_requests_are_delivered_as_one_record_each_in_batches(
    services: Services, transactions: Any
) -> None:
    """A request that finishes within the merge window reaches Transactions as one complete record,
    and the records spooled meanwhile go out together (BatchCreateTransactions, not a call each)."""
    settings = services.settings(recording={"merge_window_seconds": 5.0})
    recorder = Recorder(settings, f"merge-{uuid.uuid4().hex[:6]}")
    await recorder.start()
    before = await asyncio.to_thread(_handled, services, "transactions")
    try:
        ids = [uuid.uuid4().hex for _ in range(5)]
        for rid in ids:
            recorder.transaction_started(rid, model="m", prompt="hello")
            await asyncio.sleep(0.01)
            recorder.transaction_finished(rid, status="succeeded", output="hi", completion_tokens=1)
        for rid in ids:  # delivered on their own (no flush), well before the window ends
            await _wait_for_status(transactions, rid, Status.STATUS_SUCCEEDED, timeout=4)
    finally:
        await recorder.stop()
        recorder.close()
    after = await asyncio.to_thread(_handled, services, "transactions")
    assert after["CreateTransaction"] - before["CreateTransaction"] == 0
    assert after["CompleteTransaction"] - before["CompleteTransaction"] == 0
    assert after["BatchCompleteTransactions"] - before["BatchCompleteTransactions"] == 0
    assert 1 <= after["BatchCreateTransactions"] - before["BatchCreateTransactions"] <= len(ids)


async def test_many_requests_cost_a_few_batched_calls(services: Services, transactions: Any) -> None:
    """40 requests recorded within a moment, then finished after their starts were delivered: a few
    BatchCreateTransactions for the starts and a few BatchCompleteTransactions for the outcomes, not
    one call per request."""
    settings = services.settings(recording={"merge_window_seconds": 0.0, "batch_delay_seconds": 0.5})
    recorder = Recorder(settings, f"many-{uuid.uuid4().hex[:6]}")
    await recorder.start()
    ids = [uuid.uuid4().hex for _ in range(40)]
    before = await asyncio.to_thread(_handled, services, "transactions")
    try:
        for rid in ids:
            recorder.transaction_started(rid, model="m", prompt=f"hello {rid}")
        for rid in ids:
            await _wait_for_status(transactions, rid, Status.STATUS_IN_PROGRESS, timeout=20)
        for rid in ids:
            recorder.transaction_finished(rid, status="succeeded", output=f"hi {rid}", completion_tokens=2)
        for rid in ids:
            await _wait_for_status(transactions, rid, Status.STATUS_SUCCEEDED, timeout=20)
        records = [await transactions.GetTransaction(tx.GetTransactionRequest(name=f"transactions/{ids[0]}"))]
    finally:
        await recorder.stop()
        recorder.close()
    after = await asyncio.to_thread(_handled, services, "transactions")
    calls = {name: after[name] - before[name] for name in after}
    assert calls.get("CreateTransaction", 0) == calls.get("CompleteTransaction", 0) == 0
    # One call of each, or a few on a machine slow enough to stretch the writes past the delay.
    assert 1 <= calls["BatchCreateTransactions"] <= 5 and 1 <= calls["BatchCompleteTransactions"] <= 5
    assert [(r.output, r.usage.completion_tokens) for r in records] == [(f"hi {ids[0]}", 2)]


async def test_long_request_shows_in_progress_after_the_merge_window(
    services: Services, transactions: Any
) -> None:
    settings = services.settings(recording={"merge_window_seconds": 1.0})
    recorder = Recorder(settings, f"long-{uuid.uuid4().hex[:6]}")
    await recorder.start()
    try:
        rid = uuid.uuid4().hex
        started = time.monotonic()
        recorder.transaction_started(rid, model="m", prompt="a long one")
        await _wait_for_status(transactions, rid, Status.STATUS_IN_PROGRESS, timeout=10)
        assert time.monotonic() - started >= 0.9  # held back for the window, then sent alone
        recorder.transaction_finished(rid, status="succeeded", output="done", completion_tokens=3)
        await _wait_for_status(transactions, rid, Status.STATUS_SUCCEEDED, timeout=10)
    finally:
        await recorder.stop()
        recorder.close()


async def test_records_arriving_together_are_delivered_in_one_batch(services: Services, audit: Any) -> None:
    """Audit events written a few milliseconds apart go out in one AppendEvents, not one call each."""
    settings = services.settings(recording={"batch_delay_seconds": 0.5})
    principal = f"batch-{uuid.uuid4().hex[:8]}"
    recorder = Recorder(settings, principal)
    await recorder.start()
    before = await asyncio.to_thread(_handled, services, "audit")
    try:
        for i in range(5):
            recorder.operational("test.batch", principal=principal, request_id=f"{principal}-{i}")
            await asyncio.sleep(0.02)
        # Watched locally: the Audit service audits every query (through AppendEvents of its own).
        deadline = time.monotonic() + 10
        while recorder.depth() != (0, 0):
            assert time.monotonic() < deadline, "the events were never delivered"
            await asyncio.sleep(0.05)
        after = await asyncio.to_thread(_handled, services, "audit")
    finally:
        await recorder.stop()
        recorder.close()
    # One call, or two if this machine is slow enough to stretch 80 ms of writes past the delay.
    assert 1 <= after["AppendEvents"] - before["AppendEvents"] <= 2
    assert len(await _audit_events(audit, f"principal = {principal}")) == 5


async def test_one_process_per_spool(services: Services) -> None:
    name = f"lock-{uuid.uuid4().hex[:6]}"
    first = Recorder(services.settings(), name)
    await first.start()
    try:
        with pytest.raises(SpoolLocked):
            await Recorder(services.settings(), name).start()
    finally:
        await first.stop()
        first.close()


def test_service_without_database_is_not_serving_and_answers_unavailable(services: Services) -> None:
    port = free_port()
    env = services.env()
    env.update(
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing",
        FERRY_TRANSACTIONS__PORT=str(port),
        FERRY_TRANSACTIONS__METRICS_PORT=str(free_port()),
        FERRY_HOME=str(services.home / "nodb"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.transactions"], env=env, cwd=REPO_ROOT, stderr=subprocess.DEVNULL
    )
    try:
        address = f"127.0.0.1:{port}"
        with pytest.raises(TimeoutError):
            wait_serving(address, proc, timeout=6)
        from ferry.transactions.v1 import transactions_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                transactions_pb2_grpc.TransactionsServiceStub(channel).GetTransaction(
                    tx.GetTransactionRequest(name="transactions/x"), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


class PrivatePostgres:
    """An embedded PostgreSQL of one test's own, which the test may stop and start again."""

    def __init__(self) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="ferry-records-pg-outage-"))
        self.top.chmod(0o755)  # the `pgserver` user must reach its data directory
        self.url = self._pgserver("start")

    def _pgserver(self, action: str) -> str:
        """Runs pgserver in a child interpreter: pg_ctl forked from this process (which has gRPC
        threads) was seen dying with SIGSEGV before exec."""
        script = (
            "import os, sys, pgserver\n"
            "from pgserver._commands import pg_ctl\n"
            "if sys.argv[2] == 'stop':\n"
            "    user = 'pgserver' if os.geteuid() == 0 else None  # pgserver's own rule\n"
            "    pg_ctl(['-w', '-m', 'fast', 'stop'], pgdata=sys.argv[1], user=user)\n"
            "    print('stopped')\n"
            "else:\n"
            "    print(pgserver.get_server(sys.argv[1], cleanup_mode=None).get_uri())\n"
        )
        for _attempt in range(3):
            done = subprocess.run(
                [sys.executable, "-c", script, str(self.top / "data"), action],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if done.returncode == 0:
                return done.stdout.strip().splitlines()[-1]
            # pg_ctl can refuse a start right after a stop (lock files still going away).
            time.sleep(1.0)
        raise AssertionError(f"pgserver {action} failed: {done.stderr[-2000:]}")

    def start(self) -> None:
        self._pgserver("start")

    def stop(self) -> None:
        self._pgserver("stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(pg.top, ignore_errors=True)


async def test_postgres_outage(private_postgres: PrivatePostgres, tmp_path: Path) -> None:
    """PostgreSQL itself stops: the services turn NOT_SERVING and answer UNAVAILABLE, the producer keeps
    spooling; when PostgreSQL is back, the services recover by themselves and every record arrives."""
    from ferry.transactions.v1 import transactions_pb2_grpc

    url = private_postgres.url
    ports = {n: (free_port(), free_port()) for n in ("transactions", "audit")}
    own = Services(tmp_path, Database("embedded", url, url), ports)
    recorder = Recorder(own.settings(recording={"max_backoff_seconds": 0.5}), "pg-outage")
    address = own.address("transactions")
    try:
        own.start("transactions")  # the Audit service is not needed here
        await recorder.start()
        private_postgres.stop()
        stopped = time.monotonic()
        await _until_health(
            address,
            health_pb2.HealthCheckResponse.NOT_SERVING,
            20,
            "transactions stayed SERVING without its database",
        )
        async with grpc.aio.insecure_channel(address) as channel:
            stub = transactions_pb2_grpc.TransactionsServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetTransaction(tx.GetTransactionRequest(name="transactions/x"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            for i in range(10):
                recorder.transaction_started(f"pg-{i}", model="m", principal="pg-outage")
                recorder.transaction_finished(f"pg-{i}", status="succeeded", output=str(i))
            await asyncio.sleep(1.0)
            assert recorder.depth()[0] == 10
            print(f"NOT_SERVING {time.monotonic() - stopped:.1f} s after PostgreSQL stopped")
            private_postgres.start()
            back = time.monotonic()
            await _until_health(
                address,
                health_pb2.HealthCheckResponse.SERVING,
                30,
                "transactions did not recover with its database",
            )
            print(f"SERVING again {time.monotonic() - back:.1f} s after PostgreSQL came back")
            assert await recorder.flush(30), recorder.depth()
            records = await _list(stub, "principal = pg-outage")
            assert sorted(r.output for r in records) == sorted(str(i) for i in range(10))
    finally:
        await recorder.stop()
        recorder.close()
        own.stop()


async def test_a_failed_record_is_replaced_only_by_its_own_callers_later_try(transactions: Any) -> None:
    """A job retried under its id ends as the record of the try that answered; another caller that
    reuses the request id must not overwrite the first caller's record."""

    def record(
        rid: str, principal: str, status: Any, seconds: int, output: str
    ) -> tx.CreateTransactionRequest:
        when = Timestamp(seconds=seconds)
        return tx.CreateTransactionRequest(
            transaction=tx.Transaction(
                request_id=rid,
                principal=principal,
                model="gemma-3-270m",
                status=status,
                output=output,
                create_time=when,
                complete_time=when,
            )
        )

    start = int(time.time())
    rid = uuid.uuid4().hex
    await transactions.CreateTransaction(record(rid, "keys/a", Status.STATUS_FAILED, start, "first"))
    await transactions.CreateTransaction(record(rid, "keys/b", Status.STATUS_SUCCEEDED, start + 5, "other"))
    kept = await transactions.GetTransaction(tx.GetTransactionRequest(name=f"transactions/{rid}"))
    assert (kept.principal, kept.output, kept.status) == ("keys/a", "first", Status.STATUS_FAILED)
    await transactions.CreateTransaction(record(rid, "keys/a", Status.STATUS_SUCCEEDED, start + 9, "retry"))
    kept = await transactions.GetTransaction(tx.GetTransactionRequest(name=f"transactions/{rid}"))
    assert (kept.principal, kept.output, kept.status) == ("keys/a", "retry", Status.STATUS_SUCCEEDED)
