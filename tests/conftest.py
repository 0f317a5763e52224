"""Session fixtures shared by every test folder.

`stack`: the real platform (PostgreSQL, Triton with the model, the four services, Envoy), started
ONCE per pytest session through the launcher's own `Stack`, on free ports and under a temporary
FERRY_HOME, so that several stacks (other sessions, `make run`) can run side by side. Tests that
use it are marked `stack` (`make test-unit` deselects them).

Authentication is on, as users run ferry: the stack starts with a fresh bootstrap admin key
(`stack.admin_key`), which `stack.channel()` and `stack.http()` send; `stack.create_key()` makes others.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.setup import ensure_backend, ensure_model
from launcher.stack import Stack
from services.common.config import Settings
from tests.stack import Footprint, RunningStack, share_model_files, stack_settings

# Cold start on these machines is ~10 s; generous for a loaded CI box (make run's limit is 60 s).
READY_TIMEOUT_SECONDS = 120.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever uses the stack is an integration test, marked or not.
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[RunningStack]:
    # The model file lives in the repository's home (FERRY_HOME), assembled once by `make setup`.
    repository_home = Settings()
    ensure_model(repository_home)
    ensure_backend()

    # Not under pytest's tmp dir: pytest keeps its root 0700 (and resets it when other sessions
    # start), but PostgreSQL runs as the `pgserver` user when we are root and must reach its data.
    scratch = Path(tempfile.mkdtemp(prefix="ferry-test-"))
    home = scratch / "home"
    share_model_files(home, repository_home.model_dir)
    settings = stack_settings(home)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    with (settings.log_dir / "supervisord.out").open("w") as output:
        stack = Stack(settings, supervisor_output=output)
        stack.start()
        footprint: Footprint | None = None
        running: RunningStack | None = None
        try:
            seconds = stack.wait_ready(READY_TIMEOUT_SECONDS)
            running = RunningStack(stack, settings, seconds)
            yield running
        finally:
            if running is not None:
                running.close_channels()
                footprint = Footprint.of(running)
            stack.stop()
    # Part of the contract of `make run` too: stopping leaves no process, port or shm file.
    if footprint is not None:
        leftovers = footprint.leftovers()
        assert not leftovers, f"the stopped stack left behind: {leftovers}"
    if request.session.testsfailed:
        print(f"\nstack logs kept in {settings.log_dir}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
