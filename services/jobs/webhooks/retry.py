"""When a failed delivery is tried again: exponential backoff with jitter, for `retry_for_seconds`.

The n-th retry waits `retry_initial_seconds x retry_multiplier^(n-1)`, at most
`retry_max_interval_seconds`, scaled by a random factor in [1 - jitter, 1 + jitter] so that the
retries of many events failing together (a receiver down) spread out. No retry starts later than
`retry_for_seconds` after the event: the event is then `failed` (every try stays on the job).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta

from services.common.config import WebhookSettings


def nominal_delay(attempts_made: int, settings: WebhookSettings) -> float:
    """Seconds before the next try after `attempts_made` (>= 1) failed ones, without jitter."""
    exponent = max(0, attempts_made - 1)
    # Capped before it can overflow: the multiplier's powers grow fast.
    delay = settings.retry_initial_seconds
    for _ in range(exponent):
        delay *= settings.retry_multiplier
        if delay >= settings.retry_max_interval_seconds:
            break
    return min(delay, settings.retry_max_interval_seconds)


def next_attempt_time(
    created: datetime,
    attempts_made: int,
    at: datetime,
    settings: WebhookSettings,
    rand: Callable[[], float] = random.random,
) -> datetime | None:
    """When to try again after a failed try at `at`; None when the retry window has closed."""
    jitter = 1.0 + settings.retry_jitter * (2.0 * rand() - 1.0)
    when = at + timedelta(seconds=nominal_delay(attempts_made, settings) * jitter)
    if when > created + timedelta(seconds=settings.retry_for_seconds):
        return None
    return when


def schedule(settings: WebhookSettings) -> list[float]:
    """The nominal seconds from the event to each try (the first is 0), for docs and tests."""
    times, elapsed, made = [0.0], 0.0, 1
    while True:
        elapsed += nominal_delay(made, settings)
        if elapsed > settings.retry_for_seconds:
            return times
        times.append(elapsed)
        made += 1
