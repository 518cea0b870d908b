"""The download of one blob through the swarm, as decisions: whom to ask for which piece, when to go upstream.

Rules:
- Sans-IO (h11 style). Events go in as method calls, decisions come out as lists of the small classes below.
  This module never opens a socket, never reads a clock (`now` is passed in, seconds on any monotonic origin) and
  never sleeps; it does not verify bytes either: the driver hashes each piece and reports ok / not ok.
- Everything that decides the course of a download lives here and in `picker.py`. The node drives it from trio
  (`swarm/service.py`) and the simulator from virtual time (`sim/`), so the simulator predicts what nodes do.
- It does not know whether it runs in a node or a simulation, and takes its randomness from the seeded `rng`.

Theory of operation.
A `DownloadScheduler` is created per blob (size, piece size, pieces already held) and started with `start(now)`,
which asks for the upstream claim (`AskClaim`): every node that starts a cold blob asks, the tracker grants the
first and names the holder to the others. Then:

- Peers. `peer_added(peer, zone, bitfield)` and `peer_has(peer, i)` feed the picker's availability; each event
  fills that peer's request pipeline (`Request(peer, i)`, rarest first). At most `max_sources` peers have requests
  outstanding at once, over all the node's downloads (each has its share: `source_shares`); better peers (same
  zone first, then measured throughput, an EWMA of bytes over the time since the request or the previous piece
  from that peer) are filled first when several are eligible.
- Pieces. `piece_received(peer, i, ok, nbytes, now)`: ok means the driver checked the piece's SHA-256 against the
  metainfo. A good piece may make endgame duplicates redundant (`Cancel` to the losers). A bad piece bans the peer
  (`Ban(peer, until)`, recorded in the shared `BanList`), cancels its other requests and drops it.
- Timeouts. Each request has a deadline from the peer's measured rate (or `assumed_rate`), its position in the
  pipeline and `timeout_factor`, at least `timeout_min`. The driver calls `tick(now)` at `next_deadline()` (or
  simply every second). A late request is cancelled and asked of another peer that has the piece; if nobody else
  has it, it is left running (cancelling would only restart the same transfer). A peer that delivered nothing
  for `silence_timeout` while asked is snubbed: its requests are cancelled and it gets none for `snub_seconds`.
  A peer whose connection dies is reported with `peer_gone` and its pieces go back to the pool at once (no
  30-second stalls: the driver notices dead connections, the scheduler reacts in the same call).
- Upstream. With the claim (`claim_granted`), the node is the cluster's one upstream fetcher: `FetchUpstream(i)`
  asks the driver to stream from upstream starting at piece i, reporting each verified piece with
  `upstream_progress(i)` (and publishing its hash, so peers can verify it). The stream continues while the next
  piece is still wanted and no connected peer has it; otherwise `StopUpstream` (and maybe a new `FetchUpstream`
  further on). So a takeover holder (the first holder died) fetches from upstream only what the swarm lacks. The
  holder renews the claim with `AskClaim` every `claim_renew` seconds. Without the claim, the node asks again every
  `claim_retry` seconds while some piece it wants has no source, so a dead holder is replaced once its claim
  expires. Last resort: no piece from anyone for `stall_timeout` while wanting some -> `FetchUpstream` anyway.
- Integrity. `metainfo_known(hashes)` limits requests to pieces whose hash is known (the holder publishes them as
  it goes). `Done` is emitted once every piece is held; the driver then checks the whole-blob digest. A mismatch
  (a lying piece list: every piece matched hashes that describe wrong bytes) is not this object's business: the
  download fails (no client got the last byte), the node bans the piece list's source, and its next download of
  that digest skips the swarm (`fetch.Download.upstream_only`), so this scheduler never runs for it.

Driving it (what swarm/service.py does; the simulator in sim/engine.py does the same in virtual time):
    s = DownloadScheduler(download.size, download.piece_size, rng=random.Random(), zone=settings.zone,
                          have=[i for i in range(n) if download.partial.have(i)], known=<indices with hashes>,
                          bans=node_wide_banlist)
    act(s.start(now))                              # -> AskClaim (the first one after claim_wait(...) says so)
    tracker answers         -> s.claim_granted(now) / s.claim_denied(holder, now)
    connection up + bitfield-> s.peer_added(peer, zone, bitfield, now);  HAVE -> s.peer_has(peer, i, now)
    connection lost         -> s.peer_gone(peer, now)
    piece bytes in          -> hash, write_piece if ok -> s.piece_received(peer, i, ok, len, now)
    "busy" answer           -> s.piece_refused(peer, i, now)
    upstream piece verified -> publish its hash, s.upstream_progress(i, len, now); broken -> s.upstream_failed
    hash list learnt        -> s.metainfo_known(hashes, now, source) or s.piece_known(i, now)
    timer                   -> s.tick(now) at s.next_deadline() (or every second)
    a download of the node starts or ends -> s.set_max_sources(share, now) for each, source_shares(...)
  and act() on each decision: Request/Cancel -> send to the peer; Ban -> close + refuse the peer until `until`;
  AskClaim -> tracker.claim; FetchUpstream(i)/StopUpstream -> start/stop a ranged upstream stream from piece i;
  Done -> verify the digest, announce complete, release the claim; Fail -> abort the clients. On the serving
  side, every incoming request goes through the node's one `UploadSlots`: `Serve` -> send the piece; None ->
  answer "busy"; `finished`/`cancel` when an upload ends.

The uploader side has its own small sans-IO piece here: `UploadSlots` serves at most `slots` piece uploads at
once and answers "busy" beyond that, so a node that many peers ask (the first holder of a cold blob) finishes
pieces quickly and lets them spread, instead of trickling every piece to everybody at once.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from p2pcache.swarm.metainfo import checkable, piece_count, piece_span
from p2pcache.swarm.picker import PiecePicker, mask_of

__all__ = [
    "AskClaim", "Ban", "BanList", "Cancel", "Decision", "Done", "DownloadScheduler", "Fail",
    "FetchUpstream", "Request", "SchedulerConfig", "Serve", "StopUpstream", "UPSTREAM", "UploadSlots", "claim_wait",
    "source_shares",
]

Peer = Hashable


class _Upstream:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UPSTREAM"


UPSTREAM: Peer = _Upstream()  # the pseudo-peer pieces fetched from upstream are recorded under


# --- decisions -------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Request:
    """Ask `peer` for piece `index`."""
    peer: Peer
    index: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """Withdraw the request of `index` from `peer` (it is no longer needed, or too late)."""
    peer: Peer
    index: int


@dataclass(frozen=True, slots=True)
class Ban:
    """Drop `peer` and refuse it until `until` (it sent a piece whose hash failed, or lied in the metainfo)."""
    peer: Peer
    until: float
    reason: str


@dataclass(frozen=True, slots=True)
class AskClaim:
    """Ask the digest's tracker for the upstream claim (or renew it); answer with claim_granted/claim_denied."""


@dataclass(frozen=True, slots=True)
class FetchUpstream:
    """Stream from upstream starting at piece `start_piece`; report each piece with upstream_progress."""
    start_piece: int
    reason: str  # "claim" (we hold it), "stall" (nobody delivered), "digest" (refetch after a bad blob)


@dataclass(frozen=True, slots=True)
class StopUpstream:
    """Stop the upstream stream after the piece being fetched (the rest comes from peers or is held)."""


@dataclass(frozen=True, slots=True)
class Done:
    """Every piece is held: check the whole-blob digest, announce complete, release the claim if held."""


@dataclass(frozen=True, slots=True)
class Fail:
    """The download cannot complete: abort the clients' responses."""
    reason: str


Decision = Request | Cancel | Ban | AskClaim | FetchUpstream | StopUpstream | Done | Fail


@dataclass
class SchedulerConfig:
    pipeline: int = 1  # requests outstanding per peer: uploaders refuse what they cannot start (no queues), and
    # more requests per peer only piled up behind busy peers in the simulator (1.28x vs 1.41x the bound)
    max_sources: int = 4  # peers a node downloads from at once, over all its downloads (`source_shares`); as
    # many as a peer has upload slots, so that no downloader holds more slots than its fair share (8 made the
    # slowest node 5-10% slower in the simulator)
    # With few peers one request per peer leaves the link idle for a round trip between pieces (one holder served
    # 1 MiB pieces at 0.1 GB/s on loopback): a download with at most `few_peers` peers keeps `deep_pipeline`
    # requests in flight to each (at most an uploader's 4 slots, beyond which it answers "busy"). With more peers
    # `pipeline` stands. (This lived in the node's driver, so the simulator did not have it.)
    few_peers: int = 2
    deep_pipeline: int = 4
    endgame_dups: int = 2  # at the tail a piece may be asked of two peers; the loser is cancelled
    timeout_min: float = 10.0  # no request is given up before this (a transfer shares its uploader's link)
    timeout_factor: float = 4.0  # ... nor before 4x the time the peer's measured rate says it needs
    assumed_rate: float = 4e6  # bytes/s assumed of a peer not measured yet (a congested 1 Gbit/s uploader)
    # A peer that refused a request (all its upload slots busy) is not asked again for `busy_backoff_pieces`
    # piece transfer times at the rate we see from peers, within these bounds; before any rate is measured,
    # busy_backoff (see piece_refused). Two piece times at first; one since 2026-11-29: an uploader's four slots
    # turn over about every quarter of a piece time, and in a saturated swarm the claim holder (the one source
    # of each new piece) had 12-18 of its ~23 peers backing off from it at once while a slot sat free, sending
    # first copies 92 % of the time, so every node fell a little further behind the stream (simulator, 1 Gbit/s
    # everywhere, 1 GiB: 300 nodes 1.213x -> 1.185x the bound over 6 seeds, 1,000 nodes 1.25x -> 1.21x; two-zones
    # over 12 seeds mean 1.73x -> 1.71x; ~12 % more messages). Half a piece time gained 0.003x more for 11 % more
    # messages again. (A 0.1 s cap, tried before the first-copies rule, took two-zones 1.54x -> 2.16x at seed 7.)
    busy_backoff: float = 0.02
    busy_backoff_pieces: float = 1.0
    busy_backoff_max: float = 0.5
    silence_timeout: float = 30.0  # a peer asked but silent this long is snubbed
    snub_seconds: float = 60.0
    ban_seconds: float = 600.0  # a peer that sent a bad piece is refused for 10 minutes
    stall_timeout: float = 60.0  # no piece from anyone this long -> upstream even without the claim
    claim_retry: float = 5.0  # without the claim, ask again this often while some piece has no source
    claim_renew: float = 5.0  # the holder renews this often (the node's claim TTL is 12 s: service.CLAIM_TTL)
    # A download whose node already holds or is asking for other blobs' claims waits this long per such claim
    # (at most claim_stagger_max in all) before asking for its own: see claim_wait().
    claim_stagger: float = 0.02
    claim_stagger_max: float = 0.06
    ewma_alpha: float = 0.3
    zone_bonus: float = 2.0  # a same-zone peer counts as this many times faster when choosing sources


def source_shares(total: int, downloads: int) -> list[int]:
    """How many sources each of a node's `downloads` concurrent downloads may use, oldest first: `total`
    (SchedulerConfig.max_sources) split as evenly as it goes, the remainder to the oldest, at least one each.

    Why: every uploader serves at most as many pieces at once as a downloader has sources, so the swarm's slots
    and requests match. A node pulling three layers with four sources each held twelve slots, three times its
    share: its requests met full uploaders and were refused while its link was already full. Splitting the
    node's sources among its downloads (in the simulator, bench-8x100.toml, four layers at once, seeds 1-10:
    1.19x -> 1.09x the bound; rollout-500.toml at 100 nodes, two layers, seeds 1-6: 1.35x -> 1.33x) costs a
    single download nothing."""
    if downloads <= 0:
        return []
    base, extra = divmod(total, downloads)
    return [max(1, base + (1 if i < extra else 0)) for i in range(downloads)]


def claim_wait(others: int, waited: float, cfg: SchedulerConfig) -> float:
    """How much longer a download waits before its first claim request, while `others` of its node's downloads
    hold or are asking for their blobs' upstream claims and it has waited `waited` seconds so far (0: ask now).

    Why: the claim holder is the one node that uploads the first copy of every piece of its blob, at its own
    upload rate. When every node pulls a multi-layer image at once, a node that won two layers' claims carries two
    layers' first copies, and the rollout waits for it (in the simulator, bench-8x100.toml over 20 seeds: 15-16 s
    with the four claims on two nodes, 11.4-12 s on four). Waiting ~20 ms per claim a node already has lets a node
    with none ask first; the driver counts again after each wait (a claim it was denied meanwhile no longer
    counts), and never waits more than `claim_stagger_max` in all, which is all a node pulling alone loses."""
    if others <= 0 or waited >= cfg.claim_stagger_max:
        return 0.0
    return min(cfg.claim_stagger * others, cfg.claim_stagger_max - waited)


class BanList:
    """Peers refused until a time; shared by all downloads of a node (a liar is a liar for every blob)."""

    def __init__(self) -> None:
        self._until: dict[Peer, float] = {}

    def ban(self, peer: Peer, until: float) -> None:
        self._until[peer] = max(until, self._until.get(peer, until))

    def banned(self, peer: Peer, now: float) -> bool:
        u = self._until.get(peer)
        if u is None:
            return False
        if u <= now:
            del self._until[peer]
            return False
        return True

    def expire(self, now: float) -> None:
        for p in [p for p, u in self._until.items() if u <= now]:
            del self._until[p]

    def __len__(self) -> int:
        return len(self._until)


class _PeerState:
    __slots__ = ("zone", "rate", "last_recv", "reqs", "snubbed_until", "same_zone", "busy_until")

    def __init__(self, zone: str | None, same_zone: bool, now: float) -> None:
        self.zone = zone
        self.same_zone = same_zone
        self.rate: float | None = None
        self.last_recv = now  # last time this peer delivered (or connected)
        self.reqs: dict[int, float] = {}  # index -> time requested
        self.snubbed_until = 0.0
        self.busy_until = 0.0  # the peer refused a request (all its upload slots busy): not before this


class DownloadScheduler:
    def __init__(
        self, size: int, piece_size: int, *, rng: random.Random, zone: str | None = None,
        have: Iterable[int] | int = (), known: Iterable[int] | int | None = None,
        config: SchedulerConfig | None = None, bans: BanList | None = None, now: float = 0.0,
    ) -> None:
        self.size = size
        self.piece_size = piece_size
        self.n = piece_count(size, piece_size)
        self.cfg = cfg = config or SchedulerConfig()
        self.zone = zone
        self.picker = PiecePicker(self.n, rng, have, cfg.pipeline, cfg.endgame_dups)
        if known is not None:
            self.picker.set_known(known)
        self.bans = bans if bans is not None else BanList()
        self.peers: dict[Peer, _PeerState] = {}
        self._active: set[Peer] = set()  # peers with requests outstanding
        self.max_sources = cfg.max_sources  # this download's share of the node's sources (set_max_sources)
        self._deadlines: list[tuple[float, int, Peer, int, float]] = []
        self._seq = 0
        self._busy_wake: float | None = None  # earliest time a refusing peer may be asked again
        self._flow_rate: float | None = None  # EWMA of per-transfer rates over all peers (bytes/s)
        self.claim = "none"  # none | asked | held | denied
        self.claim_holder: Peer | None = None
        self._next_claim = now
        self.upstream: int | None = None  # piece the upstream stream is on
        self.upstream_reason = ""
        self.last_progress = now
        self.source: dict[int, Peer] = {}
        self.meta_source: Peer | None = None
        self.done = self.picker.complete
        self.failed = False
        # figures for metrics and the simulator
        self.bytes_from_peers = 0
        self.bytes_from_upstream = 0
        self.pieces_rejected = 0
        self.requests_cancelled = 0

    # --- helpers -------------------------------------------------------------------------------------------
    def piece_len(self, index: int) -> int:
        return piece_span(index, self.size, self.piece_size)[1]

    def _score(self, peer: Peer) -> float:
        st = self.peers[peer]
        r = st.rate if st.rate is not None else self.cfg.assumed_rate
        return r * self.cfg.zone_bonus if st.same_zone else r

    def _request(self, peer: Peer, st: _PeerState, idx: list[int], now: float, out: list) -> None:
        cfg = self.cfg
        rate = st.rate or cfg.assumed_rate
        if not st.reqs:
            self._active.add(peer)
        for i in idx:
            pos = len(st.reqs) + 1
            st.reqs[i] = now
            wait = max(cfg.timeout_min, cfg.timeout_factor * pos * self.piece_len(i) / rate)
            self._seq += 1
            heapq.heappush(self._deadlines, (now + wait, self._seq, peer, i, now))
            out.append(Request(peer, i))

    def _forget(self, peer: Peer, st: _PeerState, index: int) -> None:
        st.reqs.pop(index, None)
        if not st.reqs:
            self._active.discard(peer)

    def _rearm_busy(self, now: float) -> None:
        """Nothing in flight, so no delivery will call for the next fill: wake up when the next refusing peer's
        back-off ends. Without this, a node whose peers had all said "busy" sat idle until the stall fallback
        (found in review: 60 s, then upstream, with 1 upload slot). Only then: waking at every back-off while
        pieces flow took two-zones from 1.54x to 2.08x the bound (fills that took far peers)."""
        if self._active or self._busy_wake is not None:
            return
        later = [st.busy_until for st in self.peers.values() if st.busy_until > now]
        if later:
            self._busy_wake = min(later)

    def _next_busy_wake(self, now: float) -> None:
        """A back-off ended and the fill after it left room for more sources: wake again when the next
        refusing peer's back-off ends. Only the earliest was kept, so with two peers refusing at once the later
        one was not asked again while the other kept delivering (3 nodes: a node read a whole layer from one of
        its two holders, the other idle, 8.9 s with a 20 MB/s registry, 13.5 s with a 40 MB/s one). Same-zone
        peers only, where zones are known: a far peer is taken when a fill finds no near one, not woken for
        (waking for every back-off took two-zones from 1.54x to 2.08x the bound, see _rearm_busy)."""
        later = [st.busy_until for p, st in self.peers.items()
                 if st.busy_until > now and p not in self._active and (st.same_zone or self.zone is None)]
        if later:
            self._busy_wake = min(later)

    def _fill(self, peer: Peer, now: float, out: list) -> None:
        st = self.peers.get(peer)
        if st is None or self.done or self.failed:
            return
        if st.snubbed_until > now or st.busy_until > now:
            return
        if not st.reqs and len(self._active) >= self.max_sources:
            return
        idx = self.picker.pick(peer)
        if idx:
            self._request(peer, st, idx, now, out)

    def _fill_all(self, now: float, out: list) -> None:
        """Fill the peers that could take a request: the current sources, then the best others up to
        `max_sources`. O(peers) cheap mask checks, then a partial sort of the candidates."""
        if self.done or self.failed:
            return
        p = self.picker
        free = p.wanted & p.known & ~p.inflight_mask
        if not free:
            if not p.endgame():
                return
            free = p.wanted & p.known
        limit = self.cfg.pipeline
        peers = self.peers
        active = self._active
        fresh = []
        for peer, m in p.peers.items():
            if m & free:
                st = peers.get(peer)
                if st is None or st.busy_until > now or st.snubbed_until > now:
                    continue
                if peer in active:
                    if len(st.reqs) < p.limits.get(peer, limit):
                        self._fill(peer, now, out)
                else:
                    fresh.append(peer)
        room = self.max_sources - len(active)
        if room <= 0 or not fresh:
            return
        if len(fresh) > room:
            fresh = heapq.nlargest(room, fresh, key=self._score)
        for peer in fresh:
            self._fill(peer, now, out)

    def _finish_if_complete(self, out: list) -> None:
        if not self.done and self.picker.complete:
            self.done = True
            if self.upstream is not None:
                self.upstream = None
                out.append(StopUpstream())
            out.append(Done())

    def _upstream_wants(self, index: int) -> bool:
        p = self.picker
        if not 0 <= index < self.n or p.have(index):
            return False
        if self.upstream_reason == "stall":
            return not p.inflight_mask >> index & 1
        # a peer's copy counts only if we could check it: a member that claims every piece of a blob nobody has
        # published yet (a bitfield of all ones) held the claim holder's stream back to the 60 s stall fallback
        return not p.inflight_mask >> index & 1 and (p.avail[index] == 0 or not p.known >> index & 1)

    def _start_upstream(self, reason: str, out: list) -> None:
        if self.upstream is not None or self.done or self.failed:
            return
        self.upstream_reason = reason
        any_piece = reason == "stall"
        i = self.picker.first_wanted(free_only=True, no_peer=not any_piece)
        if i is None:
            return
        self.upstream = i
        self.picker.assign(UPSTREAM, i)
        out.append(FetchUpstream(i, reason))

    def _needs_claim(self) -> bool:
        return self.picker.first_wanted(free_only=True, no_peer=True) is not None

    # --- events --------------------------------------------------------------------------------------------
    def start(self, now: float) -> list[Decision]:
        """The download begins: ask for the claim (or report Done if everything is held already)."""
        out: list[Decision] = []
        self.last_progress = now
        if self.done:
            out.append(Done())
            return out
        self.claim = "asked"
        self._next_claim = now + self.cfg.claim_retry
        out.append(AskClaim())
        return out

    def peer_added(
        self, peer: Peer, zone: str | None, bitfield: Iterable[int] | bytes | int | None, now: float,
    ) -> list[Decision]:
        """A connection to `peer` is up and it sent its bitfield."""
        out: list[Decision] = []
        if self.bans.banned(peer, now):
            return out
        if peer in self.peers:
            self.peer_gone(peer, now)
        same = zone is not None and zone == self.zone
        self.peers[peer] = _PeerState(zone, same, now)
        self.picker.add_peer(peer, mask_of(bitfield, self.n))
        self._set_pipelines()
        self._fill(peer, now, out)
        return out

    def set_max_sources(self, n: int, now: float) -> list[Decision]:
        """The node's downloads changed: this one may use `n` sources from now on (`source_shares`). A larger
        share is used at once; with a smaller one, requests outstanding run out and no new source is taken until
        the download is below it."""
        out: list[Decision] = []
        grew = n > self.max_sources
        self.max_sources = max(1, n)
        if grew:
            self._fill_all(now, out)
        return out

    def _set_pipelines(self) -> None:
        """Deep pipelines while we have few peers, `pipeline` otherwise (see SchedulerConfig.few_peers). Takes
        effect at each peer's next fill."""
        depth = self.cfg.deep_pipeline if len(self.peers) <= self.cfg.few_peers else None
        for peer in self.peers:
            self.picker.set_limit(peer, depth)

    def peer_has(self, peer: Peer, index: int, now: float) -> list[Decision]:
        """`peer` announced it now holds piece `index`."""
        out: list[Decision] = []
        if self.picker.peer_has(peer, index):
            st = self.peers[peer]
            if st.reqs:
                if len(st.reqs) < self.picker.limits.get(peer, self.cfg.pipeline):
                    self._fill(peer, now, out)
            elif len(self._active) < self.max_sources:  # (the common case in a busy swarm: no room)
                self._fill(peer, now, out)
        return out

    def peer_gone(self, peer: Peer, now: float) -> list[Decision]:
        """The connection to `peer` is closed (or it is unreachable); its requests go back to the pool."""
        out: list[Decision] = []
        st = self.peers.pop(peer, None)
        if st is None:
            return out
        self.picker.remove_peer(peer)
        self._set_pipelines()
        self._active.discard(peer)
        if peer == self.claim_holder and self.claim != "held":
            self._next_claim = now  # ask at the next tick: the tracker grants it once the claim expires
        self._fill_all(now, out)
        self._rearm_busy(now)
        return out

    def piece_received(self, peer: Peer, index: int, ok: bool, nbytes: int, now: float) -> list[Decision]:
        """Piece `index` arrived from `peer`; ok = its SHA-256 matched the metainfo (the driver checked)."""
        out: list[Decision] = []
        st = self.peers.get(peer)
        if not ok:
            self.pieces_rejected += 1
            self.picker.failed(peer, index)
            until = now + self.cfg.ban_seconds
            self.bans.ban(peer, until)
            out.append(Ban(peer, until, f"piece {index} failed its hash check"))
            if st is not None:
                for i in list(st.reqs):
                    if i != index:
                        out.append(Cancel(peer, i))
                out.extend(self.peer_gone(peer, now))
            return out
        if st is not None:
            sent = st.reqs.get(index)
            start = st.last_recv if sent is None else max(sent, st.last_recv)
            dt = now - start
            if dt > 0:
                sample = nbytes / dt
                a = self.cfg.ewma_alpha
                st.rate = sample if st.rate is None else (1 - a) * st.rate + a * sample
                fr = self._flow_rate
                self._flow_rate = sample if fr is None else (1 - a) * fr + a * sample
            st.last_recv = now
            self._forget(peer, st, index)
        if self.picker.have(index):
            self.picker.failed(peer, index)
            self._fill(peer, now, out)
            return out
        self.bytes_from_peers += nbytes
        self.last_progress = now
        self.source[index] = peer
        losers = self.picker.received(peer, index)
        for p in losers:
            if p is UPSTREAM:
                continue  # the stream will deliver it anyway; upstream_progress ignores the duplicate
            out.append(Cancel(p, index))
            self.requests_cancelled += 1
            lst = self.peers.get(p)
            if lst is not None:
                self._forget(p, lst, index)
        self._finish_if_complete(out)
        if not self.done:
            n = len(out)
            self._fill(peer, now, out)
            for p in losers:
                if p is not UPSTREAM:
                    self._fill(p, now, out)
            if len(out) == n and len(self._active) < self.max_sources:
                self._fill_all(now, out)  # the sender had nothing more for us: a source slot is free
            self._rearm_busy(now)
        return out

    def _unrequest(self, peer: Peer, index: int) -> _PeerState | None:
        """The request of `index` from `peer` ended without the piece: back to the pool. None: unknown peer."""
        st = self.peers.get(peer)
        if st is not None:
            self.picker.failed(peer, index)
            self._forget(peer, st, index)
        return st

    def piece_refused(self, peer: Peer, index: int, now: float) -> list[Decision]:
        """`peer` refused the request ("busy": its upload slots are taken): ask others, retry it a little later."""
        out: list[Decision] = []
        st = self._unrequest(peer, index)
        if st is None:
            return out
        rate = st.rate or self._flow_rate
        if rate is None:
            # Nothing measured yet: the start of a rollout, when every node asks the claim holder for its first
            # pieces. Two piece times at `assumed_rate` (4 MB/s) meant half a second of not asking the one node
            # with new pieces (100 nodes x 1 GiB in the simulator: 1.24x -> 1.20x the bound, rollout-500 at 500
            # nodes 1.36x -> 1.31x); retry soon instead, until a transfer says how long a piece takes.
            wait = self.cfg.busy_backoff
        else:
            wait = min(self.cfg.busy_backoff_max,
                       max(self.cfg.busy_backoff, self.cfg.busy_backoff_pieces * self.piece_len(index) / rate))
        st.busy_until = now + wait
        if self._busy_wake is None or st.busy_until < self._busy_wake:
            self._busy_wake = st.busy_until
        if len(self._active) < self.max_sources:
            self._fill_all(now, out)
        return out

    def piece_not_held(self, peer: Peer, index: int, now: float) -> list[Decision]:
        """`peer` answered that it does not hold piece `index` after all (its download of the blob failed and
        was discarded, or its copy was found corrupt): it is no source of that piece any more. Without this a
        peer that lost a piece was asked for it again after every busy back-off, for ever."""
        out: list[Decision] = []
        if self._unrequest(peer, index) is None:
            return out
        self.picker.peer_lost(peer, index)
        self._fill_all(now, out)
        return out

    def upstream_progress(self, index: int, nbytes: int, now: float) -> list[Decision]:
        """The upstream stream delivered piece `index` (hashed by the driver, which publishes the hash)."""
        out: list[Decision] = []
        if self.upstream != index:
            # a piece read ahead after StopUpstream (or a stray one): still good bytes if we want them
            if 0 <= index < self.n and not self.picker.have(index) and not self.failed:
                self.bytes_from_upstream += nbytes
                self.source[index] = UPSTREAM
                self.picker.failed(UPSTREAM, index)
                for p in self.picker.received(UPSTREAM, index):
                    out.append(Cancel(p, index))
                    lst = self.peers.get(p)
                    if lst is not None:
                        self._forget(p, lst, index)
                self._finish_if_complete(out)
            return out
        self.upstream = None
        self.last_progress = now
        if not self.picker.have(index):
            self.bytes_from_upstream += nbytes
            self.source[index] = UPSTREAM
            for p in self.picker.received(UPSTREAM, index):
                out.append(Cancel(p, index))
                self.requests_cancelled += 1
                lst = self.peers.get(p)
                if lst is not None:
                    self._forget(p, lst, index)
        else:
            self.picker.failed(UPSTREAM, index)
        self._finish_if_complete(out)
        if self.done:
            return out
        nxt = index + 1
        if self._upstream_wants(nxt):
            self.upstream = nxt
            self.picker.assign(UPSTREAM, nxt)
        else:
            if nxt < self.n:
                out.append(StopUpstream())
            if self.claim == "held" or self.upstream_reason == "stall":
                self._start_upstream(self.upstream_reason, out)
        return out

    def upstream_failed(self, reason: str, now: float) -> list[Decision]:
        """The upstream stream broke (after the driver's own retries)."""
        out: list[Decision] = []
        if self.upstream is not None:
            self.picker.failed(UPSTREAM, self.upstream)
            self.upstream = None
        if self._needs_claim():
            self.failed = True
            out.append(Fail(f"upstream: {reason}"))
            return out
        self._fill_all(now, out)
        return out

    def claim_granted(self, now: float) -> list[Decision]:
        """The tracker granted (or renewed) our claim: we are the cluster's upstream fetcher for this blob."""
        out: list[Decision] = []
        self.claim = "held"
        self.claim_holder = None
        self._next_claim = now + self.cfg.claim_renew
        self._start_upstream("claim", out)
        return out

    def claim_denied(self, holder: Peer | None, now: float) -> list[Decision]:
        """Another node holds the claim (or the complete blob): wait for its pieces through the swarm.

        Also the answer to a renewal when the claim was lost (the tracker moved to another owner, which granted
        it to someone else first): the stream the claim paid for stops, or two nodes would fetch the rest of
        the blob from upstream; the new holder streams from the first piece nobody has."""
        out: list[Decision] = []
        lost = self.claim == "held"
        self.claim = "denied"
        self.claim_holder = holder
        self._next_claim = now + self.cfg.claim_retry
        if lost and self.upstream is not None and self.upstream_reason == "claim":
            self.picker.failed(UPSTREAM, self.upstream)
            self.upstream = None
            out.append(StopUpstream())
            self._fill_all(now, out)
        return out

    def metainfo_known(
        self, hashes: Sequence[bytes | None], now: float, source: Peer | None = None,
    ) -> list[Decision]:
        """Piece hashes learnt (None = not published yet); only pieces that can be checked are requested (their
        hash known and, as they are links of a chain, the one before: `metainfo.checkable`)."""
        out: list[Decision] = []
        self.picker.set_known(i for i in range(len(hashes)) if checkable(hashes, i))
        if source is not None:
            self.meta_source = source
        self._fill_all(now, out)
        return out

    def piece_known(self, index: int, now: float) -> list[Decision]:
        """One more piece can be checked (cheaper than metainfo_known for piece-by-piece publication)."""
        out: list[Decision] = []
        if not self.picker.known >> index & 1:
            self.picker.add_known(index)
            self._fill_all(now, out)
        return out

    def tick(self, now: float) -> list[Decision]:
        """Time passed: late requests, silent peers, claim renewal and retries, the stall fallback."""
        out: list[Decision] = []
        if self.done or self.failed:
            return out
        cfg = self.cfg
        dl = self._deadlines
        refill = False
        while dl and dl[0][0] <= now:
            _, _, peer, i, sent = heapq.heappop(dl)
            st = self.peers.get(peer)
            if st is None or st.reqs.get(i) != sent:
                continue  # answered, cancelled, or the peer is gone
            if now - st.last_recv >= cfg.silence_timeout:
                st.snubbed_until = now + cfg.snub_seconds
                for j in list(st.reqs):
                    out.append(Cancel(peer, j))
                    self.picker.failed(peer, j)
                    self.requests_cancelled += 1
                st.reqs.clear()
                self._active.discard(peer)
                refill = True
            elif self.picker.sources(i) > 1 and not self.picker.endgame():
                out.append(Cancel(peer, i))
                self.picker.failed(peer, i)
                self.requests_cancelled += 1
                self._forget(peer, st, i)
                refill = True
            else:  # nobody else has it: cancelling would only restart the same transfer
                self._seq += 1
                heapq.heappush(dl, (now + cfg.timeout_min, self._seq, peer, i, sent))
        woke = self._busy_wake is not None and now >= self._busy_wake
        if woke:
            self._busy_wake = None
            refill = True
        if refill:
            self._fill_all(now, out)
        if woke and len(self._active) < self.max_sources:
            self._next_busy_wake(now)
        self._rearm_busy(now)
        if now >= self._next_claim:
            if self.claim == "held" and not self.done:
                self._next_claim = now + cfg.claim_renew
                out.append(AskClaim())
            else:
                self._next_claim = now + cfg.claim_retry
                if self.claim != "held" and self.upstream is None and self._needs_claim():
                    self.claim = "asked"
                    out.append(AskClaim())
        # The same sum next_deadline() returns, not `now - last_progress >= stall_timeout`: the two round
        # differently (34.38802240020318 + 60 is 94.38802240020317, which minus the first is 59.99999999999999),
        # and a tick at that deadline did nothing while the deadline stayed due: the simulator spun at one
        # instant for ever, and a node's driver would have too (found in review).
        if self.upstream is None and now >= self.last_progress + cfg.stall_timeout and not self.done:
            self.last_progress = now  # one fallback per stall period
            self._start_upstream("stall", out)
        return out

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (None: nothing is pending)."""
        if self.done or self.failed:
            return None
        dl = self._deadlines
        while dl:
            _, _, peer, i, sent = dl[0]
            st = self.peers.get(peer)
            if st is not None and st.reqs.get(i) == sent:
                break
            heapq.heappop(dl)
        t = self._next_claim
        if dl:
            t = min(t, dl[0][0])
        if self.upstream is None:
            t = min(t, self.last_progress + self.cfg.stall_timeout)
        if self._busy_wake is not None:
            t = min(t, self._busy_wake)
        return t


# --- the uploader's side ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Serve:
    """Start sending piece `index` of `key` (a digest) to `peer` now."""
    peer: Peer
    key: Hashable
    index: int


SERVED_KEYS = 1024  # blobs whose per-piece upload counts an UploadSlots keeps (the most recently served)
# Second copies refused in a row, after a stream ended, with no first copy started between them: then nobody wants
# the pieces still waiting, and the first-copies rule ends (UploadSlots).
DRAIN_REFUSALS = 16
# An upload link carrying less than this share of its capacity has room for a guest (UploadSlots._guest): the
# simulator reads it off its allocation, the node off what it sent over the last second (ratelimit.RateMeter).
# Half, not nearly all: the real node's upload has gaps between pieces that a 95 % rule took for room.
SPARE_SHARE = 0.5


class UploadSlots:
    """At most `slots` piece uploads at once per node; beyond that a request is refused ("busy") or queued.

    By default nothing is queued: a request that finds every slot taken is refused, the driver answers "busy",
    and the requester's scheduler (`piece_refused`) asks another peer, or this one a little later. In the
    simulator, queues made requests wait behind busy peers while idle peers held the same pieces (1.9x -> 1.4x
    the bound at 16 MiB pieces without them). With `queue` > 0, at most that many wait in all and `per_peer`
    from one peer, and the next upload is the queued request whose piece this node has served least often
    (first come among equals), so the first holder of a cold blob sends each piece out about once and its peers
    spread it. `request` returns the uploads to start now (None: refused); `finished` and `cancel` free a slot
    and return what starts next.

    First copies first. While a node streams a blob from upstream (it holds the claim, or fell back to upstream), it
    is the swarm's only source of each new piece, and its upload is as fast as the stream at best (the tight case:
    registry and every link at one rate). Every second copy of a piece it sends delays the first copy of a newer
    one, and the whole rollout waits for the newest piece. Its peers cannot help it: a requester connected to the
    holder but not to the node that got the first copy sees the holder as the only source. So the driver marks each
    piece the stream delivers (`fresh`), and while some piece of that blob has not been sent once, a request for a
    piece of it that was sent already is refused ("busy"): the requester takes it from the peer that has it, or asks
    again later. In the simulator: the holder of a 1 GiB blob sent 1.31 copies of each piece while streaming, 1.07
    with the rule; 100 nodes at 1 Gbit/s behind a 1 Gbit/s registry went from 1.36x to 1.25x the bound (seeds 1-4),
    smoke-10 from 1.20x to 1.15x.

    The rule outlives the stream (`stream_ended`) until every piece it delivered went out once: a stream faster
    than the holder's upload ends with a backlog of pieces only the holder has, and second copies sent then delay
    their first copies just the same (10 nodes, one 80 MB layer, 10 MB/s uploads: 8.75 s behind a 10 MB/s
    registry, 9.21 s behind a 20 MB/s one, whose stream ended at 4 s with half the pieces not sent once). Once the
    stream has ended nothing new arrives, so if nobody asks for the pieces still waiting (peers got them another
    way, from a second upstream fetch), the rule must not refuse forever a second copy that a peer can get nowhere
    else: after `DRAIN_REFUSALS` refusals in a row with no first copy started between them, it ends.
    """

    def __init__(self, slots: int = 4, per_peer: int = 8, queue: int = 0) -> None:
        self.slots = slots
        self.per_peer = per_peer
        self.max_queue = queue
        self.active: set[tuple[Peer, Hashable, int]] = set()
        self.queue: deque[tuple[Peer, Hashable, int]] = deque()
        self.queued: dict[Peer, int] = {}
        # key -> {index: uploads started}, for the SERVED_KEYS blobs served last: a node serves for weeks, and a
        # count per piece ever sent grew without end (the counts only steer which piece goes next)
        self.served: OrderedDict[Hashable, dict[int, int]] = OrderedDict()
        self._fresh: dict[Hashable, set[int]] = {}  # key -> pieces from our upstream stream not sent yet
        self._draining: dict[Hashable, int] = {}  # key -> refusals in a row since its stream ended

    def fresh(self, key: Hashable, index: int) -> None:
        """Our upstream stream delivered piece `index` of `key`: it goes out once before any piece goes twice."""
        if not self.times_served(key, index):
            self._fresh.setdefault(key, set()).add(index)
            self._draining.pop(key, None)  # a stream of it runs (again)

    def stream_ended(self, key: Hashable) -> None:
        """Our upstream stream of `key` ended (or stopped): its pieces not sent yet still go first, until they
        are all sent or nobody seems to want them (see the class docstring)."""
        if key in self._fresh:
            self._draining[key] = 0

    def _end_fresh(self, key: Hashable) -> None:
        self._fresh.pop(key, None)
        self._draining.pop(key, None)

    def request(self, peer: Peer, key: Hashable, index: int, spare: bool = False) -> list[Serve] | None:
        """A peer asks for a piece. None if refused (busy), else the uploads to start now (maybe none: queued).
        `spare`: the driver sees upload capacity that the running uploads leave unused (see `_guest`)."""
        guest = False
        if self.queued.get(peer, 0) >= self.per_peer or len(self.queue) >= self.max_queue + max(
                0, self.slots - len(self.active)):
            if not (spare and self._guest(peer)):
                return None
            guest = True
        if key in self._fresh and self.times_served(key, index):
            # a second copy while a first copy of a newer piece waits (see the class docstring)
            refusals = self._draining.get(key)
            if refusals is None:
                return None
            if refusals < DRAIN_REFUSALS:
                self._draining[key] = refusals + 1
                return None
            self._end_fresh(key)
        if guest:
            return [self._activate((peer, key, index))]
        self.queue.append((peer, key, index))
        self.queued[peer] = self.queued.get(peer, 0) + 1
        return self._start()

    def _start(self) -> list[Serve]:
        out = []
        q = self.queue
        served = self.times_served
        while q and len(self.active) < self.slots:
            # least-served piece first (ties: first come): a node's upload goes to pieces it has not sent yet,
            # which its peers then pass on, rather than to the 10th copy of the newest piece
            best = 0
            if len(q) > 1:
                best_n = served(*q[0][1:])
                for j in range(1, len(q)):
                    n = served(*q[j][1:])
                    if n < best_n:
                        best, best_n = j, n
            item = q[best]
            del q[best]
            self._dequeued(item[0])
            out.append(self._activate(item))
        return out

    def _guest(self, peer: Peer) -> bool:
        """Every slot is taken and the upload link carries less than SPARE_SHARE of its capacity (the driver said
        `spare`): does `peer` get one more? Yes when every running upload goes to one other peer. That peer's own
        download link is then what limits them: a node with a slow download and few peers (deep pipelines) held
        every slot of a fast uploader, and the others were told "busy" while most of the uploader's link sat idle
        (simulations/cases/slot-hogging.toml: 3 nodes, 50 MB/s up, 25 MB/s down, three layers behind a 40 MB/s
        registry: one node idle for 4 s, 9.8 s where a 20 MB/s registry gave 7.05 s; 6.3-6.7 s with this). Not
        with two peers or more,
        and not on a busy link: a guest then only takes bandwidth from first copies (u = d = u_s went from 1.2x
        to 1.8x the bound when any new peer was a guest, and an upload-bound 3-node case 9.1 s -> 9.8 s with
        guests whatever the link carried)."""
        holders = {item[0] for item in self.active}  # (at most slots + 1 items)
        return len(holders) == 1 and peer not in holders and not self.queued.get(peer)

    def _activate(self, item: tuple[Peer, Hashable, int]) -> Serve:
        self.active.add(item)
        self._count_served(item[1], item[2])
        fresh = self._fresh.get(item[1])
        if fresh is not None and item[2] in fresh:
            fresh.discard(item[2])
            if not fresh:
                self._end_fresh(item[1])
            elif item[1] in self._draining:
                self._draining[item[1]] = 0
        return Serve(*item)

    def times_served(self, key: Hashable, index: int) -> int:
        """Uploads of piece `index` of `key` started here (0 once the blob fell out of the last SERVED_KEYS)."""
        counts = self.served.get(key)
        return counts.get(index, 0) if counts is not None else 0

    def _count_served(self, key: Hashable, index: int) -> None:
        counts = self.served.get(key)
        if counts is None:
            counts = self.served[key] = {}
            if len(self.served) > SERVED_KEYS:
                self.served.popitem(last=False)
        else:
            self.served.move_to_end(key)
        counts[index] = counts.get(index, 0) + 1

    def not_held(self, key: Hashable, index: int) -> None:
        """An upload that started turned out to be of a piece we do not hold (the driver found no bytes for it):
        it was never served. Without this a peer asking for indexes of a blob we lack grew `served` by one entry
        per index, for as long as the key stayed among the last SERVED_KEYS."""
        counts = self.served.get(key)
        if counts is None or index not in counts:
            return
        if counts[index] > 1:
            counts[index] -= 1
        else:
            del counts[index]
            if not counts:
                del self.served[key]

    def _dequeued(self, peer: Peer) -> None:
        n = self.queued[peer] - 1
        if n:
            self.queued[peer] = n
        else:
            del self.queued[peer]

    def finished(self, peer: Peer, key: Hashable, index: int) -> list[Serve]:
        """An upload completed (or was aborted); its slot goes to the next in line."""
        self.active.discard((peer, key, index))
        return self._start()

    def cancel(self, peer: Peer, key: Hashable, index: int) -> list[Serve]:
        """The peer no longer wants the piece: dropped from the queue, or its running upload stopped."""
        item = (peer, key, index)
        if item in self.active:
            return self.finished(peer, key, index)
        try:
            self.queue.remove(item)
        except ValueError:
            return []
        self._dequeued(peer)
        return []

    def peer_gone(self, peer: Peer) -> list[Serve]:
        for item in [it for it in self.active if it[0] == peer]:
            self.active.discard(item)
        kept = deque(it for it in self.queue if it[0] != peer)
        self.queue = kept
        self.queued.pop(peer, None)
        return self._start()
