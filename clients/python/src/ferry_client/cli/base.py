"""What every `ferry` command shares: exit codes, the API key, the client, output and progress."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from ferry_client import Client
from ferry_client.errors import FerryError

T = TypeVar("T")
DEFAULT_TARGET = "localhost:8080"


class Exit(IntEnum):
    """The `ferry` command's exit codes (docs/cli.md lists them)."""

    OK = 0
    # The request failed: refused as invalid, not found, already exists, an internal error...
    ERROR = 1
    # The command line is wrong (unknown command or option, a bad value): nothing was sent.
    USAGE = 2
    # ferry could not be reached or answered UNAVAILABLE / ran past the deadline: try again later.
    UNAVAILABLE = 3
    # The API key was refused (UNAUTHENTICATED) or lacks the scope (PERMISSION_DENIED).
    DENIED = 4
    # The command ran, and what it checks is not healthy: `status` found something not serving,
    # `audit verify` found a broken chain, `models load|unload` ended in another state.
    UNHEALTHY = 5
    # Ctrl-C (128 + SIGINT, as shells report it).
    INTERRUPTED = 130


class CliError(Exception):
    """A failure to report in one line, with its exit code."""

    def __init__(self, message: str, code: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- the API key: never on the command line (argv shows in `ps` and shell history) ----------------


def ferry_home() -> Path:
    return Path(os.environ.get("FERRY_HOME") or ".ferry")


def read_api_key(key_file: Path | None, *, required: bool) -> str | None:
    """`--api-key-file`, else $FERRY_API_KEY, else <home>/admin.key (home: $FERRY_HOME or ./.ferry).

    None when none is found and `required` is false (health needs no key; auth may be off).
    """
    if key_file is not None:
        try:
            return key_file.read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read --api-key-file {key_file}: {exc.strerror}") from None
    if os.environ.get("FERRY_API_KEY"):
        return os.environ["FERRY_API_KEY"]
    path = ferry_home() / "admin.key"
    try:
        return path.read_text().strip()
    except OSError:
        if required:
            raise CliError(
                f"no admin key: pass --api-key-file, set FERRY_API_KEY, or create {path}"
            ) from None
        return None


def target_of(args: argparse.Namespace) -> str:
    return str(args.target or os.environ.get("FERRY_TARGET") or DEFAULT_TARGET)


def open_client(args: argparse.Namespace, *, key_required: bool = False) -> Client:
    key = read_api_key(args.api_key_file, required=key_required)
    root = None
    if args.ca_file is not None:
        try:
            root = args.ca_file.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read --ca-file {args.ca_file}: {exc.strerror}") from None
    return Client(
        target_of(args),
        api_key=key,
        tls=bool(args.tls or root is not None),
        root_certificates=root,
        timeout=args.timeout,
    )


# -- errors ----------------------------------------------------------------------------------------

EXIT_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: Exit.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Exit.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: Exit.DENIED,
    grpc.StatusCode.PERMISSION_DENIED: Exit.DENIED,
}
# What a person should do about a refusal.
HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "the key was refused: pass --api-key-file, set FERRY_API_KEY, "
    "or check <home>/admin.key",
    grpc.StatusCode.PERMISSION_DENIED: "use a key with that scope (--api-key-file, FERRY_API_KEY)",
    grpc.StatusCode.UNAVAILABLE: "ferry did not answer at {target}: is it running? (--target, $FERRY_TARGET)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer from {target} within the deadline (--timeout)",
}


def describe_error(err: grpc.RpcError, target: str) -> CliError:
    """One line naming the code, the message, the reason, the fields at fault and what to do."""
    code: grpc.StatusCode = err.code()
    parts = [f"{code.name}: {err.details()}"]
    if isinstance(err, FerryError):
        if err.reason and err.reason != code.name:
            parts.append(f"[{err.reason}]")
        # The fields at fault, unless the message already says them.
        said = parts[0]
        violations = "; ".join(
            f"{field}: {text}" for field, text in err.field_violations if f"{field}: {text}" not in said
        )
        if violations:
            parts.append(f"({violations})")
        if err.retry_delay is not None:
            parts.append(f"retry in {err.retry_delay:g} s")
    hint = HINTS.get(code)
    # "did not answer" only when ferry did not: an answer with ferry's reason (a model loading, the key
    # store down) says what happened itself.
    if code == grpc.StatusCode.UNAVAILABLE and isinstance(err, FerryError) and err.domain:
        hint = None
    if hint:
        parts.append(f"-- {hint.format(target=target)}")
    return CliError(" ".join(parts), EXIT_BY_CODE.get(code, Exit.ERROR))


# -- output ----------------------------------------------------------------------------------------

# Piped tables keep their rows whole (a terminal folds them to its width).
stdout = Console(
    highlight=False,
    width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 1000,
)
stderr = Console(stderr=True, highlight=False)


def as_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: proto field names, enum names, every field (stable for scripts)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(data: Any) -> None:
    """The one JSON document a `--json` command prints."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def table(*columns: str) -> Table:
    grid = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    return grid


def fields_table(rows: Sequence[tuple[str, str]]) -> Table:
    """A resource as `field  value` lines."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def enum_name(value: str, prefix: str) -> str:
    """`STATE_READY` -> `ready`."""
    return value.removeprefix(prefix).lower()


def timestamp(message: Message, field: str) -> str:
    if not message.HasField(field):
        return "-"
    text: str = getattr(message, field).ToJsonString()
    # Seconds are enough for people; --json has the full value.
    return text[:19].replace("T", " ") + "Z" if len(text) >= 19 else text


# -- progress on long waits ------------------------------------------------------------------------


class Progress:
    """A spinner with a changing line on a terminal; elsewhere one stderr line per change (so logs and
    tests see the steps too). `update()` may be called from any thread."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = time.monotonic()
        self._last = ""
        self._status: Any = None

    def __enter__(self) -> Progress:
        if stderr.is_terminal:
            self._status = stderr.status(self.what)
            self._status.__enter__()
        else:
            print(f"ferry: {self.what}", file=sys.stderr, flush=True)
        return self

    def update(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        if self._status is not None:
            self._status.update(f"{self.what}: {text} ({elapsed:.1f} s)")
        elif text != self._last:
            print(f"ferry: {self.what}: {text} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
        self._last = text

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def while_waiting(call: Callable[[], T], poll: Callable[[], object], interval: float = 0.5) -> T:
    """Runs `call` in a thread and `poll()` every `interval` until it returns; its result or error."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(interval)
        if worker.is_alive():
            try:
                poll()
            except grpc.RpcError:
                pass  # a failed look while waiting is no reason to stop waiting
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


@contextmanager
def interrupts_cancel() -> Iterator[None]:
    """Ctrl-C ends the command with exit code 130 and no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise CliError("interrupted", Exit.INTERRUPTED) from None
