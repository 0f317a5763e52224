"""A stack of the jobs tests' own (the launcher's Stack, real NATS, Triton with Gemma only), with
settings that keep the tests short: a 4-second ack wait (a killed worker's job comes back quickly),
two attempts per job, and an upstream model that points at a port nobody listens on (a job that
always fails at run time, though it passed every check at create)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from launcher.ports import free_ports
from tests.stack import RunningStack, running_stack, scratch_home, stack_settings

READY_TIMEOUT_SECONDS = 120.0
MODEL = "gemma-3-270m"
NOWHERE = "nowhere-upstream"
ACK_WAIT_SECONDS = 4.0
MAX_ATTEMPTS = 2


@pytest.fixture(scope="session")
def jobs_stack(request: pytest.FixtureRequest) -> Iterator[RunningStack]:
    scratch, home = scratch_home("ferry-jobs-")
    (closed_port,) = free_ports(1)
    settings = stack_settings(
        home,
        upstream_models={
            NOWHERE: {
                "base_url": f"http://127.0.0.1:{closed_port}/v1",
                "max_retries": 0,
                "connect_timeout_seconds": 1,
            }
        },
    )
    settings.triton.load_models = [MODEL]
    settings.jobs.ack_wait_seconds = ACK_WAIT_SECONDS
    settings.jobs.max_attempts = MAX_ATTEMPTS
    settings.jobs.worker_concurrency = 4
    settings.jobs.busy_backoff_seconds = 0.2
    with running_stack(settings, READY_TIMEOUT_SECONDS) as running:
        yield running
    if request.session.testsfailed:
        print(f"\njobs stack logs kept in {settings.log_dir}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
