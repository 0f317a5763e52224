"""A model served by a real OpenAI-compatible upstream: llama.cpp's own server (bench.raw_engine) over
Gemma's GGUF file, requiring an API key, fronted by a ferry stack of its own configured with
`upstream_models`. What a user would notice: the model answers chat and completions, streaming and
not, with usage, exactly as the upstream itself answers; hanging up frees the upstream's slot; each
request is recorded; an upstream that is down is a 503 with Retry-After; the key is nowhere.

The tests run in file order: the upstream is stopped by the last two (either can run alone).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from bench import raw_engine
from bench.engine_params import MODEL_NAME
from launcher.setup import model_path
from services.common.config import Settings
from tests.stack import RunningStack, running_stack, scratch_home, stack_settings

pytestmark = pytest.mark.stack

UPSTREAM = "gemma-upstream"
# A second entry whose key the upstream does not accept (an operator's mistake).
WRONG_KEY_MODEL = "gemma-wrong-key"
KEY_ENV = "FERRY_TEST_UPSTREAM_KEY"
WRONG_KEY_ENV = "FERRY_TEST_UPSTREAM_WRONG_KEY"
READY_TIMEOUT_SECONDS = 120.0
HI = [{"role": "user", "content": "Name three rivers."}]


def reason(reply: httpx.Response) -> str:
    """The reason of an OpenAI error answer: its `code`, in the catalogue's spelling."""
    return str(reply.json()["error"]["code"]).upper()


@dataclass
class Upstream:
    """The running upstream and the ferry stack in front of it."""

    stack: RunningStack
    url: str
    key: str
    wrong_key: str
    stop_upstream: Callable[[], None]
    error_bodies: list[str] = field(default_factory=list)

    def direct(self) -> httpx.Client:
        """A client of the upstream itself (its own API, with its key)."""
        return httpx.Client(
            base_url=f"{self.url}/v1", headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )

    def inference_log(self) -> str:
        return (self.stack.settings.log_dir / "inference.log").read_text()

    def busy_slots(self) -> int:
        with httpx.Client(timeout=5) as client:
            slots = client.get(f"{self.url}/slots", headers={"Authorization": f"Bearer {self.key}"}).json()
        return sum(1 for slot in slots if slot.get("is_processing"))


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    scratch, home = scratch_home("ferry-upstream-test-")
    key, wrong_key = f"sk-upstream-{secrets.token_hex(16)}", f"sk-wrong-{secrets.token_hex(16)}"
    with contextlib.ExitStack() as cleanup, pytest.MonkeyPatch.context() as env:
        # The stack's processes inherit the environment: that is where the keys come from.
        env.setenv(KEY_ENV, key)
        env.setenv(WRONG_KEY_ENV, wrong_key)
        upstream_server = contextlib.ExitStack()
        cleanup.callback(upstream_server.close)
        url = upstream_server.enter_context(
            raw_engine.serving(model_path(Settings()), scratch / "upstream.log", api_key=key)
        )
        entry: dict[str, Any] = {
            "base_url": f"{url}/v1",
            "upstream_model": MODEL_NAME,
            "api_key_env": KEY_ENV,
            "context_length": 2048,
            "max_tokens": 2048,
            "owned_by": "llama.cpp",
            "max_in_flight": 2,
            "max_retries": 1,
            "connect_timeout_seconds": 2,
        }
        settings = stack_settings(
            home,
            upstream_models={UPSTREAM: entry, WRONG_KEY_MODEL: {**entry, "api_key_env": WRONG_KEY_ENV}},
        )
        # Only the upstream is exercised here: Triton loads nothing (less CPU and memory).
        settings.triton.load_models = []
        # Stopped (and checked for leftovers) before the upstream server closes.
        running = cleanup.enter_context(running_stack(settings, READY_TIMEOUT_SECONDS))
        yield Upstream(running, url, key, wrong_key, upstream_server.close)
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def rest(upstream: Upstream) -> Iterator[httpx.Client]:
    with upstream.stack.http() as client:
        yield client


@pytest.fixture(scope="module")
def client(upstream: Upstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{upstream.stack.rest}/v1", api_key=upstream.stack.admin_key) as sdk:
        yield sdk


def test_the_upstream_model_is_listed_with_its_config(client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list()}
    assert UPSTREAM in models and models[UPSTREAM].owned_by == "llama.cpp"


def test_chat_is_the_upstreams_own_answer(upstream: Upstream, client: openai.OpenAI) -> None:
    asked = {"messages": HI, "max_tokens": 12, "temperature": 0, "seed": 1}
    reply = client.chat.completions.create(model=UPSTREAM, **asked)  # type: ignore[call-overload]
    with upstream.direct() as direct:
        own = direct.post("/chat/completions", json={"model": MODEL_NAME, **asked}).json()
    # The upstream applied its own chat template: the same answer as asking it directly.
    assert reply.choices[0].message.content == own["choices"][0]["message"]["content"]
    assert reply.choices[0].message.content
    assert reply.model == UPSTREAM and reply.choices[0].finish_reason == own["choices"][0]["finish_reason"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == own["usage"]["prompt_tokens"] > 0
    assert reply.usage.completion_tokens == own["usage"]["completion_tokens"] > 0


def test_streamed_chat_has_the_same_text_and_usage(client: openai.OpenAI) -> None:
    asked = {"messages": HI, "max_tokens": 12, "temperature": 0, "seed": 1}
    whole = client.chat.completions.create(model=UPSTREAM, **asked)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(
            model=UPSTREAM, stream=True, stream_options={"include_usage": True}, **asked
        )  # type: ignore[call-overload]
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "streamed in pieces"
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completions_are_the_upstreams_own_answer_streaming_and_not(
    upstream: Upstream, client: openai.OpenAI
) -> None:
    asked = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "seed": 1}
    reply = client.completions.create(model=UPSTREAM, **asked)  # type: ignore[call-overload]
    with upstream.direct() as direct:
        own = direct.post("/completions", json={"model": MODEL_NAME, **asked}).json()
    assert reply.choices[0].text == own["choices"][0]["text"] and reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == own["usage"]["completion_tokens"]
    chunks = list(client.completions.create(model=UPSTREAM, stream=True, **asked))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text


def test_hanging_up_frees_the_upstreams_slot(upstream: Upstream, rest: httpx.Client) -> None:
    body = {
        "model": UPSTREAM,
        "prompt": "Once upon a time",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with rest.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        for _ in range(6):
            next(events)
        # Generating at the upstream now ...
        assert upstream.busy_slots() == 1
    # ... and not any more once we hung up (2000 tokens would take far longer than this).
    deadline = time.monotonic() + 5
    while upstream.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert upstream.busy_slots() == 0


def test_the_native_api_serves_it_too(rest: httpx.Client) -> None:
    messages = {"messages": [{"role": "user", "content": "Say hello."}]}
    reply = rest.post(
        f"/api/v1/models/{UPSTREAM}:generate",
        json={"messages": messages, "sampling": {"max_tokens": 4, "ignore_eos": True}},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["text"] and body["finish_reason"] == "FINISH_REASON_LENGTH"
    assert body["usage"]["completion_tokens"] == 4


def test_each_request_is_recorded_as_a_transaction_and_audited(
    upstream: Upstream, rest: httpx.Client
) -> None:
    request_id = f"upstream-record-{time.time_ns()}"
    body = {"model": UPSTREAM, "messages": HI, "max_tokens": 5, "seed": 9}
    reply = rest.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id})
    assert reply.status_code == 200
    record: dict[str, Any] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not record:
        found = rest.get(f"/api/v1/transactions/{request_id}")
        if found.status_code == 200 and found.json()["status"] == "STATUS_SUCCEEDED":
            record = found.json()
        time.sleep(0.2)
    assert record, "the transaction record did not arrive"
    assert record["model"] == UPSTREAM
    assert record["output"] == reply.json()["choices"][0]["message"]["content"]
    assert record["usage"]["completion_tokens"] == reply.json()["usage"]["completion_tokens"] > 0
    assert record["messages"][0]["content"] == HI[0]["content"]
    audited: list[dict[str, Any]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not audited:
        found = rest.get("/api/v1/audit/events", params={"filter": f"request_id = {request_id}"})
        audited = found.json().get("events", [])
        time.sleep(0.2)
    assert any(event.get("method", "").endswith("CreateChatCompletion") for event in audited), audited


def test_a_key_the_upstream_refuses_is_a_server_error_naming_no_key(
    upstream: Upstream, rest: httpx.Client
) -> None:
    reply = rest.post(
        "/v1/chat/completions", json={"model": WRONG_KEY_MODEL, "messages": HI, "max_tokens": 2}
    )
    upstream.error_bodies.append(reply.text)
    assert reply.status_code == 500 and reason(reply) == "UPSTREAM_AUTH_FAILED"
    message = reply.json()["error"]["message"]
    assert WRONG_KEY_MODEL in message and "see the inference service log" in message
    # Where the key comes from is for the operator, in the log; no caller learns it.
    assert WRONG_KEY_ENV not in message
    deadline = time.monotonic() + 5
    while f"environment variable {WRONG_KEY_ENV}" not in upstream.inference_log():
        assert time.monotonic() < deadline, "the inference log says where the refused key comes from"
        time.sleep(0.1)


def test_a_stopped_upstream_is_503_with_retry_after(upstream: Upstream, rest: httpx.Client) -> None:
    upstream.stop_upstream()
    started = time.monotonic()
    reply = rest.post("/v1/chat/completions", json={"model": UPSTREAM, "messages": HI, "max_tokens": 2})
    upstream.error_bodies.append(reply.text)
    assert reply.status_code == 503 and int(reply.headers["retry-after"]) >= 1
    assert reason(reply) == "UPSTREAM_UNAVAILABLE"
    assert time.monotonic() - started < 10, "refused after a couple of quick retries, not a long hang"
    streamed = rest.post(
        "/v1/completions", json={"model": UPSTREAM, "prompt": "Once", "max_tokens": 2, "stream": True}
    )
    upstream.error_bodies.append(streamed.text)
    assert streamed.status_code == 503 and "retry-after" in streamed.headers


def recorded(rest: httpx.Client, request_id: str) -> None:
    """Waits until the request's transaction record is final (succeeded or failed)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = rest.get(f"/api/v1/transactions/{request_id}")
        if found.status_code == 200 and found.json()["status"] in ("STATUS_SUCCEEDED", "STATUS_FAILED"):
            return
        time.sleep(0.2)
    raise AssertionError(f"no final transaction record for {request_id}")


def test_the_upstream_key_is_in_no_log_record_or_answer(upstream: Upstream, rest: httpx.Client) -> None:
    # Its own requests, so that it checks something when run alone: one that an upstream running
    # answers, one it refuses for the key, one after it is stopped (retried, logged).
    requests = [
        (UPSTREAM, True),
        (WRONG_KEY_MODEL, True),
        (UPSTREAM, False),
    ]
    for number, (model, running) in enumerate(requests):
        if not running:
            upstream.stop_upstream()
        request_id = f"upstream-key-{number}-{time.time_ns()}"
        reply = rest.post(
            "/v1/chat/completions",
            json={"model": model, "messages": HI, "max_tokens": 2},
            headers={"x-request-id": request_id},
        )
        upstream.error_bodies.append(reply.text)
        recorded(rest, request_id)
    for key in (upstream.key, upstream.wrong_key):
        for body in upstream.error_bodies:
            assert key not in body
        transactions = rest.get("/api/v1/transactions", params={"page_size": 100})
        assert transactions.status_code == 200 and key not in transactions.text
        home = upstream.stack.settings.home
        files = [
            path for path in home.rglob("*") if path.is_file() and path.relative_to(home).parts[0] != "models"
        ]
        # Logs of every service, the spools, the database: all of it looked at.
        inference_log = upstream.stack.settings.log_dir / "inference.log"
        assert inference_log in files and len(files) > 100
        # ... including the inference log's lines about the upstream's failures.
        assert "upstream of model gemma-upstream" in inference_log.read_text()
        leaks = [path for path in files if key.encode() in path.read_bytes()]
        assert not leaks, f"the upstream's API key is in {leaks}"
