"""A stack of its own with tracing on, exporting to a real OTLP receiver in the test process."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.observability.collector import Collector
from tests.stack import RunningStack, running_stack, scratch_home, stack_settings

READY_TIMEOUT_SECONDS = 180.0
# One model is enough to trace (and starts faster than the default three).
MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    receiver = Collector()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def traced(collector: Collector, request: pytest.FixtureRequest) -> Iterator[RunningStack]:
    scratch, home = scratch_home("ferry-traces-")
    settings = stack_settings(
        home,
        telemetry={
            "exporter": "otlp",
            "otlp_endpoint": collector.grpc_endpoint,
            "sampling_ratio": 1.0,
            "triton_otlp_http_endpoint": collector.http_endpoint,
        },
    )
    settings.triton.load_models = [MODEL]
    # The services' batch span processors export every 200 ms instead of every 5 s (the children
    # inherit this environment), so the test waits less.
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    try:
        with running_stack(settings, READY_TIMEOUT_SECONDS) as running:
            yield running
    finally:
        if saved is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved
    if request.session.testsfailed:
        print(f"\ntraced stack logs kept in {settings.log_dir}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
