"""Bounded admission (pure logic): slots, a FIFO queue, fast refusal with a retry delay."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.errors import RpcError
from services.inference.admission import Admission


async def test_admits_up_to_the_limit_then_queues_then_refuses() -> None:
    gate = Admission("m", max_in_flight=2, max_queued=1)
    await gate.acquire()
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert (gate.in_flight, gate.queued) == (2, 1)
    with pytest.raises(RpcError) as err:
        await gate.acquire()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.retry_after_seconds is not None and err.value.retry_after_seconds >= 1
    gate.release()
    await asyncio.wait_for(waiter, 1)
    assert (gate.in_flight, gate.queued) == (2, 0)
    gate.release()
    gate.release()
    assert gate.in_flight == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    gate = Admission("m", max_in_flight=1, max_queued=5)
    await gate.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await gate.acquire()
        order.append(i)
        gate.release()

    tasks = [asyncio.create_task(wait(i)) for i in range(4)]
    await asyncio.sleep(0)
    gate.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert order == [0, 1, 2, 3] and gate.in_flight == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    gate = Admission("m", max_in_flight=1, max_queued=1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.queued == 0
    gate.release()
    assert gate.in_flight == 0


async def test_deadline_while_queued_is_deadline_exceeded() -> None:
    gate = Admission("m", max_in_flight=1, max_queued=1)
    await gate.acquire()
    with pytest.raises(RpcError) as err:
        await gate.acquire(timeout=0.01)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gate.queued == 0 and gate.in_flight == 1


async def test_zero_queue_refuses_as_soon_as_slots_are_full() -> None:
    gate = Admission("m", max_in_flight=1, max_queued=0)
    async with gate.slot():
        with pytest.raises(RpcError):
            await gate.acquire()
    assert gate.in_flight == 0


async def test_growing_the_limit_admits_waiters() -> None:
    gate = Admission("m", max_in_flight=1, max_queued=4)
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    gate.resize(3, 4)
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert (gate.in_flight, gate.queued) == (3, 0)


async def test_shrinking_the_limit_lets_running_requests_finish() -> None:
    gate = Admission("m", max_in_flight=2, max_queued=4)
    await gate.acquire()
    await gate.acquire()
    gate.resize(1, 4)
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    gate.release()  # 2 -> 1 running: still at the new limit, the waiter keeps waiting
    await asyncio.sleep(0)
    assert not waiter.done()
    gate.release()
    await asyncio.wait_for(waiter, 1)
    assert gate.in_flight == 1
