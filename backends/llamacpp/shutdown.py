"""Notices that tritonserver is shutting down while generations are in flight.

Triton does not tell a model when the server stops: it waits --exit-timeout-secs for the model to
unload, but a decoupled request in flight keeps the model loaded, so finalize() would only run after
every stream had ended on its own (seen: a 1024-token stream ran to its end two minutes after SIGTERM).
So while generations are in flight, a thread asks the server it runs in whether it is still live
(HTTP /v2/health/live on the address in tritonserver's own command line): an exiting server answers
"Server exiting" or has closed its HTTP endpoint already (Triton 2.51 does the latter at once). Only
those two count, and only twice in a row: a proxy's error or a timeout must not stop a live model for
good. An unload through the model-control API leaves the server live, so those streams still drain. (pb_utils.is_model_ready tells the two apart too, but
calling it while the server stops crashed the stub with SIGSEGV in about one run in ten.)
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

POLL_SECONDS = 0.5
# "Exiting" answers in a row that stop the model; after the first, the next check comes this soon.
CONFIRMATIONS = 2
CONFIRM_SECONDS = 0.2
# A slow answer is not a stopped server: only Triton's own answer (or a refused connection) counts.
REQUEST_TIMEOUT_SECONDS = 2.0
# The error text of Triton's liveness answer while it stops (TRITONSERVER_ServerIsLive).
EXITING_ERROR = "Server exiting"
# A wildcard bind address is reached on loopback.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def _flags(argv: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` flags of a command line."""
    flags: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, sep, value = arg[2:].partition("=")
        if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        flags[name] = value
    return flags


def live_url(argv: list[str]) -> str | None:
    """Triton's HTTP liveness URL from its command line; None when HTTP is off."""
    flags = _flags(argv)
    if flags.get("allow-http", "true").lower() in ("false", "0"):
        return None
    host = flags.get("http-address", "0.0.0.0")
    host = _LOOPBACK.get(host, host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{flags.get('http-port', '8000')}/v2/health/live"


def server_live_url() -> str | None:
    """The liveness URL of the tritonserver that started this stub (its parent process)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return live_url([part.decode(errors="replace") for part in raw.split(b"\0") if part])


def server_is_exiting(url: str) -> bool:
    """Whether Triton at `url` says it is exiting, or has already closed its HTTP endpoint.

    A direct connection (http.client ignores http_proxy / HTTP_PROXY, which urllib would honour even for
    127.0.0.1); any other failure or answer (a reset, a timeout, a 403) is not taken for an exit.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port or 80, timeout=REQUEST_TIMEOUT_SECONDS
    )
    try:
        connection.request("GET", parts.path or "/")
        response = connection.getresponse()
        return response.status != 200 and _is_exiting_answer(response.read())
    except ConnectionRefusedError:
        # Triton 2.51 closes its HTTP endpoint first on SIGTERM; the port is the one it was started with.
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _is_exiting_answer(body: bytes) -> bool:
    """Triton's error JSON for a stopping server: {"error": "Server exiting"}."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("error") == EXITING_ERROR


class ShutdownMonitor:
    """A thread that, while `busy()` says generations are in flight, checks whether Triton is exiting.

    CONFIRMATIONS "exiting" answers in a row set `exiting`, and it stays set: a stopping server does not
    come back.
    """

    def __init__(
        self, busy: Callable[[], bool], url: str | None, check: Callable[[str], bool] = server_is_exiting
    ) -> None:
        self.exiting = threading.Event()
        self._busy = busy
        self._url = url
        self._check = check
        self._done = threading.Event()
        if url is not None:
            threading.Thread(target=self._watch, daemon=True, name="shutdown-monitor").start()

    def _watch(self) -> None:
        assert self._url is not None
        positives = 0
        while not self._done.wait(CONFIRM_SECONDS if positives else POLL_SECONDS):
            # Only while streams are in flight: an idle model is unloaded by Triton without help.
            positives = positives + 1 if self._busy() and self._check(self._url) else 0
            if positives == CONFIRMATIONS:
                self.exiting.set()
                return

    def close(self) -> None:
        self._done.set()
