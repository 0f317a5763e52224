"""Notices that tritonserver is shutting down while generations are in flight.

Triton does not tell a model when the server stops: it waits --exit-timeout-secs for the model to
unload, but a decoupled request in flight keeps the model loaded, so finalize() would only run after
every stream had ended on its own (seen: a 1024-token stream ran to its end two minutes after SIGTERM).
So while generations are in flight, a thread asks the server it runs in whether it is still live
(HTTP /v2/health/live on the address in tritonserver's own command line): an exiting server answers
"Server exiting" or has closed its HTTP endpoint already. An unload through the model-control API leaves
the server live, so those streams still drain. (pb_utils.is_model_ready tells the two apart too, but
calling it while the server stops crashed the stub with SIGSEGV in about one run in ten.)
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

POLL_SECONDS = 0.5
# A slow answer is not a stopped server: only an answer (or a refused connection) counts.
REQUEST_TIMEOUT_SECONDS = 2.0


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
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
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
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            return bool(response.status != 200)
    except urllib.error.HTTPError:  # "Server exiting"
        return True
    except urllib.error.URLError as exc:
        # Refused: the HTTP endpoint is already stopped (the first thing Triton does on SIGTERM).
        return isinstance(exc.reason, ConnectionRefusedError)
    except (TimeoutError, OSError):
        return False


class ShutdownMonitor:
    """A thread that, while `busy()` says generations are in flight, checks whether Triton is exiting."""

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
        while not self._done.wait(POLL_SECONDS):
            # Only while streams are in flight: an idle model is unloaded by Triton without help.
            if self._busy() and self._check(self._url):
                self.exiting.set()
                return

    def close(self) -> None:
        self._done.set()
