"""ThreadLane: one worker thread fed in order from the event loop, bounded, and never outliving its owner."""

from __future__ import annotations

import threading

import pytest
import trio

from p2pcache.lane import ThreadLane


async def test_items_are_worked_in_order_and_results_come_back() -> None:
    seen: list[int] = []
    threads: set[int] = set()

    def work(batch: list[int]) -> int:
        threads.add(threading.get_ident())
        seen.extend(batch)
        return sum(batch)

    lane: ThreadLane[int, int] = ThreadLane(work, depth=4, max_batch=3)
    total = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.run)
        for i in range(100):
            await lane.put(i)
        lane.close()
        async for r in lane.results:
            total += r
    assert seen == list(range(100))
    assert total == sum(range(100))
    assert len(threads) == 1 and threading.get_ident() not in threads


async def test_put_waits_while_depth_items_are_outstanding() -> None:
    gate = threading.Event()
    lane: ThreadLane[int, None] = ThreadLane(lambda batch: gate.wait(5) and None, depth=2, max_batch=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.run)
        await lane.put(1)
        await lane.put(2)
        with trio.move_on_after(0.2) as scope:
            await lane.put(3)
        assert scope.cancelled_caught, "a third item must wait while two are in the lane"
        gate.set()
        with trio.fail_after(5):
            await lane.put(3)
        lane.close()


async def test_an_error_in_the_thread_reaches_the_owner() -> None:
    def work(batch: list[int]) -> None:
        if 3 in batch:
            raise OSError("disk on fire")

    lane: ThreadLane[int, None] = ThreadLane(work, depth=8, max_batch=1)
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="disk on fire")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lane.run)
            try:
                for i in range(1000):
                    await lane.put(i)
            finally:
                lane.close()
    with pytest.raises(trio.ClosedResourceError):
        await lane.put(1)


async def test_a_cancelled_owner_stops_the_thread_before_it_returns() -> None:
    """Structured concurrency: when the owner's nursery exits, the thread has returned, so nothing keeps
    working on a file the owner is about to close."""
    worked: list[int] = []
    lane: ThreadLane[int, None] = ThreadLane(lambda batch: worked.extend(batch), depth=4, max_batch=2)
    before = threading.active_count()
    with trio.move_on_after(0.2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lane.run)
            try:
                i = 0
                while True:
                    await lane.put(i)
                    i += 1
                    if i % 50 == 0:
                        await trio.sleep(0.01)
            finally:
                lane.close()
    n = len(worked)
    await trio.sleep(0.05)
    assert len(worked) == n, "the thread went on working after its owner left"
    assert worked == list(range(n))
    assert threading.active_count() <= before + 1  # trio's thread cache may keep an idle thread
