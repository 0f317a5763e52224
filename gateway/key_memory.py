"""Every gateway replica's outage memory holds every working key, not only those it looked up itself.

Envoy asks any replica to check a key, and with edge leases a key's checks are few: the replica that
gets the first check after PostgreSQL stops answering has often never seen the key, and would refuse
it with 503 (AUTH_UNAVAILABLE) while another replica would allow it. So each replica reads the key
store in the background: every working key a page at a time, five times per
`auth.stale_if_error_seconds` (a key known only from these reads keeps working for at least four fifths
of that into an outage; a key deleted or expired leaves the memory), and the keys created or revoked
since its last read every `auth.cache_seconds` (a new key is known fleet-wide within that; a key
revoked through the API anywhere is refused from every replica's memory within that, so an outage no
longer revives it). Nothing is read while the store is down; the checks' own lookups tell when it is
back. The memory is used only in an outage: checks still look keys up as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta

from prometheus_client import Gauge

from gateway.authorizer import CACHE_ENTRIES, LocalAuthorizer
from gateway.store import KeyStore
from services.common.timestamps import now

log = logging.getLogger(__name__)

MEMORY_KEYS = Gauge(
    "ferry_gateway_key_memory_keys",
    "Keys this gateway can answer from memory while PostgreSQL is down (auth.stale_if_error_seconds).",
)
MEMORY_READ = Gauge(
    "ferry_gateway_key_memory_read_timestamp_seconds",
    "When this gateway last read the key store into its outage memory (Unix time): every "
    "auth.cache_seconds while PostgreSQL answers.",
)

# Reads reach back this much before the last one began: create and revoke times are written by the
# clock of whichever replica (or database) made the change, which may run behind this one's.
CLOCK_SLACK = timedelta(seconds=30)
# A query that takes longer is abandoned (a stalled database answers nothing and raises nothing).
READ_TIMEOUT_SECONDS = 5.0
# A full read goes a page at a time, letting the key checks run in between: 100,000 keys read at once
# held the event loop for over a second.
PAGE_SIZE = 2000
# Every working key is read at least this often (as a part of auth.stale_if_error_seconds): a key known
# only from these reads keeps working for at least the rest of that time into an outage.
FULL_READS_PER_STALE_WINDOW = 5


class KeyMemory:
    def __init__(self, authorizer: LocalAuthorizer, store: KeyStore) -> None:
        self.authorizer = authorizer
        self.store = store
        auth = authorizer.auth
        self.interval = max(auth.cache_seconds, 0.1)
        self.full_interval = max(auth.stale_if_error_seconds / FULL_READS_PER_STALE_WINDOW, self.interval)
        self._since: datetime | None = None  # when the last read that succeeded began (wall clock)
        self._next_full = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.authorizer.auth.stale_if_error_seconds > 0:
            self._task = asyncio.create_task(self._run(), name="key-memory")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def read_once(self) -> None:
        """One read of the store into the memory: every working key when due, else what changed."""
        started, generation = now(), self.authorizer.generation
        if self._since is None or time.monotonic() >= self._next_full:
            await self._read_every_working_key(generation)
            self._next_full = time.monotonic() + self.full_interval
        else:
            changed = await asyncio.wait_for(
                self.store.changed_since(self._since - CLOCK_SLACK, CACHE_ENTRIES), READ_TIMEOUT_SECONDS
            )
            self.authorizer.remember(changed, read_at_generation=generation)
        self._since = started
        MEMORY_KEYS.set(len(self.authorizer.stale_by_id))
        MEMORY_READ.set(started.timestamp())

    async def _read_every_working_key(self, generation: int) -> None:
        read: set[str] = set()
        after: tuple[datetime, str] | None = None
        while len(read) < CACHE_ENTRIES:
            page = await asyncio.wait_for(
                self.store.page(show_inactive=False, after=after, size=PAGE_SIZE), READ_TIMEOUT_SECONDS
            )
            read |= self.authorizer.remember(page, read_at_generation=generation)
            if len(page) < PAGE_SIZE:
                # Complete: what the memory holds of keys the read did not find goes (a key created
                # meanwhile comes back with the next read of what changed).
                self.authorizer.keep_only(read)
                return
            after = (page[-1].create_time, page[-1].id)
            await asyncio.sleep(0)

    async def _run(self) -> None:
        warned = False
        while True:
            if not self.authorizer.degraded:
                try:
                    await self.read_once()
                except Exception as err:  # an outage or a stall: the memory stays as it was
                    if self._since is None:  # the database is not ready yet: a start-up, not news
                        log.debug("key memory not read yet: %r", err)
                    elif not warned:  # once per spell, not every auth.cache_seconds
                        log.warning("key memory not refreshed (%r); keeping what it holds", err)
                        warned = True
                else:
                    if warned:
                        log.warning("key memory refreshed again")
                    warned = False
            await asyncio.sleep(self.interval)
