"""Session fixtures shared by every test folder.

`stack`: the real platform (PostgreSQL, Triton with the model, the four services, Envoy), started
ONCE per pytest session through the launcher's own `Stack`, on free ports and under a temporary
FERRY_HOME, so that several stacks (other sessions, `make run`) can run side by side. Tests that
use it are marked `stack` (`make test-unit` deselects them).

Authentication is on, as users run ferry: the stack starts with a fresh bootstrap admin key
(`stack.admin_key`), which `stack.channel()` and `stack.http()` send; `stack.create_key()` makes others.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.stack import RunningStack, running_stack, scratch_home, stack_settings

# Cold start on a quiet machine is ~10-20 s; generous for a loaded CI box (make run's limit is 60 s).
READY_TIMEOUT_SECONDS = float(os.environ.get("FERRY_TEST_READY_TIMEOUT", "240"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever uses the stack is an integration test, marked or not.
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[RunningStack]:
    scratch, home = scratch_home("ferry-test-")
    settings = stack_settings(home)
    with running_stack(settings, READY_TIMEOUT_SECONDS) as running:
        yield running
    if request.session.testsfailed:
        print(f"\nstack logs kept in {settings.log_dir}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
