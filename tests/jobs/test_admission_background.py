"""The admission gate's background lane (jobs): spare slots only, never a place in the queue."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.errors import Reason, RpcError
from services.common.interceptor import Call
from services.inference.admission import BACKGROUND, PRIORITY_HEADER, Admission, is_background


def _deferred(gate: Admission, reserve: int) -> RpcError:
    with pytest.raises(RpcError) as refused:
        gate.acquire_spare(reserve)
    return refused.value


def test_background_fills_the_slots_beyond_the_reserve_then_is_deferred() -> None:
    gate = Admission("m", max_in_flight=4, max_queued=8)
    for _ in range(3):
        gate.acquire_spare(1)
    err = _deferred(gate, 1)
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.BACKGROUND_DEFERRED)
    assert err.retry_after_seconds is not None
    assert (gate.in_flight, gate.queued) == (3, 0)  # never queued


async def test_an_interactive_request_gets_the_reserved_slot_and_waits_ahead_of_jobs() -> None:
    gate = Admission("m", max_in_flight=4, max_queued=8)
    for _ in range(3):
        gate.acquire_spare(1)
    await gate.acquire()  # the reserved slot: at once
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert gate.queued == 1
    gate.release()  # a job ends: its slot goes to the waiting interactive request
    await asyncio.wait_for(waiting, 1)
    # With every slot busy, a background request is deferred, not queued.
    _deferred(gate, 1)
    assert gate.queued == 0


async def test_background_is_deferred_while_an_interactive_request_waits() -> None:
    gate = Admission("m", max_in_flight=2, max_queued=8)
    await gate.acquire()
    await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    gate.in_flight -= 1  # a slot frees without handing over (as a resize would leave it)
    _deferred(gate, 0)
    waiting.cancel()


def test_a_one_slot_model_still_runs_background_work_when_idle() -> None:
    gate = Admission("m", max_in_flight=1, max_queued=8)
    gate.acquire_spare(5)  # the reserve keeps at most all but one slot
    _deferred(gate, 5)


def test_priority_comes_from_the_call_metadata() -> None:
    def call(metadata: dict[str, str]) -> Call:
        return Call(service="s", method="m", request_id="r", peer="p", metadata=metadata)

    assert is_background(call({PRIORITY_HEADER: BACKGROUND}))
    assert not is_background(call({}))
    assert not is_background(call({PRIORITY_HEADER: "interactive"}))
