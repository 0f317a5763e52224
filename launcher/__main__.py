"""`make run`: start the platform, wait until it is ready, print the endpoints, stop it on Ctrl-C.

supervisord's own lines (spawned / exited / restarted) are shown as they happen; every process
logs to `<home>/logs/<name>.log`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType

from launcher.credentials import AdminKey
from launcher.stack import Stack, StackError
from services.common.config import Settings, get_settings

WATCH_SECONDS = 0.5


def _say(message: str) -> None:
    print(f"ferry: {message}", flush=True)


def auth_lines(settings: Settings, admin_key: AdminKey | None) -> list[str]:
    """The banner's word on authentication: the admin key (its secret only when just made), or a
    warning that anyone who reaches the ports may do anything."""
    if not settings.auth.enabled:
        return [
            "WARNING: authentication is OFF (FERRY_AUTH=off): anyone who reaches these ports can",
            "WARNING: run inference, load models and read transactions and audit events.",
        ]
    if admin_key is None:
        return []
    if admin_key.created:
        return [
            f"{'Admin key':<25} {admin_key.secret}",
            f"{'':<25} (shown once, saved to {admin_key.path}; `ferry keys create` makes others)",
        ]
    where = admin_key.path or "FERRY_BOOTSTRAP_ADMIN_KEY"
    return [f"{'Admin key':<25} in {where}"]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Ctrl-C and SIGTERM alike unwind to the `finally` that stops everything.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    parser.add_argument(
        "--ready-timeout", type=float, default=60.0, help="seconds to wait for /readyz (default 60)"
    )
    args = parser.parse_args(argv)

    settings = get_settings()
    # Installed explicitly: a shell starting us in the background would leave SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    stack = Stack(settings)
    status = 0
    _say(f"starting from {settings.home} (logs in {settings.log_dir})")
    try:
        stack.start()
        if stack.database_url and settings.database_url is None:
            _say(f"PostgreSQL (embedded, supervised): {stack.database_url}")
        seconds = stack.wait_ready(args.ready_timeout, progress=_say)
        _say(f"ready in {seconds:.1f} s")
        for line in stack.endpoints.lines():
            print(f"  {line}", flush=True)
        print(f"  {'Processes':<25} supervisorctl -c {stack.supervisor_config} status", flush=True)
        for line in auth_lines(stack.settings, stack.admin_key):
            print(f"  {line}", flush=True)
        _say("press Ctrl-C to stop")
        while stack.running:
            time.sleep(WATCH_SECONDS)
        _say(f"supervisord exited unexpectedly; see {settings.log_dir / 'supervisord.log'}")
        status = 1
    except StackError as err:
        _say(f"error: {err}")
        status = 1
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if stack.running:
            _say("stopping: Envoy, the services (they drain), Triton, PostgreSQL ...")
            started = time.monotonic()
            stack.stop()
            _say(f"stopped in {time.monotonic() - started:.1f} s; nothing left running")
        else:
            stack.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
