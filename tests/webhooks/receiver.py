"""A real HTTP receiver for webhook tests: a threaded http.server on 127.0.0.1 that records every
request and answers each path with a scripted sequence of statuses (then 200)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    monotonic: float


@dataclass
class Receiver:
    port: int
    # path -> statuses to answer, in order; once used up (or for other paths): 200.
    script: dict[str, list[int]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    async def wait_for(self, check: Callable[[], bool], timeout: float = 60.0) -> None:
        """Waits for a condition on what arrived (a bound against hanging, not a timing assertion)."""
        await eventually(lambda: _now(check()), timeout, lambda: f"the receiver got {self.received}")


async def _now(value: bool) -> bool:
    return value


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 60.0, what: Callable[[], str] = lambda: ""
) -> None:
    """Polls `check` (without blocking the event loop the delivery runs on) until it holds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what()}")
        await asyncio.sleep(0.05)


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver = state["r"]
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with receiver.lock:
                statuses = receiver.script.get(self.path, [])
                status = statuses.pop(0) if statuses else 200
                receiver.received.append(
                    Received(
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        status,
                        time.monotonic(),
                    )
                )
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["r"] = Receiver(port=server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["r"]
    finally:
        server.shutdown()
        server.server_close()
