"""ONE stack for every fault test of this package (test_database_outage, test_engine_faults,
test_envoy_replicas), started once: a stack costs 15-30 s to start on a quiet machine (minutes on a
loaded one) and ~20 s to stop.

- Triton serves the test models of tests/resilience/models: `bench-stream` (the trivial model, the
  default), `slow-stream` (one " tok" every 50 ms: still streaming when Triton dies), both loaded at
  start, and `spare-stream` (loaded by a test through LoadModel);
- two replicas of each service a test kills (models, transactions, gateway, inference), as
  `make run` offers them;
- the embedded PostgreSQL (a test pauses and kills it).

In this package `stack` is that shared stack (it overrides the session one of tests/conftest.py).
Every test finds it whole and must leave it whole (`support.settle`: every program RUNNING,
PostgreSQL answering, /readyz 200, every replica healthy in Envoy, the models READY, a generation
answered), so no test depends on another or on their order.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.ports import is_free
from services.common.config import ServiceSettings
from tests.resilience.support import FAST_MODEL, REPLICATED, SLOW_MODEL, settle
from tests.stack import RunningStack, running_stack, scratch_home, stack_settings

MODELS = Path(__file__).parent / "models"
# Generous for a loaded 2-core machine (the session stack's limit).
READY_TIMEOUT_SECONDS = 240.0
# Until the stack is whole again after a test's fault (PostgreSQL or Triton restarted, a replica back).
SETTLE_TIMEOUT_SECONDS = 180.0


def free_replica_step(service: ServiceSettings) -> int:
    """A replica_port_step under which replica 1's ports are free (the test's ports are random)."""
    for _ in range(200):
        step = random.randrange(1, 2000)
        ports = [service.port + step, service.metrics_port + step]
        if all(20000 <= p < 32000 and is_free(service.host, p) for p in ports):
            return step
    raise RuntimeError("no free ports for a second replica")


@pytest.fixture(scope="package")
def resilience_stack(request: pytest.FixtureRequest) -> Iterator[tuple[RunningStack, list[str]]]:
    """The shared stack and the supervisord programs running (or starting) once it was ready."""
    scratch, home = scratch_home("ferry-resilience-")
    settings = stack_settings(
        home,
        triton={"repository": MODELS, "default_model": FAST_MODEL, "load_models": [FAST_MODEL, SLOW_MODEL]},
    )
    assert settings.database_url is None, "these tests need the embedded PostgreSQL"
    for name in REPLICATED:
        service: ServiceSettings = getattr(settings, name)
        service.replicas = 2
        service.replica_port_step = free_replica_step(service)
    with running_stack(settings, READY_TIMEOUT_SECONDS) as running:
        processes = running.supervisor().processes()
        yield (
            running,
            sorted(n for n, info in processes.items() if info["statename"] in ("RUNNING", "STARTING")),
        )
    if request.session.testsfailed:
        print(f"\nresilience stack logs kept in {settings.log_dir}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def stack(resilience_stack: tuple[RunningStack, list[str]]) -> Iterator[RunningStack]:
    """The shared stack, whole when the test starts; the test must leave it whole (checked after it)."""
    running, programs = resilience_stack
    settle(running, programs, SETTLE_TIMEOUT_SECONDS)
    yield running
    waited = settle(running, programs, SETTLE_TIMEOUT_SECONDS)
    print(f"\nshared stack whole again {waited:.1f} s after the test")
