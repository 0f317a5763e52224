"""Records of real generations on the real stack (Envoy, Inference, Triton, Transactions, Audit,
PostgreSQL): every request recorded exactly once, through outages and a `kill -9` of Inference."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest

from tests.stack import RunningStack

pytestmark = pytest.mark.stack

INFERENCE = "ferry.inference.v1.InferenceService"
OPENAI = "ferry.openai.v1.OpenAIService"


@pytest.fixture(scope="module")
def rest(stack: RunningStack) -> Iterator[httpx.Client]:
    with stack.http() as http:
        yield http


@pytest.fixture(scope="module")
def sdk(stack: RunningStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0, timeout=60
    ) as client:
        yield client


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _wait_for(what: str, check: Callable[[], Any], seconds: float = 45.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)


def _transactions(rest: httpx.Client, filter_: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = ""
    while True:
        reply = rest.get(
            "/api/v1/transactions", params={"filter": filter_, "page_size": 7, "page_token": token}
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        out += body.get("transactions", [])
        token = body.get("next_page_token", "")
        if not token:
            return out


def _audit(rest: httpx.Client, filter_: str) -> list[dict[str, Any]]:
    reply = rest.get("/api/v1/audit/events", params={"filter": filter_, "page_size": 1000})
    assert reply.status_code == 200, reply.text
    return list(reply.json().get("events", []))


def _generate(rest: httpx.Client, sdk: openai.OpenAI, model: str, rid: str, how: str) -> dict[str, Any]:
    """One generation through Envoy; returns what the client saw (text, usage, rpc)."""
    headers = {"x-request-id": rid}
    if how == "native":
        reply = rest.post(
            f"/api/v1/models/{model}:generate",
            json={"prompt": "The capital of France is", "sampling": {"max_tokens": 4, "ignore_eos": True}},
            headers=headers,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        return {"text": body["text"], "usage": body["usage"], "rpc": (INFERENCE, "Generate")}
    if how == "completion":
        c = sdk.completions.create(
            model=model, prompt="Once upon a time", max_tokens=4, extra_headers=headers
        )
        usage = (
            {"prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens}
            if c.usage
            else {}
        )
        return {"text": c.choices[0].text, "usage": usage, "rpc": (OPENAI, None)}
    stream = sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    text, usage = "", {}
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = {
                "prompt_tokens": chunk.usage.prompt_tokens,
                "completion_tokens": chunk.usage.completion_tokens,
            }
    return {"text": text, "usage": usage, "rpc": (OPENAI, None)}


def test_n_generations_through_envoy_are_recorded_once_and_audited(
    stack: RunningStack, rest: httpx.Client, sdk: openai.OpenAI
) -> None:
    model = stack.settings.triton.default_model
    since = _now()
    marker = uuid.uuid4().hex[:10]
    kinds = ["native", "completion", "chat-stream", "native", "completion"]
    seen = {
        f"e2e-{marker}-{i}": _generate(rest, sdk, model, f"e2e-{marker}-{i}", how)
        for i, how in enumerate(kinds)
    }

    window = f'model = "{model}" AND create_time >= "{since}"'
    records = _wait_for(
        "every generation to be recorded as succeeded",
        lambda: (
            (r := _transactions(rest, window))
            and len(r) >= len(seen)
            and all(t["status"] == "STATUS_SUCCEEDED" for t in r)
            and r
        ),
    )
    by_id = {r["request_id"]: r for r in records}
    assert sorted(by_id) == sorted(seen) and len(records) == len(seen)  # exactly N, each once
    for rid, client_saw in seen.items():
        record = by_id[rid]
        assert record["name"] == f"transactions/{rid}"
        assert record["model"] == model and record["principal"] == stack.admin_principal
        assert record["output"] == client_saw["text"]
        usage = record["usage"]
        assert usage["completion_tokens"] == int(client_saw["usage"]["completion_tokens"]) > 0
        assert usage["prompt_tokens"] == int(client_saw["usage"]["prompt_tokens"]) > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert record["finish_reason"] in ("stop", "length")
        assert record["latency"].endswith("s") and record["time_to_first_token"].endswith("s")
        assert record["create_time"] <= record["complete_time"]
        assert record["prompt"] or record["messages"]
        service, method = client_saw["rpc"]
        assert record["operation"].startswith(f"/{service}/")
        if method:
            assert record["operation"] == f"/{service}/{method}"
        # GET by name through Envoy.
        one = rest.get(f"/api/v1/{record['name']}")
        assert one.status_code == 200 and one.json()["request_id"] == rid

    # The audit log shows every call with its principal and outcome.
    def audited() -> dict[str, dict[str, Any]]:
        events = _audit(rest, f'kind = RPC AND event_time >= "{since}"')
        return {e["request_id"]: e for e in events if e["request_id"] in seen}

    events = _wait_for("every call to be audited", lambda: (a := audited()) and len(a) == len(seen) and a)
    for rid, event in events.items():
        assert event["principal"] == stack.admin_principal and event["code"] == "OK"
        assert event["service"] == seen[rid]["rpc"][0] and event["source"] == "inference"
        assert event["peer"] and event["latency"].endswith("s")
    verdict = rest.post("/api/v1/audit:verify", json={})
    assert verdict.status_code == 200 and verdict.json()["valid"] is True, verdict.text


def test_every_service_audits_its_calls(stack: RunningStack, rest: httpx.Client) -> None:
    since = _now()
    rid = f"e2e-models-{uuid.uuid4().hex[:10]}"
    assert rest.get("/api/v1/models", headers={"x-request-id": rid}).status_code == 200
    missing = rest.get("/api/v1/transactions/nope", headers={"x-request-id": rid + "-t"})
    assert missing.status_code == 404
    events = _wait_for(
        "the calls to be audited",
        lambda: (
            (e := {x["request_id"]: x for x in _audit(rest, f'event_time >= "{since}"')})
            and {rid, rid + "-t"} <= set(e)
            and e
        ),
    )
    assert (events[rid]["source"], events[rid]["method"], events[rid]["code"]) == (
        "models",
        "ListModels",
        "OK",
    )
    listed = events[rid + "-t"]
    assert (listed["source"], listed["method"], listed["code"]) == (
        "transactions",
        "GetTransaction",
        "NOT_FOUND",
    )
    assert listed["resource"] == "transactions/nope"
    starts = {e["source"] for e in _audit(rest, 'action = "service.start"')}
    assert {"inference", "models", "transactions", "audit"} <= starts


def test_rest_errors_on_bad_input(rest: httpx.Client) -> None:
    missing = rest.get("/api/v1/transactions/no-such-request")
    assert missing.status_code == 404 and missing.json()["code"] == 5
    for params in ({"page_token": "garbage"}, {"filter": "x" * 2000}, {"filter": 'create_time > "soon"'}):
        reply = rest.get("/api/v1/transactions", params=params)
        assert reply.status_code == 400, reply.text
        assert reply.json()["code"] == 3
    assert rest.get("/api/v1/audit/events", params={"filter": "code = MAYBE"}).status_code == 400


def test_outage_and_kill_9_of_inference(stack: RunningStack, rest: httpx.Client, sdk: openai.OpenAI) -> None:
    """Transactions and Audit down: generations still succeed. Then Inference is killed with SIGKILL in
    the middle of a stream. After everything is back: the answered requests recorded once each, the
    cut-off one as incomplete."""
    model = stack.settings.triton.default_model
    supervisor = stack.supervisor()
    marker = uuid.uuid4().hex[:10]
    since = _now()
    answered = [f"outage-{marker}-{i}" for i in range(3)]
    cut_off = f"outage-{marker}-cut"
    supervisor.stop("transactions")
    supervisor.stop("audit")
    try:
        for rid in answered:
            assert _generate(rest, sdk, model, rid, "native")["text"]
        before = supervisor.pid("inference")
        stream = sdk.completions.create(
            model=model,
            prompt="A long story:",
            max_tokens=400,
            stream=True,
            extra_headers={"x-request-id": cut_off},
        )
        next(iter(stream))  # generation has started
        supervisor.signal("inference", "KILL")
        with pytest.raises(Exception):  # noqa: B017 - the connection just breaks; which error is the SDK's
            for _ in stream:
                pass
    finally:
        supervisor.start("transactions")
        supervisor.start("audit")
    _wait_for("inference to be restarted", lambda: supervisor.pid("inference") not in (0, before))
    stack.wait_serving("inference", timeout=90)
    stack.wait_serving("transactions")
    stack.wait_serving("audit")

    window = f'model = "{model}" AND create_time >= "{since}"'
    records = _wait_for(
        "the records to arrive",
        lambda: (
            (r := _transactions(rest, window))
            and {t["request_id"] for t in r} >= {*answered, cut_off}
            and all(t["status"] != "STATUS_IN_PROGRESS" for t in r)
            and r
        ),
    )
    by_id = {r["request_id"]: r for r in records}
    assert len(records) == len(by_id) == len(answered) + 1
    for rid in answered:
        assert by_id[rid]["status"] == "STATUS_SUCCEEDED" and by_id[rid]["output"]
    assert by_id[cut_off]["status"] == "STATUS_INCOMPLETE"
    assert "exited before" in by_id[cut_off]["error_message"]
    verdict = rest.post("/api/v1/audit:verify", json={})
    assert verdict.json()["valid"] is True, verdict.text
