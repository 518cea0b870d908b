"""The discrete-event simulator: a cluster of nodes in virtual time, running the node's own swarm logic.

Rules:
- Every decision a node makes (which piece to ask whom, when to go upstream, timeouts, the claim, bans) comes
  from the real `DownloadScheduler`/`PiecePicker`, `UploadSlots` and `Tracker` objects of `p2pcache.swarm`, fed
  with events in virtual time. This module only plays the part of the trio drivers and the network; it must
  never decide anything the node would decide differently.
- Deterministic: one seeded `random.Random` per node and one for the tracker, all derived from the scenario's
  seed; events at the same instant run in the order they were created.
- No wall clock except for the progress bar.

Theory of operation.
Events sit on one heap as tuples (time, seq, kind, ...). The network (`net.py`) pushes flow completions on the
same heap; once every event of an instant has run, it re-shares bandwidth among the flows whose resources
changed. A node's life:
- ARRIVE: the node starts pulling its image(s), `concurrent_layers` layers at a time. Per layer it creates a
  scheduler, asks the tracker (one latency away) to record it and for `peers` holders, and asks for the claim
  (after `claim_wait` while the node holds or asks for other layers' claims, as the node's driver does).
- The tracker's answers come back a latency later: holders become connections (both ways, each side's
  scheduler gets `peer_added` with the other's bitfield), the claim answer goes to `claim_granted/denied`.
- Request(peer, i) travels a latency to the uploader, whose `UploadSlots` starts the upload (a flow from its
  upload to the requester's download), queues it, or refuses it (a "busy" answer travels back:
  `piece_refused`). A finished upload frees the slot; the piece lands a latency later (`piece_received`), and
  the receiver's HAVE reaches its connections a latency after that (one event for all of them; peers that
  already hold the piece are skipped, as the node skips them: they do not need it).
- FetchUpstream(i) is one HTTP request (through the upstream's request-rate token bucket if it has one); after a
  round trip the pieces stream back to back as flows from the upstream resource, each reported with
  `upstream_progress`, until the scheduler stops the stream.
- Churn: a killed node's flows stop, its connections reset (its peers get `peer_gone` a latency later) and it
  stops renewing its tracker entries and claim, which then expire on their own. A restarted node resumes with
  the pieces it had (its partial files survive a restart).
- Metainfo is not simulated separately: a peer can only hold a piece the claim holder fetched and published, so
  the hash of every piece a peer can offer is known, and gating on hashes never binds.
- The baseline (p2p disabled): each node pulls each layer from upstream through its own cache, one HTTP request
  and one flow per layer.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from p2pcache.sim.net import FLOW_DONE, Flow, Net
from p2pcache.sim.scenario import Scenario
from p2pcache.swarm.metainfo import piece_count, piece_size_for, piece_span
from p2pcache.swarm.ratelimit import TokenBucket
from p2pcache.swarm.scheduler import (
    SPARE_SHARE,
    AskClaim,
    Ban,
    Cancel,
    Done,
    DownloadScheduler,
    Fail,
    FetchUpstream,
    Request,
    StopUpstream,
    UploadSlots,
    claim_wait,
    source_shares,
)
from p2pcache.swarm.tracker import ClaimGranted, Tracker

__all__ = ["Result", "simulate"]

INF = 1e300
# event kinds (FLOW_DONE = 0 comes from net.py)
ARRIVE, TRACKER_Q, TRACKER_A, CLAIM_Q, CLAIM_A, REQ, CANCEL, DELIVER, HAVES, TICK, UP_START, KILL, RESTART, \
    GONE, REFUSED, LAYER_START, CLAIM_WAIT = range(1, 18)
PEER, UPS, BASE = 0, 1, 2  # flow kinds


class SimLayer:
    __slots__ = ("id", "name", "size", "piece_size", "n")

    def __init__(self, lid: int, name: str, size: int, piece_size: int) -> None:
        self.id, self.name, self.size, self.piece_size = lid, name, size, piece_size
        self.n = piece_count(size, piece_size)


class SimNode:
    __slots__ = (
        "id", "zone", "zi", "up", "down", "alive", "arrival", "done_at", "todo", "active", "completed", "dl",
        "have", "conns", "slots", "rng", "uploaded", "tick_at", "up_flow", "up_gen", "serving", "layers",
        "killed", "claim_waiting",
    )

    def __init__(
        self, nid: int, zone: str, zi: int, up: int, down: int, rng: random.Random, slots: int, queue: int,
    ) -> None:
        self.id, self.zone, self.zi, self.up, self.down, self.rng = nid, zone, zi, up, down, rng
        self.alive = False
        self.arrival = math.nan
        self.done_at = math.nan
        self.todo: list[int] = []  # layer ids still to start
        self.active: set[int] = set()
        self.completed: set[int] = set()
        self.dl: dict[int, DownloadScheduler] = {}
        self.have: dict[int, int] = {}
        self.conns: dict[int, set[int]] = {}
        self.slots = UploadSlots(slots=slots, per_peer=8, queue=queue)
        self.uploaded = 0.0
        self.tick_at: dict[int, float] = {}
        self.up_flow: dict[int, Flow] = {}
        self.up_gen: dict[int, int] = {}
        self.serving: dict[tuple[int, int, int], Flow] = {}
        self.layers: list[int] = []
        self.killed = False
        self.claim_waiting: set[int] = set()  # layers waiting (claim_wait) before their first claim request


@dataclass
class Result:
    pull_seconds: list[float]  # per node that finished, from its arrival to its last layer
    unfinished: int
    upstream_bytes: float
    peer_bytes: float
    upstream_requests: int
    node_upload: list[float]
    completions: list[float]  # finish times (absolute), sorted
    piece_log_t: list[float]  # time of each delivered piece (p2p runs: a baseline moves whole layers) ...
    piece_log_bytes: list[float]
    piece_log_upstream: list[bool]
    end_time: float  # the last node's finish
    events: int
    wall_seconds: float
    image_bytes: int  # unique bytes of all layers
    per_node_bytes: list[int]  # bytes each node pulls
    piece_sizes: dict[str, int] = field(default_factory=dict)
    bans: int = 0
    failures: int = 0


class Simulation:
    def __init__(self, sc: Scenario, p2p: bool | None = None, progress: bool = False, label: str = "") -> None:
        self.sc = sc
        self.p2p = sc.p2p if p2p is None else p2p
        self.progress = progress
        self.label = label
        self.heap: list = []
        self.counter = itertools.count()
        self.net = Net(self.heap, self.counter)
        master = random.Random(sc.seed)
        self.tracker = Tracker(rng=random.Random(master.getrandbits(64)), announce_ttl=30.0, claim_ttl=sc.claim_ttl)
        self.upstream_res = self.net.resource(sc.upstream_bandwidth)
        self.bucket = (
            TokenBucket(sc.upstream_rps, sc.upstream_burst or max(1.0, sc.upstream_rps))
            if sc.upstream_rps else None
        )
        self.layers: list[SimLayer] = []
        by_name: dict[str, int] = {}
        for layer in sc.unique_layers():
            ps = piece_size_for(layer.size, sc.piece_size)
            by_name[layer.name] = len(self.layers)
            self.layers.append(SimLayer(len(self.layers), layer.name, layer.size, ps))
        self.image_layers = [[by_name[la.name] for la in img.layers] for img in sc.images]
        self.nodes: list[SimNode] = []
        nz = len(sc.zones)
        for i, (up, down) in enumerate(sc.node_caps()):
            zi = sc.zone_of(i)
            n = SimNode(i, sc.zones[zi], zi, self.net.resource(up), self.net.resource(down),
                        random.Random(master.getrandbits(64)), sc.upload_slots, sc.upload_queue)
            if sc.image_choice == "one":
                imgs = [self.image_layers[sc.image_of(i)]]
            else:
                imgs = self.image_layers
            seen: dict[int, None] = {}
            for il in imgs:
                for lid in il:
                    seen[lid] = None
            n.layers = list(seen)
            self.nodes.append(n)
        self.zone_link: dict[tuple[int, int], int] = {}
        if sc.inter_zone_bandwidth and nz > 1:
            for a in range(nz):
                for b in range(a + 1, nz):
                    self.zone_link[(a, b)] = self.net.resource(sc.inter_zone_bandwidth)
        self.lat = sc.latency
        self.xlat = sc.inter_zone_latency if sc.inter_zone_latency is not None else sc.latency
        self.ulat = sc.upstream_latency
        self.cfg = sc.sched
        # figures
        self.upstream_bytes = 0.0
        self.peer_bytes = 0.0
        self.upstream_requests = 0
        self.piece_t: list[float] = []
        self.piece_b: list[float] = []
        self.piece_up: list[bool] = []
        self.bans = 0
        self.failures = 0
        self.first_claim: dict[int, int] = {}
        # churn.kill_claim_holder: the first claimant of the first image's first layer (killed when its claim is
        # granted if that comes after the kill time; it was silently nobody then, or once the claim was released)
        self._claim_victim_layer = self.nodes[0].layers[0] if self.nodes and self.nodes[0].layers else 0
        self._kill_first_claimant = False
        self._arrivals(master)

    # --- setup ---------------------------------------------------------------------------------------------
    def push(self, t: float, *ev: Any) -> None:
        heapq.heappush(self.heap, (t, next(self.counter), *ev))

    def _arrivals(self, rng: random.Random) -> None:
        sc = self.sc
        n = len(self.nodes)
        order = list(range(n))
        times: list[float] = []
        if sc.start == "all":
            times = [rng.uniform(0, sc.jitter) if sc.jitter else 0.0 for _ in order]
        elif sc.start == "waves":
            # `waves` groups whose sizes differ by one at most (with ceil(n / waves) per wave, 7 nodes in 5 waves
            # made 4, the last one 90 s in instead of 120 s: found in review)
            times = [(i * sc.waves // n) * sc.interval + (rng.uniform(0, sc.jitter) if sc.jitter else 0.0)
                     for i in order]
        else:
            t = 0.0
            for _ in order:
                times.append(t)
                t += rng.expovariate(sc.rate)
        for i, t in zip(order, times, strict=True):
            self.push(t, ARRIVE, i)
        if sc.kill > 0:
            k = round(sc.kill * n)
            lo, hi = sc.kill_between
            for i in rng.sample(order, k):
                # counted from the node's own arrival: drawn from t = 0, a kill before a later wave or a
                # Poisson arrival was lost (20 nodes, kill = 0.5: 10 killed at once, 4 in waves, 2 Poisson)
                self.push(times[i] + rng.uniform(lo, hi), KILL, i)
        if sc.kill_claim_holder is not None:
            self.push(sc.kill_claim_holder, KILL, -1)

    # --- helpers -------------------------------------------------------------------------------------------
    def latency(self, a: SimNode, b: SimNode) -> float:
        return self.lat if a.zi == b.zi else self.xlat

    def apply(self, node: SimNode, lid: int, decisions: list, now: float) -> None:
        nodes = self.nodes
        for d in decisions:
            cls = type(d)
            if cls is Request:
                peer = nodes[d.peer]
                self.push(now + self.latency(node, peer), REQ, d.peer, node.id, lid, d.index)
            elif cls is Cancel:
                peer = nodes[d.peer]
                self.push(now + self.latency(node, peer), CANCEL, d.peer, node.id, lid, d.index)
            elif cls is FetchUpstream:
                self._stop_upstream(node, lid, now)
                gen = node.up_gen.get(lid, 0) + 1
                node.up_gen[lid] = gen
                delay = self.bucket.take(1, now) if self.bucket else 0.0
                self.upstream_requests += 1
                self.push(now + delay + 2 * self.ulat, UP_START, node.id, lid, d.start_piece, gen)
            elif cls is StopUpstream:
                self._stop_upstream(node, lid, now)
            elif cls is AskClaim:
                self._ask_claim(node, lid, now)
            elif cls is Done:
                self._layer_done(node, lid, now)
                return
            elif cls is Ban:
                self.bans += 1
            elif cls is Fail:
                self.failures += 1
                node.dl.pop(lid, None)
                self._share_sources(node, now)
                return
        # Even without decisions: an event can move the scheduler's next deadline earlier with nothing to send
        # (the last piece in flight arrived while the one peer that has more said "busy": its back-off is the
        # wake-up). Only after decisions, a node waited for its next timeout instead, 3.6 s doing nothing in a
        # 2-node rollout that takes 1.7 s otherwise (simulations/monotonicity.py found it).
        self._schedule_tick(node, lid, now)

    def _ask_claim(self, node: SimNode, lid: int, now: float) -> None:
        # Claim requests sent at one instant reach the tracker in a random order, as real ones do (a nanosecond
        # apart: nothing else changes). Run in creation order, node 0 won every claim of a rollout that starts
        # at one instant and uploaded several layers' first copies alone.
        self.push(now + self.lat + node.rng.random() * 1e-9, CLAIM_Q, node.id, lid)

    def _claims_elsewhere(self, node: SimNode, lid: int) -> int:
        """The node's other downloads that hold or are asking for a claim (as the node counts them)."""
        return sum(1 for other, s in node.dl.items()
                   if other != lid and other not in node.claim_waiting and s.claim in ("asked", "held"))

    def _first_claim(self, node: SimNode, lid: int, waited: float, now: float) -> None:
        """The node's driver waits (claim_wait) before a download's first claim request, as swarm/service.py
        does in _learn_layout; then asks."""
        w = claim_wait(self._claims_elsewhere(node, lid), waited, self.cfg)
        if w > 0:
            node.claim_waiting.add(lid)
            self.push(now + w, CLAIM_WAIT, node.id, lid, waited + w)
        else:
            node.claim_waiting.discard(lid)
            self._ask_claim(node, lid, now)

    def _schedule_tick(self, node: SimNode, lid: int, now: float) -> None:
        s = node.dl.get(lid)
        if s is None:
            return
        nd = s.next_deadline()
        if nd is None:
            return
        cur = node.tick_at.get(lid)
        if cur is None or nd < cur:
            node.tick_at[lid] = nd
            self.push(nd if nd > now else now, TICK, node.id, lid, nd)

    def _stop_upstream(self, node: SimNode, lid: int, now: float) -> None:
        node.up_gen[lid] = node.up_gen.get(lid, 0) + 1  # invalidates a pending UP_START
        node.slots.stream_ended(lid)
        f = node.up_flow.pop(lid, None)
        if f is not None:
            self.upstream_bytes += self.net.stop(f, now)

    def _start_layer(self, node: SimNode, lid: int, now: float) -> None:
        layer = self.layers[lid]
        node.active.add(lid)
        have = node.have.get(lid, 0)
        node.have[lid] = have
        if not self.p2p:
            delay = self.bucket.take(1, now) if self.bucket else 0.0
            self.upstream_requests += 1
            self.push(now + delay + 2 * self.ulat, UP_START, node.id, lid, 0, 0)
            return
        s = DownloadScheduler(layer.size, layer.piece_size, rng=node.rng, zone=node.zone, have=have,
                              config=self.cfg, now=now)
        node.dl[lid] = s
        node.conns.setdefault(lid, set())
        self.push(now + self.lat, TRACKER_Q, node.id, lid)
        dec = s.start(now)
        if any(type(d) is AskClaim for d in dec):
            dec = [d for d in dec if type(d) is not AskClaim]
            self._first_claim(node, lid, 0.0, now)
        self.apply(node, lid, dec, now)
        self._share_sources(node, now)

    def _share_sources(self, node: SimNode, now: float) -> None:
        """The node's downloads changed: split its sources among them again, as the node does (source_shares)."""
        dls = list(node.dl.items())
        for (lid, s), n in zip(dls, source_shares(self.cfg.max_sources, len(dls)), strict=True):
            if s.max_sources != n and node.dl.get(lid) is s:
                self.apply(node, lid, s.set_max_sources(n, now), now)

    def _layer_done(self, node: SimNode, lid: int, now: float) -> None:
        node.dl.pop(lid, None)
        node.slots.stream_ended(lid)
        node.tick_at.pop(lid, None)
        node.active.discard(lid)
        node.completed.add(lid)
        if self.p2p:
            self.tracker.announce(now, lid, node.id, zone=node.zone, complete=True, ttl=INF)
            self.tracker.release(lid, node.id)
        self._next_layers(node, now)
        self._share_sources(node, now)

    def _next_layers(self, node: SimNode, now: float) -> None:
        while node.todo and len(node.active) < self.sc.concurrent_layers:
            lid = node.todo.pop(0)
            if lid in node.completed:
                continue
            if self.sc.layer_jitter:
                # Real nodes reach each layer's first request a few ms apart (processes, threads, a client
                # asking blob after blob), so which node's claim request reaches a tracker first is random.
                node.active.add(lid)
                self.push(now + node.rng.uniform(0, self.sc.layer_jitter), LAYER_START, node.id, lid)
                continue
            self._start_layer(node, lid, now)
        if not node.todo and not node.active and math.isnan(node.done_at):
            node.done_at = now

    def _connect(self, a: SimNode, b: SimNode, lid: int, now: float) -> None:
        if a is b or not a.alive or not b.alive:
            return
        ca = a.conns.setdefault(lid, set())
        if b.id in ca:
            return
        ca.add(b.id)
        b.conns.setdefault(lid, set()).add(a.id)
        s = a.dl.get(lid)
        if s is not None:
            self.apply(a, lid, s.peer_added(b.id, b.zone, b.have.get(lid, 0), now), now)
        s = b.dl.get(lid)
        if s is not None:
            self.apply(b, lid, s.peer_added(a.id, a.zone, a.have.get(lid, 0), now), now)

    def _flow_res(self, u: SimNode, d: SimNode) -> tuple[int, ...]:
        if u.zi != d.zi and self.zone_link:
            key = (u.zi, d.zi) if u.zi < d.zi else (d.zi, u.zi)
            return (u.up, d.down, self.zone_link[key])
        return (u.up, d.down)

    def _serve(self, u: SimNode, serves: list, now: float) -> None:
        nodes = self.nodes
        for sv in serves:
            d = nodes[sv.peer]
            lid, idx = sv.key, sv.index
            if not d.alive:
                self._serve(u, u.slots.finished(sv.peer, lid, idx), now)
                continue
            layer = self.layers[lid]
            size = piece_span(idx, layer.size, layer.piece_size)[1]
            f = Flow(self._flow_res(u, d), size, (PEER, u.id, d.id, lid, idx))
            u.serving[(d.id, lid, idx)] = f
            self.net.start(f, now)

    def _delivered(self, node: SimNode, lid: int, idx: int, nbytes: float, now: float, upstream: bool) -> bool:
        bit = 1 << idx
        have = node.have.get(lid, 0)
        if have & bit:
            return False
        node.have[lid] = have | bit
        self.piece_t.append(now)
        self.piece_b.append(nbytes)
        self.piece_up.append(upstream)
        self.push(now + self.lat, HAVES, node.id, lid, idx)
        return True

    def _kill(self, node: SimNode, now: float) -> None:
        if not node.alive:
            return
        node.alive = False
        node.killed = True
        nodes = self.nodes
        net = self.net
        for f in list(node.serving.values()):
            self.peer_bytes += net.stop(f, now)
        node.serving.clear()
        for lid in list(node.up_flow):
            self._stop_upstream(node, lid, now)
        for f in list(net.at[node.down]):
            kind, uid, _, lid, idx = f.info
            if kind == PEER:
                u = nodes[uid]
                self.peer_bytes += net.stop(f, now)
                u.serving.pop((node.id, lid, idx), None)
                self._serve(u, u.slots.finished(node.id, lid, idx), now)
        for lid, peers in node.conns.items():
            for pid in peers:
                p = nodes[pid]
                p.conns.get(lid, set()).discard(node.id)
                self._serve(p, p.slots.peer_gone(node.id), now)
                self.push(now + self.latency(node, p), GONE, pid, lid, node.id)
            # it stops renewing: its entries expire like any soft state
            self.tracker.announce(now, lid, node.id, zone=node.zone, pieces=node.have.get(lid, 0).bit_count(),
                                  complete=lid in node.completed, ttl=self.tracker.announce_ttl)
        node.conns.clear()
        node.slots = UploadSlots(slots=self.sc.upload_slots, per_peer=8, queue=self.sc.upload_queue)
        node.dl.clear()
        node.tick_at.clear()
        node.claim_waiting.clear()
        node.todo = [lid for lid in node.layers if lid not in node.completed]
        node.active.clear()
        if self.sc.restart_after is not None:
            self.push(now + self.sc.restart_after, RESTART, node.id)

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self) -> Result:
        heap = self.heap
        net = self.net
        nodes = self.nodes
        layers = self.layers
        tracker = self.tracker
        pop = heapq.heappop
        now = 0.0
        events = 0
        wall0 = time.monotonic()
        last_print = wall0
        n_nodes = len(nodes)
        done_count = 0
        max_time = self.sc.max_time
        show = self.progress
        while True:
            if net.dirty and (not heap or heap[0][0] > now):
                net.rebalance(now)
                continue
            if not heap:
                break
            ev = pop(heap)
            t = ev[0]
            if t > max_time:
                break
            now = t
            kind = ev[2]
            events += 1
            if show and events & 0xFFFF == 0:
                w = time.monotonic()
                if w - last_print > 0.5:
                    last_print = w
                    done_count = sum(1 for n in nodes if not math.isnan(n.done_at))
                    _progress(self.label, done_count, n_nodes, now, w - wall0)
            if kind == FLOW_DONE:
                f = ev[3]
                if ev[4] != f.ver or not f.active:
                    continue
                net.finish(f, now)
                info = f.info
                fk = info[0]
                if fk == PEER:
                    _, uid, did, lid, idx = info
                    u = nodes[uid]
                    u.serving.pop((did, lid, idx), None)
                    u.uploaded += f.size
                    self.peer_bytes += f.size
                    self._serve(u, u.slots.finished(did, lid, idx), now)
                    d = nodes[did]
                    self.push(now + self.latency(u, d), DELIVER, did, uid, lid, idx, f.size)
                elif fk == UPS:
                    _, nid, lid, idx = info
                    node = nodes[nid]
                    self.upstream_bytes += f.size
                    if node.up_flow.get(lid) is f:
                        del node.up_flow[lid]
                    s = node.dl.get(lid)
                    if not node.alive or s is None:
                        continue
                    if self._delivered(node, lid, idx, f.size, now, True):
                        node.slots.fresh(lid, idx)  # as the node does: first copies first (UploadSlots)
                    gen = node.up_gen.get(lid, 0)
                    self.apply(node, lid, s.upstream_progress(idx, f.size, now), now)
                    if s.upstream == idx + 1 and node.up_gen.get(lid, 0) == gen and node.dl.get(lid) is s:
                        self._start_up_flow(node, lid, idx + 1, now)
                else:  # baseline: a whole layer from upstream
                    _, nid, lid = info
                    node = nodes[nid]
                    self.upstream_bytes += f.size
                    node.up_flow.pop(lid, None)
                    self._layer_done(node, lid, now)
            elif kind == DELIVER:
                _, _, _, did, uid, lid, idx, nbytes = ev
                d = nodes[did]
                s = d.dl.get(lid)
                if not d.alive or s is None:
                    continue
                self._delivered(d, lid, idx, nbytes, now, False)
                self.apply(d, lid, s.piece_received(uid, idx, True, nbytes, now), now)
            elif kind == HAVES:
                _, _, _, nid, lid, idx = ev
                node = nodes[nid]
                if not node.alive:
                    continue
                bit = 1 << idx
                for pid in node.conns.get(lid, ()):
                    p = nodes[pid]
                    s = p.dl.get(lid)
                    # HAVE suppression (as the node does): a peer that holds the piece needs no HAVE for it
                    if s is not None and not p.have[lid] & bit:
                        dec = s.peer_has(nid, idx, now)
                        if dec:
                            self.apply(p, lid, dec, now)
            elif kind == REQ:
                _, _, _, uid, did, lid, idx = ev
                u = nodes[uid]
                if not u.alive:
                    continue
                if not u.have.get(lid, 0) >> idx & 1:
                    continue  # cannot happen with honest peers; the requester times out
                # upload capacity the running uploads leave unused (the node: what it sent over the last second)
                serves = u.slots.request(did, lid, idx, spare=net.used[u.up] < SPARE_SHARE * net.cap[u.up])
                if serves is None:
                    self.push(now + self.latency(u, nodes[did]), REFUSED, did, uid, lid, idx)
                else:
                    self._serve(u, serves, now)
            elif kind == REFUSED:
                _, _, _, did, uid, lid, idx = ev
                d = nodes[did]
                s = d.dl.get(lid)
                if d.alive and s is not None:
                    self.apply(d, lid, s.piece_refused(uid, idx, now), now)
            elif kind == CANCEL:
                _, _, _, uid, did, lid, idx = ev
                u = nodes[uid]
                if not u.alive:
                    continue
                f = u.serving.pop((did, lid, idx), None)
                if f is not None:
                    self.peer_bytes += net.stop(f, now)
                self._serve(u, u.slots.cancel(did, lid, idx), now)
            elif kind == TICK:
                _, _, _, nid, lid, at = ev
                node = nodes[nid]
                if node.tick_at.get(lid) != at:
                    continue
                del node.tick_at[lid]
                s = node.dl.get(lid)
                if s is None or not node.alive:
                    continue
                self.apply(node, lid, s.tick(now), now)
            elif kind == TRACKER_Q:
                _, _, _, nid, lid = ev
                node = nodes[nid]
                if not node.alive:
                    continue
                tracker.announce(now, lid, nid, zone=node.zone, pieces=node.have.get(lid, 0).bit_count(),
                                 ttl=INF)
                hs = tracker.holders(lid, now, limit=self.sc.peers, prefer_zone=node.zone, exclude=nid)
                self.push(now + self.lat, TRACKER_A, nid, lid, [h.node for h in hs])
            elif kind == TRACKER_A:
                _, _, _, nid, lid, hs = ev
                node = nodes[nid]
                if not node.alive:
                    continue
                for h in hs:
                    self._connect(node, nodes[h], lid, now)
            elif kind == CLAIM_Q:
                _, _, _, nid, lid = ev
                node = nodes[nid]
                if not node.alive:
                    continue  # a dead node's question never arrives
                ans = tracker.claim(lid, nid, now, ttl=self.sc.claim_ttl)
                if isinstance(ans, ClaimGranted):
                    self.first_claim.setdefault(lid, nid)
                    if self._kill_first_claimant and lid == self._claim_victim_layer:
                        self._kill_first_claimant = False
                        self.push(now, KILL, nid)
                    self.push(now + self.lat, CLAIM_A, nid, lid, True, None)
                else:
                    self.push(now + self.lat, CLAIM_A, nid, lid, False, ans.holder)
            elif kind == CLAIM_WAIT:
                _, _, _, nid, lid, waited = ev
                node = nodes[nid]
                if node.alive and lid in node.dl and lid in node.claim_waiting:
                    self._first_claim(node, lid, waited, now)
            elif kind == CLAIM_A:
                _, _, _, nid, lid, granted, holder = ev
                node = nodes[nid]
                s = node.dl.get(lid)
                if not node.alive or s is None:
                    continue
                dec = s.claim_granted(now) if granted else s.claim_denied(holder, now)
                self.apply(node, lid, dec, now)
            elif kind == UP_START:
                _, _, _, nid, lid, idx, gen = ev
                node = nodes[nid]
                if not node.alive:
                    continue
                if not self.p2p:
                    layer = layers[lid]
                    f = Flow((self.upstream_res, node.down), layer.size, (BASE, nid, lid))
                    node.up_flow[lid] = f
                    net.start(f, now)
                    continue
                s = node.dl.get(lid)
                if s is None or node.up_gen.get(lid, 0) != gen or s.upstream != idx:
                    continue
                self._start_up_flow(node, lid, idx, now)
            elif kind == LAYER_START:
                node, lid = nodes[ev[3]], ev[4]
                if node.alive and lid in node.active and lid not in node.dl and lid not in node.completed:
                    self._start_layer(node, lid, now)
            elif kind == ARRIVE:
                node = nodes[ev[3]]
                node.alive = True
                node.arrival = now
                node.todo = list(node.layers)
                self._next_layers(node, now)
            elif kind == GONE:
                _, _, _, pid, lid, gone = ev
                p = nodes[pid]
                s = p.dl.get(lid)
                if p.alive and s is not None:
                    self.apply(p, lid, s.peer_gone(gone, now), now)
            elif kind == KILL:
                nid = ev[3]
                if nid < 0:  # the node granted the first layer's claim, whether or not it still holds it
                    first = self.first_claim.get(self._claim_victim_layer)
                    if first is None:  # nobody asked yet: it dies when the claim is granted
                        self._kill_first_claimant = True
                        continue
                    nid = first
                self._kill(nodes[nid], now)
            elif kind == RESTART:
                node = nodes[ev[3]]
                node.alive = True
                for lid in node.completed:
                    tracker.announce(now, lid, node.id, zone=node.zone, complete=True, ttl=INF)
                self._next_layers(node, now)
        wall = time.monotonic() - wall0
        if show:
            done_count = sum(1 for n in nodes if not math.isnan(n.done_at))
            _progress(self.label, done_count, n_nodes, now, wall)
            print(file=sys.stderr)
        pulls = [n.done_at - n.arrival for n in nodes if not math.isnan(n.done_at)]
        order = sorted(range(len(self.piece_t)), key=self.piece_t.__getitem__)
        return Result(
            pull_seconds=pulls,
            unfinished=sum(1 for n in nodes if math.isnan(n.done_at)),
            upstream_bytes=self.upstream_bytes,
            peer_bytes=self.peer_bytes,
            upstream_requests=self.upstream_requests,
            node_upload=[n.uploaded for n in nodes],
            completions=sorted(n.done_at for n in nodes if not math.isnan(n.done_at)),
            piece_log_t=[self.piece_t[i] for i in order],
            piece_log_bytes=[self.piece_b[i] for i in order],
            piece_log_upstream=[self.piece_up[i] for i in order],
            end_time=max([n.done_at for n in nodes if not math.isnan(n.done_at)], default=now),
            events=events,
            wall_seconds=wall,
            # the layers some node pulls: with images = "one" and fewer nodes than images, the others were
            # counted, and the bound and upstream/image were wrong (a run "below the bound": found in review)
            image_bytes=sum(layers[lid].size for lid in {lid for n in nodes for lid in n.layers}),
            per_node_bytes=[sum(layers[lid].size for lid in n.layers) for n in nodes],
            piece_sizes={la.name: la.piece_size for la in layers},
            bans=self.bans,
            failures=self.failures,
        )

    def _start_up_flow(self, node: SimNode, lid: int, idx: int, now: float) -> None:
        layer = self.layers[lid]
        size = piece_span(idx, layer.size, layer.piece_size)[1]
        # the upstream class at the node's download: assured half of it, as in the node (see net.py)
        f = Flow((self.upstream_res, node.down), size, (UPS, node.id, lid, idx), priority=True)
        node.up_flow[lid] = f
        self.net.start(f, now)


def _progress(label: str, done: int, total: int, now: float, wall: float) -> None:
    width = 30
    frac = done / total if total else 1.0
    bar = "#" * int(frac * width)
    print(f"\r{label}[{bar:<{width}}] {done}/{total} nodes done  t={now:8.1f}s  wall {wall:6.1f}s",
          end="", file=sys.stderr, flush=True)


def simulate(sc: Scenario, p2p: bool | None = None, progress: bool = False, label: str = "") -> Result:
    """Run one scenario (p2p as the scenario says, unless given) and return its figures."""
    return Simulation(sc, p2p=p2p, progress=progress, label=label).run()
