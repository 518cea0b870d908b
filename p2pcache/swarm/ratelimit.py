"""Token buckets for the node's upload and download limits, without a clock.

Rules:
- Time is passed in (`now`, seconds, any monotonic origin); this module never reads a clock and never sleeps.
  The caller sleeps for the delay it is given (trio in the node, virtual time in the simulator).
- A caller that takes more than the burst is not refused: the bucket goes into debt and the delay grows, so a
  16 MiB piece under a 1 MiB burst is simply paced, never stuck.

Theory of operation: the bucket holds up to `burst` tokens (bytes) and refills at `rate` per second. `take(n, now)`
first refills for the time elapsed since the last call, then removes n tokens. If the level is still >= 0 the
bytes may go now (delay 0); otherwise the delay is the time the refill needs to bring the level back to 0. Bytes
that were granted with a delay are accounted for at once, so concurrent takers queue fairly behind each other
(each new taker sees the debt of the ones before it). A rate of None or infinity means no limit.
"""

from __future__ import annotations

import math

__all__ = ["DownloadShare", "RateMeter", "TokenBucket", "paced_chunk"]


def paced_chunk(rate: float | None, most: int) -> int:
    """The bytes one throttle call should cover under `rate`: an eighth of a second's worth, 16 KiB to `most`.
    A peer connection's sends and reads wait behind the other uploads' and connections' calls on the same bucket;
    with 1 MiB each under 300 kB/s that was seconds of silence, and the peers took each other for stalled."""
    if rate is None or math.isinf(rate):
        return most
    return int(min(most, max(16384.0, rate / 8)))


class TokenBucket:
    def __init__(self, rate: float | None, burst: float | None = None, now: float = 0.0) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for no limit)")
        self.rate = math.inf if rate is None else float(rate)
        # default burst: 100 ms worth of bytes, at least 64 KiB, so small writes are not paced one by one
        if burst is None:
            burst = 65536.0 if math.isinf(self.rate) else max(65536.0, self.rate * 0.1)
        if burst <= 0:
            raise ValueError("burst must be positive")
        self.burst = float(burst)
        self.level = self.burst
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.level = min(self.burst, self.level + (now - self.last) * self.rate)
            self.last = now

    def take(self, n: float, now: float) -> float:
        """Account for n bytes sent at `now`; return how many seconds the caller should wait first."""
        if math.isinf(self.rate):
            return 0.0
        self._refill(now)
        self.level -= n
        if self.level >= 0:
            return 0.0
        return -self.level / self.rate

    def available(self, now: float) -> float:
        """Tokens that could be taken at `now` without delay (negative while in debt)."""
        if math.isinf(self.rate):
            return math.inf
        self._refill(now)
        return self.level

    def set_rate(self, rate: float | None, now: float) -> None:
        """Change the rate from `now` on (tokens accrued so far are kept)."""
        self._refill(now)
        self.rate = math.inf if rate is None else float(rate)


class DownloadShare:
    """A node's download limit shared by two classes: its upstream stream (the claims it holds) and its peer reads.

    Why: the claim holder's upstream stream is the one every other node waits for, so peer reads must not crowd it
    out (a plain FIFO bucket gives it 1/(k+1) of the link against k peers); but strict priority let a stream that
    fills the link starve the peer reads, which then held their uploaders' slots for nothing, and a faster registry
    made a rollout slower (2 nodes, 80 + 50 MB, 10 MB/s up, 25 MB/s down: 8.0 s with a 25 MB/s registry, 10.0 s with
    50). So each class is assured half the limit, and either takes what the other leaves:
    - the stream goes ahead of peer reads (up to `ahead` seconds of debt) while it stays within its half, counted
      by a bucket of its own at half the rate;
    - beyond its half it only takes tokens nobody else took (the bucket's level above zero): peer reads that
      want their half get it;
    - peer reads queue in the shared bucket behind whatever debt is there.
    The simulator shares a download link the same way (`sim/net.py: Net._fill_classes`).
    """

    def __init__(self, rate: float | None, now: float = 0.0, ahead: float = 1.0) -> None:
        self.total = TokenBucket(rate, now=now)
        self.assured = TokenBucket(None if rate is None else rate / 2, now=now)
        self.ahead = ahead

    def peer(self, n: float, now: float) -> float:
        """Account for n bytes of peer reads; seconds to wait."""
        return self.total.take(n, now)

    def upstream(self, n: float, now: float) -> tuple[bool, float]:
        """Try to account for n bytes of the upstream stream: (True, seconds to wait) once taken, else (False,
        seconds after which to ask again)."""
        if self.assured.available(now) >= 0:
            self.assured.take(n, now)
            return True, max(0.0, self.total.take(n, now) - self.ahead)
        level = self.total.available(now)
        if level > 0:
            return True, self.total.take(n, now)
        # wait for spare tokens or for the assured half to refill, whichever comes first (at least 1 ms)
        retry = min(-level / self.total.rate, -self.assured.available(now) / self.assured.rate)
        return False, max(retry, 0.001)


class RateMeter:
    """Bytes per second over about the last `window` seconds (a sliding window of two buckets), without a clock.

    Why: the uploader lets a second peer take a fifth slot only while its upload link has room
    (`UploadSlots._guest`), which the simulator reads off its max-min allocation. The node's upload bucket was
    the first measure tried, and it has tokens for a moment between any two pieces: with it such moments admitted
    guests, and 8 real nodes pulling 500 MB at 10 MB/s took 62 and 65 s where the same code with guests switched
    off took 57 s (bench/swarm_bench.py, under other load). What was sent over the last second is closer to what the
    simulator's allocation stands for.
    """

    def __init__(self, window: float = 1.0, now: float = 0.0) -> None:
        self.window = window
        self._start = now  # when the current bucket began
        self._cur = 0.0
        self._prev = 0.0

    def _roll(self, now: float) -> None:
        age = now - self._start
        if age >= self.window:
            self._prev = self._cur if age < 2 * self.window else 0.0
            self._cur = 0.0
            self._start = now - age % self.window

    def add(self, n: float, now: float) -> None:
        self._roll(now)
        self._cur += n

    def rate(self, now: float) -> float:
        self._roll(now)
        frac = min(1.0, max(0.0, (now - self._start) / self.window))
        return (self._prev * (1.0 - frac) + self._cur) / self.window
