"""Receive a socket's bytes in one worker thread, write them in a second and digest them in a third: the fast
path of an upstream body.

Why: a cold pull through the node is CPU-bound on a small machine (two cores shared by the origin registry, the
node and the client). Reading the socket on the event loop into fresh 1 MiB `bytes` and handing them to a
writer thread (`lane.ThreadLane`) cost ~2.6 CPU-seconds per GiB, and the one thread that received, wrote and
hashed in turn paced the origin. Here one thread `recv_into`s a few reused buffers (no allocation and no page
faults on fresh memory), a second writes them and a third digests what was written, each beside the others'
next chunk instead of after it, and the loop is left to serve clients. A 1 GiB cold pull costs the node 2.7-2.9
CPU-seconds here (`bench/mirror_bench.py --only cold` prints it), much of it the write into new page-cache pages,
which this VM's host faults in one by one.

Over TLS the receiver also decrypts, with the connection's own session (`oci.rawbody.TlsState`: trio's
SSLObject and its memory BIOs, untouched by any task meanwhile), into the same buffers. On the loop, trio's
SSLStream hands a body over one 16 KiB TLS record per read, and each became a chunk for the writer lane and a
wake-up for the clients: a cold 1 GiB pull from an HTTPS origin ran at 0.04 GB/s and ~28 CPU-seconds; through
the pump, 0.30 GB/s and 3.9 CPU-seconds (`bench/mirror_bench.py --tls`).

Order: `write(pos, view)` (the writer) runs before `digest(pos, view)` (the hasher) for each chunk, and the
digests' results come out of `results` in stream order, so whoever marks bytes readable from them marks
only bytes on disk. `BUFFERS` buffers bound how far the receiver runs ahead of the hasher.

Memory: a pump's buffers are sized to its body (a 256 KiB blob gets one 256 KiB buffer, not 8 x 1 MiB) and
come out of the node's `BufferBudget` (`PUMP_BUDGET` bytes for all pumps at once). A pump waits for its first
buffer when the budget is spent and takes as many more as are free then, never waiting for a second one, so
every pump that started can finish (found in review: 60 cold 256 KiB blobs at once took a node from 36 MB to
426 MB of RSS, every pump zero-filling 8 MiB). The buffers are anonymous mmaps: untouched pages cost nothing,
and they go back to the system when the pump ends instead of fragmenting the heap.

Structure: `run()` holds the three threads as tasks of its own nurseries. They wait in `POLL` steps and stop
within one step of a cancellation: a flag set when `run()` is cancelled, or when the hasher ends (it drains
every chunk the receiver queued before its end marker first). Neither outlives `run()`.
"""

from __future__ import annotations

import functools
import math
import mmap
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import httpx
import trio

if TYPE_CHECKING:
    from p2pcache.oci.rawbody import SocketBody, TlsState

# The reused buffers: their size (the most a chunk holds) and number, at most, for one pump.
CHUNK = 1 << 20
BUFFERS = 8
# The bytes of buffers all pumps of a node hold at once: four 1 GiB pulls get their 8 MiB each, and 200 cold
# small blobs at once cost at most this much (each pump takes at least one buffer, sized to its body).
PUMP_BUDGET = 32 << 20
# How often a waiting thread looks up to see whether it was cancelled.
POLL = 0.05
# How long received bytes may wait for their buffer to fill: a slow upstream's bytes flow on in small steps.
FLUSH = 0.02
# A receive waits (SO_RCVLOWAT) until this much can be taken at once, or a poll step passed: fewer receive
# calls per chunk, each a GIL round trip among three busy threads, and fewer window updates for the origin to
# process (1 GiB cold pulls, 3 runs each: 0.55 GB/s with 1 byte, 0.57 with 256 KiB, 0.58 with 1 MiB).
LOWAT = CHUNK

R = TypeVar("R")
Q = TypeVar("Q")
T = TypeVar("T")


class ThreadSocket:
    """Blocking receives from a stdlib socket (the caller's to close) in a worker thread.

    Receives wait in `POLL` steps, so the thread sees its cancel flag within one step, and each waits (with
    `SO_RCVLOWAT`) until `LOWAT` bytes or the rest of the buffer can be taken at once."""

    def __init__(self, sock: socket.socket, tls: TlsState | None = None, raw_size: int = CHUNK) -> None:
        self.sock = sock
        sock.settimeout(POLL)
        self._lowat = 1  # the socket's SO_RCVLOWAT
        self._tls = tls
        # Ciphertext on its way in: no bigger than the buffers it is decrypted into.
        self._raw = memoryview(bytearray(raw_size)) if tls is not None else None

    def fill(self, view: memoryview, cancel: threading.Event, timeout: float | None) -> tuple[int, OSError | None]:
        """Fill `view`: (bytes received, error); never raises. In a worker thread.

        Returns early with what it has when `cancel` is set, once its first bytes are `FLUSH` old, or when the
        peer pauses for a poll step with bytes in hand (a slow sender's bytes flow on in small steps).
        Errors: ConnectionAbortedError when the peer closed, TimeoutError when it sent nothing for `timeout`
        seconds, or the socket's own OSError."""
        got, first, quiet_since = 0, 0.0, time.monotonic()
        while got < len(view) and not cancel.is_set():
            try:
                n = self._recv(view[got:])
            except OSError as e:
                return got, e
            if n is None:  # a quiet poll step
                if got:
                    break
                if timeout is not None and time.monotonic() - quiet_since >= timeout:
                    return got, TimeoutError(f"no byte for {timeout} s")
                continue
            if not n:
                return got, ConnectionAbortedError("the peer closed the connection")
            quiet_since = now = time.monotonic()
            if not got:
                first = now
            elif now - first >= FLUSH:
                return got + n, None
            got += n
        return got, None

    def _recv(self, view: memoryview) -> int | None:
        """One receive into `view`, decrypted if the connection is TLS: 0 at the end, None when nothing came
        for a poll step."""
        tls = self._tls
        if tls is None:
            return self._recv_raw(view)
        assert self._raw is not None
        while True:
            try:
                return tls.ssl_object.read(len(view), view)  # the GIL is released while OpenSSL decrypts
            except ssl.SSLWantReadError:
                pass
            if tls.outgoing.pending:  # a post-handshake message of ours (rare): it must reach the peer
                self.sock.sendall(tls.outgoing.read())
            n = self._recv_raw(self._raw[: len(view)])
            if n is None:
                return None
            if n:
                tls.incoming.write(self._raw[:n])
            else:
                tls.incoming.write_eof()  # the next read ends the body (or raises an SSLError, an OSError)

    def _recv_raw(self, view: memoryview) -> int | None:
        """One receive into `view`: waits up to a poll step for `LOWAT` bytes (or the rest of `view`), then
        takes whatever is there; None when nothing came."""
        for lowat in (min(LOWAT, len(view)), 1):
            if lowat != self._lowat:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                self._lowat = lowat
            try:
                return self.sock.recv_into(view)
            except TimeoutError:
                if lowat == 1:
                    return None
        return None


async def run_cancellable(fn: Callable[[], T], cancel: threading.Event,
                          limiter: trio.CapacityLimiter | None = None,
                          on_cancel: Callable[[], None] | None = None) -> T:
    """`fn()` in a worker thread that watches `cancel`: the flag is set if this call is cancelled (not when `fn`
    returns: others may share the flag), and `fn` must then return soon (within a poll step). `on_cancel`, if
    given, is called then too (on the loop): to wake a thread blocked in a call that no flag reaches. The thread
    is waited for, never abandoned."""
    returned = False

    async def set_cancel_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not returned:
                cancel.set()
                if on_cancel is not None:
                    on_cancel()

    async with trio.open_nursery() as watch:
        watch.start_soon(set_cancel_when_cancelled)
        result = await trio.to_thread.run_sync(fn, limiter=limiter)
        returned = True
        watch.cancel_scope.cancel()
    return result


class BufferBudget:
    """The bytes of pump buffers a node's pumps may hold at once (see the module docstring: Memory).

    On the event loop only. A pump that asks while nothing is lent gets its first buffer even if it is bigger
    than the whole budget, so no pump waits for ever."""

    def __init__(self, total: int = PUMP_BUDGET) -> None:
        self.total = total
        self.lent = 0
        self._returned = trio.lowlevel.ParkingLot()

    async def take(self, size: int, count: int) -> int:
        """Lend up to `count` buffers of `size` bytes: waits until one fits, then lends as many as fit; returns
        how many. Give them back with `give_back(size * n)`."""
        while self.lent and self.lent + size > self.total:
            await self._returned.park()
        n = max(1, min(count, (self.total - self.lent) // size))
        self.lent += n * size
        return n

    def give_back(self, nbytes: int) -> None:
        self.lent -= nbytes
        self._returned.unpark_all()


class SocketPump(Generic[R]):
    """Pumps the rest of a body (`oci.rawbody.SocketBody`: its leftover bytes, then `left` more from its socket,
    decrypted if it is TLS) through `write` and `digest`.

    The body's socket is the pump's to close (a duplicate of the connection's).
    `count(n)` is called in the receiver for each chunk (metrics; must be thread-safe). `write` may raise
    OSError (a full or failing disk): `run()` then raises it. Each `digest` result lands in `results`, which
    closes when the pump ends; read it in a task beside `run()`. Its buffers come from `budget` (the node's:
    one of its own when None).
    """

    def __init__(self, body: SocketBody, *, write: Callable[[int, memoryview], None],
                 digest: Callable[[int, memoryview], R], count: Callable[[int], None],
                 budget: BufferBudget | None = None) -> None:
        self._body = body
        self._budget = budget if budget is not None else BufferBudget()
        self.buffer_size = 0  # of each buffer, and how many: known once run() took them (for tests)
        self.buffers = 0
        self._write = write
        self._digest = digest
        self._count = count
        self._cancel = threading.Event()
        # The three threads wait on each other, so they must all run: from trio's shared limiter (40 threads)
        # 14 pumps could each hold two and wait for a third for ever (20 with two threads a pump, before). A
        # limiter of its own gives every pump its three; the node's downloads bound how many pumps there are.
        self._limiter = trio.CapacityLimiter(3)
        self._write_error: OSError | None = None
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._writes: queue.SimpleQueue[tuple[int, memoryview, int] | None] = queue.SimpleQueue()
        self._work: queue.SimpleQueue[tuple[int, memoryview, int] | None] = queue.SimpleQueue()
        self._results_tx, self.results = trio.open_memory_channel[R](math.inf)

    async def run(self, start: int, limit: int) -> BaseException | None:
        """Pump the bytes for positions `start` to `limit` (or until the body ends); returns the error that
        ended the body early, if any (the bytes before it are written and digested)."""
        # Sized to the body: what is left of it, never more than its bytes in flight can use.
        body_left = max(1, min(limit - start, len(self._body.leftover) + self._body.left))
        size = max(min(CHUNK, body_left), min(len(self._body.leftover), limit - start))
        lent = await self._budget.take(size, min(BUFFERS, -(-body_left // size)))
        self.buffer_size, self.buffers = size, lent
        try:
            for _ in range(lent):
                self._free.put(memoryview(mmap.mmap(-1, size)))  # unmapped once the last view of it goes
            token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as threads:
                threads.start_soon(self._hasher, token)
                threads.start_soon(functools.partial(trio.to_thread.run_sync, self._write_received,
                                                     limiter=self._limiter))
                err = await run_cancellable(functools.partial(self._receive, start, limit, size), self._cancel,
                                            self._limiter)
        finally:
            self._drop_buffers()
            self._budget.give_back(size * lent)
        if self._write_error is not None:
            raise self._write_error
        return err

    async def _hasher(self, token: trio.lowlevel.TrioToken) -> None:
        try:
            await trio.to_thread.run_sync(self._hash_written, token, limiter=self._limiter)
        finally:
            self._cancel.set()  # after the receiver's last chunk, or on an error here: the receiver stops too
            self._results_tx.close()  # its deliveries ran before its return reached us: the reader drains them

    def _take(self, q: queue.SimpleQueue[Q]) -> Q | None:
        while not self._cancel.is_set():
            try:
                return q.get(timeout=POLL)
            except queue.Empty:
                pass
        return None

    def _drop_buffers(self) -> None:
        """Let go of the buffers (the threads have ended): each is unmapped with its last reference."""
        for q in (self._free, self._writes, self._work):
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break

    def _receive(self, pos: int, limit: int, size: int) -> BaseException | None:
        left, leftover, timeout = self._body.left, self._body.leftover, self._body.timeout
        try:
            with self._body.sock:
                sock = ThreadSocket(self._body.sock, self._body.tls, size)
                buf = self._take(self._free)
                if buf is None:
                    return None
                got = min(len(leftover), limit - pos)
                buf[:got] = leftover[:got]
                err: BaseException | None = None
                while True:
                    if got:
                        self._count(got)
                        self._writes.put((pos, buf, got))
                        pos += got
                        buf = self._take(self._free)
                        if buf is None:
                            return None
                    if err is not None or pos >= limit or self._cancel.is_set():
                        return err
                    want = min(len(buf), limit - pos, left)
                    if want <= 0:
                        return httpx.ReadError(f"upstream body ended at byte {pos}")
                    got, problem = sock.fill(buf[:want], self._cancel, timeout)
                    if isinstance(problem, TimeoutError):
                        err = httpx.ReadTimeout(f"no byte from upstream for {timeout} s")
                    elif problem is not None:
                        err = httpx.ReadError(str(problem) or "read failed")
                    left -= got
        finally:
            self._writes.put(None)

    def _write_received(self) -> None:
        """The writer thread: beside the receiver's next `recv_into`, not after it. On this VM a write into
        fresh page-cache pages costs about as much CPU as the receive (the host faults each page in), and the
        two in one thread ran at the sum of both; the hasher still sees only written bytes."""
        try:
            while (item := self._take(self._writes)) is not None:
                pos, buf, n = item
                try:
                    self._write(pos, buf[:n])
                except OSError as e:
                    self._write_error = e  # raised by run(), outside the nurseries (no group)
                    self._cancel.set()
                    return
                self._work.put(item)
        finally:
            self._work.put(None)

    def _hash_written(self, token: trio.lowlevel.TrioToken) -> None:
        while (item := self._take(self._work)) is not None:
            pos, buf, n = item
            token.run_sync_soon(self._deliver, self._digest(pos, buf[:n]))
            self._free.put(buf)

    def _deliver(self, result: R) -> None:
        # On the event loop, from run_sync_soon: must not raise.
        try:
            self._results_tx.send_nowait(result)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader is gone (we are being cancelled): the threads stop at their next poll
