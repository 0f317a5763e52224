"""The retry schedule (services/jobs/webhooks/retry.py): exponential, jittered, for hours, then done."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.common.config import WebhookSettings
from services.jobs.webhooks.retry import next_attempt_time, nominal_delay, schedule

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_default_schedule_backs_off_exponentially_for_hours() -> None:
    settings = WebhookSettings()
    assert [nominal_delay(n, settings) for n in range(1, 9)] == [5, 20, 80, 320, 1280, 5120, 14400, 14400]
    times = schedule(settings)
    assert times[0] == 0 and len(times) == 12
    assert 20 * 3600 < times[-1] <= 24 * 3600


def test_jitter_stays_within_its_bounds() -> None:
    settings = WebhookSettings(retry_jitter=0.2)
    low = next_attempt_time(T0, 2, T0, settings, rand=lambda: 0.0)
    high = next_attempt_time(T0, 2, T0, settings, rand=lambda: 0.999999)
    assert low == T0 + timedelta(seconds=16)
    assert high is not None and T0 + timedelta(seconds=23.99) < high <= T0 + timedelta(seconds=24)


def test_no_retry_after_the_window() -> None:
    settings = WebhookSettings(retry_for_seconds=60, retry_jitter=0)
    assert next_attempt_time(T0, 1, T0, settings) == T0 + timedelta(seconds=5)
    assert next_attempt_time(T0, 3, T0 + timedelta(seconds=25), settings) is None  # 25 + 80 > 60
    assert next_attempt_time(T0, 1, T0, WebhookSettings(retry_for_seconds=0)) is None
