"""Per-minute moving windows (the `limits` library) for requests and generated tokens.

Counters live in `auth.rate_limits.storage`: `memory://` counts in this process, which every Envoy
worker and service replica of one machine asks; `redis://...` shares them between machines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from services.common.config import RateLimitSettings


@dataclass(frozen=True)
class Window:
    """One counter: what it limits (for the refusal message), its identity and its size per minute."""

    what: str
    namespace: str
    identity: str
    per_minute: int

    @property
    def item(self) -> RateLimitItem:
        return RateLimitItemPerMinute(self.per_minute, namespace=self.namespace)


def async_storage_uri(uri: str) -> str:
    """The settings name a storage (`memory://`); the async API wants its `async+` variant."""
    return uri if uri.startswith("async+") else f"async+{uri}"


class Limiter:
    def __init__(self, config: RateLimitSettings) -> None:
        self.config = config
        self.strategy = MovingWindowRateLimiter(storage_from_string(async_storage_uri(config.storage)))

    async def seconds_until_free(self, window: Window, cost: int = 1) -> float:
        """0 when `cost` more fits in the window now; else the seconds until its oldest entry leaves."""
        if await self.strategy.test(window.item, window.identity, cost=cost):
            return 0.0
        stats = await self.strategy.get_window_stats(window.item, window.identity)
        return max(0.0, stats.reset_time - time.time())

    async def hit(self, window: Window, cost: int = 1) -> bool:
        return await self.strategy.hit(window.item, window.identity, cost=cost)

    async def remaining(self, window: Window) -> int:
        stats = await self.strategy.get_window_stats(window.item, window.identity)
        return max(0, stats.remaining)
