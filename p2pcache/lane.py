"""A worker thread fed in order from the event loop: for per-chunk work (pwrite, hashing) on a blob stream.

Why not `trio.to_thread.run_sync` per chunk: a hop costs ~200 µs of CPU here (a thread-cache dispatch, a
result wakeup, GIL hand-offs), and a cold 1 GiB pull made two per chunk, ~0.4 s of CPU, on a machine where the
pull is CPU-bound. A lane keeps one thread for the whole stream and hands it items through a `queue.SimpleQueue`
(~65 µs an item, measured the same way); results come back on the event loop in batches.

Structure: `run()` is a task in the owner's nursery and holds the thread (`to_thread.run_sync`, not
abandoned on cancel, so the thread never outlives its owner). The owner must `close()` the lane when it stops
putting items, also when cancelled (a `finally`): the thread then finishes what was queued and returns, and
`run()` returns. An exception in `work` ends the thread and is raised from `run()`, so the nursery cancels the
owner. `put()` waits while `depth` items are queued or in work (back-pressure; memory stays bounded).
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class ThreadLane(Generic[T, R]):
    """`work(batch)` runs in one thread on items in the order they were put; each result lands in `results`."""

    def __init__(self, work: Callable[[list[T]], R], *, depth: int, max_batch: int) -> None:
        self._work = work
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._slots = trio.Semaphore(depth)
        self._closed = False
        self._results_tx, self.results = trio.open_memory_channel[R](math.inf)

    async def put(self, item: T) -> None:
        """Queue `item` for the thread; waits while `depth` items are outstanding."""
        if self._closed:
            raise trio.ClosedResourceError("lane is closed")
        await self._slots.acquire()
        self._queue.put(item)

    def close(self) -> None:
        """No more items: the thread finishes the queued ones and stops. Idempotent."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)

    async def run(self) -> None:
        """Hold the thread until it stops; then close `results` (its reader's loop ends)."""
        token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(self._thread, token)
        finally:
            self._results_tx.close()

    def _thread(self, token: trio.lowlevel.TrioToken) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            result = self._work(batch)  # type: ignore[arg-type]
            token.run_sync_soon(self._deliver, len(batch), result)

    def _deliver(self, n: int, result: R) -> None:
        # On the event loop, from run_sync_soon: must not raise.
        for _ in range(n):
            self._slots.release()
        try:
            self._results_tx.send_nowait(result)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader is gone (its owner was cancelled): nobody wants the result
