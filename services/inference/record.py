"""The record stage: every admitted request gets exactly one transaction start and one finish.

The start is written once the request is admitted; the finish before the caller receives the last
piece (so an answered request is always recorded), or when the request fails or its caller goes away.
Requests refused before admission are not recorded (the audit trail has them).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from services.inference.domain import Exchange

log = logging.getLogger(__name__)


class TransactionLog(Protocol):
    """Where transaction records go (`transaction_log.SpoolTransactionLog` in the service)."""

    async def started(self, exchange: Exchange) -> None: ...

    async def finished(self, exchange: Exchange) -> None: ...


class NoTransactionLog:
    async def started(self, exchange: Exchange) -> None:
        return None

    async def finished(self, exchange: Exchange) -> None:
        return None


class _State(enum.Enum):
    NOT_STARTED = enum.auto()
    STARTED = enum.auto()
    FINISHED = enum.auto()


class RecordOnce:
    """One exchange's records: `start()` once, then `finish()` takes effect once (and only if started)."""

    def __init__(self, transactions: TransactionLog, exchange: Exchange) -> None:
        self.transactions = transactions
        self.exchange = exchange
        self._state = _State.NOT_STARTED

    async def start(self) -> None:
        if self._state is _State.NOT_STARTED:
            self._state = _State.STARTED
            await self._write(self.transactions.started)

    async def finish(self) -> None:
        if self._state is _State.STARTED:
            self._state = _State.FINISHED
            await self._write(self.transactions.finished)

    async def _write(self, hook: Callable[[Exchange], Awaitable[None]]) -> None:
        try:
            await hook(self.exchange)
        except Exception:
            # Recording must never turn a served answer into an error (the spool is durable).
            log.exception("recording request %s failed", self.exchange.request_id)
