"""The simulator's network: flows sharing capacities, in virtual time.

Rules:
- No clock and no I/O: the engine passes `now` and pops the completion events this module pushes on its heap.
- An allocation is always feasible (no resource ever carries more than its capacity), so the simulator can be
  pessimistic but never faster than physics: a simulated rollout can never beat the Kumar-Ross bound.

Theory of operation (and the approximation it makes):
- A resource is a capacity in bytes/s: each node's upload and download, the upstream's egress, the link between
  two zones. A flow crosses a few resources (a peer piece: the uploader's upload, then the downloader's
  download, and the zone link if it crosses zones) and carries a number of bytes.
- Rates are max-min fair (TCP-like, "progressive filling"), but recomputed *locally*: when flows start or end at
  some resources, those resources are marked dirty, and once every event of the current instant has run, the
  flows touching a dirty resource are re-shared by progressive filling, with every other flow's rate frozen (its
  share is subtracted from the capacities it crosses). Capacity a re-share frees at a far resource is used there
  at that resource's next event, not at once; in a busy swarm every node has events every few hundred
  milliseconds, so the lag is small, and it only ever errs on the slow side.
- Two classes at a download link, as in the node: a flow made with `priority=True` (a node's upstream stream) and
  the peer flows into that node are each assured half of the node's download, and either class takes what the
  other leaves (`swarm/ratelimit.py: DownloadShare`, which the node's `--download-limit` uses). The stream must
  not shrink with the number of peers the claim holder reads from (the cluster's upstream link is its scarcest
  resource, and every node waits for that one stream), nor starve the peer flows, which hold their uploaders'
  slots while they wait: strict priority did, and a faster registry made a rollout slower (2 nodes, 80 + 50 MB,
  10 MB/s up, 25 MB/s down: 8.0 s with a 25 MB/s registry, 10.0 s with 50 MB/s; now 8.0 s with both). A
  re-share that involves a stream takes in every flow at each resource the stream crosses.
- Each flow keeps the bytes left and the time they were counted; a rate change counts the bytes sent so far and
  pushes a new completion event (older ones are recognised as stale by a version number). Re-sharing that
  leaves a rate unchanged (within 1e-9) pushes nothing, which is what keeps the event count near one per piece.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

__all__ = ["Flow", "Net"]

FLOW_DONE = 0  # event kind on the engine's heap: (time, seq, FLOW_DONE, flow, version)


class Flow:
    __slots__ = ("res", "rate", "left", "t", "ver", "size", "info", "mark", "active", "serial", "prio")

    def __init__(self, res: tuple[int, ...], size: float, info: Any, priority: bool = False) -> None:
        self.serial = 0  # set by Net.start, before the flow enters any set
        self.prio = priority
        self.res = res
        self.size = size
        self.left = float(size)
        self.rate = 0.0
        self.t = 0.0
        self.ver = 0
        self.info = info
        self.mark = 0
        self.active = True

    def __hash__(self) -> int:
        # sets of flows must iterate in the same order on every run (id() would not): hash by start order
        return self.serial


class Net:
    def __init__(self, heap: list, counter) -> None:
        self.cap: list[float] = []
        self.used: list[float] = []  # sum of the rates of the flows at each resource (kept incrementally)
        self.at: list[set[Flow]] = []
        self.dirty: set[int] = set()
        self.heap = heap
        self.counter = counter  # itertools.count shared with the engine (event order = creation order)
        self._epoch = 0
        self._serials = itertools.count()
        self.bytes_by_res: list[float] = []  # bytes carried so far, per resource

    def resource(self, capacity: float) -> int:
        self.cap.append(float(capacity))
        self.used.append(0.0)
        self.at.append(set())
        self.bytes_by_res.append(0.0)
        return len(self.cap) - 1

    def start(self, flow: Flow, now: float) -> None:
        flow.serial = next(self._serials)
        flow.t = now
        for r in flow.res:
            self.at[r].add(flow)
        self.dirty.update(flow.res)
        if flow.left <= 0:
            flow.ver += 1
            heapq.heappush(self.heap, (now, next(self.counter), FLOW_DONE, flow, flow.ver))

    def _advance(self, f: Flow, now: float) -> None:
        if f.rate > 0 and now > f.t:
            sent = f.rate * (now - f.t)
            if sent > f.left:
                sent = f.left
            f.left -= sent
            for r in f.res:
                self.bytes_by_res[r] += sent
        f.t = now

    def stop(self, flow: Flow, now: float) -> float:
        """End a flow (completed or aborted); returns the bytes it had carried."""
        if not flow.active:
            return flow.size - flow.left
        self._advance(flow, now)
        self._detach(flow)
        return flow.size - flow.left

    def finish(self, flow: Flow, now: float) -> None:
        """The flow's completion event fired: count its last bytes exactly and remove it."""
        if flow.rate > 0:
            for r in flow.res:
                self.bytes_by_res[r] += flow.left
        flow.left = 0.0
        flow.t = now
        self._detach(flow)

    def _detach(self, flow: Flow) -> None:
        """Take an ended flow off its resources; they are re-shared at the next rebalance."""
        flow.active = False
        flow.ver += 1
        used = self.used
        for r in flow.res:
            self.at[r].discard(flow)
            used[r] -= flow.rate
        flow.rate = 0.0
        self.dirty.update(flow.res)

    def rebalance(self, now: float) -> None:
        """Re-share the flows touching dirty resources (progressive filling), others frozen; with upstream
        streams among them, class by class (`_fill_classes`)."""
        dirty = self.dirty
        if not dirty:
            return
        self.dirty = set()
        self._epoch += 1
        ep = self._epoch
        at = self.at
        flows: list[Flow] = []
        prio = False
        for r in dirty:
            for f in at[r]:
                if f.mark != ep:
                    f.mark = ep
                    flows.append(f)
                    prio = prio or f.prio
        if not flows:
            return
        if prio:
            # what a priority flow may take depends on the ordinary flows at each of its resources, which must
            # give way: take them all in (one hop; priority flows are few, one per downloading claim holder)
            for f in [f for f in flows if f.prio]:
                for r in f.res:
                    for g in at[r]:
                        if g.mark != ep:
                            g.mark = ep
                            flows.append(g)
        avail: dict[int, float] = {}
        cap = self.cap
        used = self.used
        for f in flows:
            rate = f.rate
            for r in f.res:
                a = avail.get(r)
                avail[r] = (cap[r] - used[r] if a is None else a) + rate
        for r, a in avail.items():
            if a < 0:
                avail[r] = 0.0
        new: dict[Flow, float] = {}
        if prio:
            self._fill_classes(flows, avail, new)
        else:
            self._fill(flows, avail, new)
        push = heapq.heappush
        ev = self.heap
        counter = self.counter
        for f, rate in new.items():
            old = f.rate
            if old > 0 and abs(rate - old) <= 1e-9 * old:
                continue
            self._advance(f, now)
            for r in f.res:
                used[r] += rate - old
            f.rate = rate
            f.ver += 1
            if rate > 0:
                push(ev, (now + f.left / rate, next(counter), FLOW_DONE, f, f.ver))

    def _fill_classes(self, flows: list[Flow], avail: dict[int, float], new: dict[Flow, float]) -> None:
        """Two classes at a download link that carries an upstream stream, each assured half of it, and the
        half one class leaves to the other: upstream streams first, up to half of their download link; then the
        peer flows; then the streams again, for what the peer flows left (the node's `_throttle_upstream`)."""
        ups = [f for f in flows if f.prio]
        cap = self.cap
        first = dict(avail)
        for f in ups:
            r = f.res[-1]  # the node's download (an upstream stream is (upstream, download))
            first[r] = min(avail[r], 0.5 * cap[r])
        self._fill(ups, first, new)
        for f in ups:
            for r in f.res:
                a = avail[r] - new[f]
                avail[r] = a if a > 0 else 0.0
        self._fill([f for f in flows if not f.prio], avail, new)
        more: dict[Flow, float] = {}
        self._fill(ups, avail, more)
        for f, rate in more.items():
            new[f] += rate

    @staticmethod
    def _fill(flows: list[Flow], avail: dict[int, float], new: dict[Flow, float]) -> None:
        """Progressive filling of `flows` within `avail`, which it uses up: the resource with the smallest fair
        share fixes its flows at that share, which leaves the others more. `new` gets each flow's rate."""
        count: dict[int, int] = {}
        members: dict[int, list[Flow]] = {}
        for f in flows:
            for r in f.res:
                lst = members.get(r)
                if lst is None:
                    members[r] = [f]
                    count[r] = 1
                else:
                    lst.append(f)
                    count[r] += 1
        heap = [(avail[r] / c, r) for r, c in count.items()]
        heapq.heapify(heap)
        while heap:
            share, r = heapq.heappop(heap)
            c = count[r]
            if c == 0:
                continue
            cur = avail[r] / c
            if cur != share:
                heapq.heappush(heap, (cur, r))
                continue
            for f in members[r]:
                if f in new:
                    continue
                new[f] = share
                for r2 in f.res:
                    a = avail[r2] - share
                    avail[r2] = a if a > 0 else 0.0
                    if r2 != r:
                        c2 = count[r2] - 1
                        count[r2] = c2
                        if c2:
                            heapq.heappush(heap, (avail[r2] / c2, r2))
            count[r] = 0

    def resync(self) -> None:
        """Recompute `used` from scratch (float drift); cheap enough to call every few thousand events."""
        for r, flows in enumerate(self.at):
            self.used[r] = sum(f.rate for f in flows)

    def utilisation(self, r: int) -> float:
        return sum(f.rate for f in self.at[r]) / self.cap[r]
