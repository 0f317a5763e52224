"""What the resilience tests share: steady threaded load, polling instead of sleeping, Envoy's view
of the replicas, and the wait until the shared stack is whole again (`settle`).

`Load.run(name, call)` starts a thread that calls `call(request_id)` (a fresh id each time) until
`finish()`; every call is kept as an `Answer`. A call returns None (success), an `Outcome` (ok, status,
retry hint) or raises: an exception is a failed answer too, its repr the status.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import psycopg
import pytest

from services.common.config import ServiceSettings
from tests.stack import RunningStack

# The services with two replicas on the shared stack (tests/resilience/conftest.py).
REPLICATED = ("models", "transactions", "gateway", "inference")
# Loaded at start: the trivial model (the default) and the paced one whose streams outlive a kill.
FAST_MODEL = "bench-stream"
SLOW_MODEL = "slow-stream"

# (ok, status such as "200" / "503" / "OK" / "UNAVAILABLE", whether the answer carried a retry hint)
Outcome = tuple[bool, str, bool]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    """Seconds until `condition()` held (polled every `every` s); fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - start


@dataclass
class Answer:
    name: str
    started: float
    ended: float
    ok: bool
    status: str
    retry_hint: bool
    request_id: str


@dataclass
class Load:
    """Threads calling through Envoy until stopped, each pausing `think_seconds` between calls."""

    think_seconds: float = 0.02
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, name: str, call: Callable[[str], Outcome | None]) -> None:
        def loop() -> None:
            while not self.stop.is_set():
                request_id = str(uuid.uuid4())
                started = time.monotonic()
                try:
                    ok, status, hint = call(request_id) or (True, "OK", False)
                except Exception as error:  # a transport failure is an answer too: a failed one
                    ok, status, hint = False, repr(error)[:300], False
                with self.lock:
                    self.answers.append(Answer(name, started, time.monotonic(), ok, status, hint, request_id))
                self.stop.wait(self.think_seconds)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def of(self, prefix: str = "") -> list[Answer]:
        """The answers so far of the threads whose name starts with `prefix`."""
        with self.lock:
            return [a for a in self.answers if a.name.startswith(prefix)]

    @property
    def calls(self) -> int:
        return len(self.of())

    def failures(self) -> list[str]:
        return [f"{a.ended:.2f} {a.name}: {a.status}" for a in self.of() if not a.ok]

    def each_answered(self, count: int, prefix: str = "", since: float = 0.0) -> Callable[[], bool]:
        """A condition: every thread named `prefix...` has `count` successful answers started after
        `since` (a monotonic time)."""

        def condition() -> bool:
            names = [t.name for t in self.threads if t.name.startswith(prefix)]
            answered = self.of(prefix)
            return all(
                sum(1 for a in answered if a.name == n and a.ok and a.started >= since) >= count
                for n in names
            )

        return condition

    def each_tried(self, count: int, prefix: str = "") -> Callable[[], bool]:
        """A condition: every thread named `prefix...` has `count` answers, successful or not."""

        def condition() -> bool:
            names = [t.name for t in self.threads if t.name.startswith(prefix)]
            answered = self.of(prefix)
            return all(sum(1 for a in answered if a.name == n) >= count for n in names)

        return condition


# -- Envoy's view of the replicas (the admin port's /clusters) -----------------------------------------


def clusters(stack: RunningStack) -> dict[tuple[str, str], dict[str, str]]:
    """{(cluster, host:port): {stat: value}} from /clusters."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    text = httpx.get(f"{stack.envoy_admin}/clusters", timeout=5).text
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4:
            out.setdefault((parts[0], parts[1]), {})[parts[2]] = parts[3]
    return out


def replica_address(stack: RunningStack, name: str, index: int) -> str:
    service: ServiceSettings = getattr(stack.settings, name)
    return f"{service.host}:{service.replica_ports()[index][0]}"


def healthy(stack: RunningStack, cluster: str, address: str) -> bool:
    return clusters(stack).get((cluster, address), {}).get("health_flags") == "healthy"


# -- the shared stack whole again ---------------------------------------------------------------------


def unwell(stack: RunningStack, programs: list[str]) -> list[str]:
    """What keeps the stack from being as it started (empty when whole): every program RUNNING,
    PostgreSQL answering, /readyz 200 (every service SERVING, its pool connected), every replica
    healthy in Envoy, both start-up models READY and a generation answered."""
    try:
        processes = stack.supervisor().processes()
        down = [p for p in programs if processes.get(p, {}).get("statename") != "RUNNING"]
        if down:
            return [f"not RUNNING: {down}"]
        with psycopg.connect(stack.database_url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        if (code := httpx.get(f"{stack.rest}/readyz", timeout=5).status_code) != 200:
            return [f"/readyz {code}"]
        view = clusters(stack)
        sick = [
            (n, i)
            for n in REPLICATED
            for i in (0, 1)
            if view.get((n, replica_address(stack, n, i)), {}).get("health_flags") != "healthy"
        ]
        if sick:
            return [f"unhealthy in Envoy: {sick}"]
        with stack.http(timeout=10) as http:
            for model in (FAST_MODEL, SLOW_MODEL):
                state = http.get(f"/api/v1/models/{model}").json().get("state")
                if state != "STATE_READY":
                    return [f"{model} {state}"]
            answer = http.post("/v1/completions", json={"model": FAST_MODEL, "prompt": "x", "max_tokens": 2})
            if answer.status_code != 200:
                return [f"generation {answer.status_code}"]
    except (httpx.HTTPError, psycopg.Error, OSError, ValueError) as error:
        return [repr(error)[:200]]
    return []


def settle(stack: RunningStack, programs: list[str], timeout: float) -> float:
    """Seconds until the stack is whole again (see `unwell`); fails the test after `timeout`."""
    last: list[str] = []

    def whole() -> bool:
        nonlocal last
        last = unwell(stack, programs)
        return not last

    start = time.monotonic()
    while not whole():
        if time.monotonic() - start > timeout:
            pytest.fail(f"the shared stack is not whole again within {timeout:.0f} s: {last}")
        time.sleep(0.5)
    return time.monotonic() - start
