"""The soft state one tracker shard holds: who holds or fetches each digest, the upstream claim, the metainfo.

Rules:
- Sans-IO: every call takes `now` (seconds, any monotonic origin shared by the caller's calls) and returns an
  answer. No sockets, no clock, no background task; the driver (swarm/service.py, or the simulator) calls
  `expire(now)` now and then to drop what nobody renewed.
- Node ids are opaque hashables (node-id strings in the node, small ints in the simulator).
- Everything here is soft state. Losing it (a restarted shard, a shard that rendezvous hashing no longer picks)
  costs one re-announce per holder and nothing else, so nothing here is ever persisted.
- `claim` is atomic by construction: the shard is single-threaded and answers one call at a time, so of N nodes
  asking for the same cold digest the first one wins and the others are told who won.

Theory of operation:
- Holders. A node that holds or is fetching a digest calls `announce(...)` with how many pieces it has (or
  complete=True) every `ttl / 3` or so; an entry it stops renewing expires at `expires_at`. `holders(...)` answers
  a random sample of live holders (up to 3/4 from the asker's zone when asked, the rest from anywhere, so
  zones stay linked), so that in a rollout of thousands of nodes every newcomer gets a different set of peers
  and load spreads; the randomness comes from the seeded `rng` given to the constructor, so the simulator is
  deterministic. Sampling is O(limit), not O(holders): each digest keeps its
  holders in an indexed list (swap-remove), and expired entries are dropped lazily when sampled.
- Claim. `claim(digest, node, now, ttl)` grants the right to fetch the digest from upstream to the first asker.
  The holder renews by asking again (same node: granted, expiry pushed back). When the holder stops renewing
  (it died, or it finished and called `release`), the next asker gets it. While a live holder announces the
  digest complete, the claim is refused and the complete holder is named instead: the asker should get the
  bytes from that peer, not from upstream.
- Metainfo. The claim holder publishes piece hashes as it fetches ("piece by piece"), so peers can verify pieces
  before the blob is complete. Only the current claim holder may publish; a hash already published for a piece is
  never replaced by a different one (a takeover holder re-publishes the same hashes, as the pieces are the same).
- Tags. `put_tag`/`tag` remember the last tag -> digest answer a node saw from upstream, so a node can resolve a
  tag during an upstream outage. The newest answer (by `checked_at`) wins.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from p2pcache.swarm.metainfo import piece_count, valid_layout

__all__ = [
    "ClaimGranted", "ClaimHeld", "Holder", "Metainfo", "TagAnswer", "Tracker",
    "DEFAULT_ANNOUNCE_TTL", "DEFAULT_CLAIM_TTL",
]

DEFAULT_ANNOUNCE_TTL = 30.0  # holders re-announce every ~10 s; a dead holder stops being handed out after 30 s
DEFAULT_CLAIM_TTL = 15.0  # a dead claim holder delays the takeover by at most this long


@dataclass(slots=True)
class Holder:
    node: str
    address: str
    zone: str | None
    pieces: int  # pieces held (0 = just started fetching)
    complete: bool
    expires_at: float


@dataclass(frozen=True, slots=True)
class ClaimGranted:
    """The asker holds the claim until `expires_at` (renew by asking again)."""
    digest: str
    node: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class ClaimHeld:
    """Someone else holds the claim (or holds the complete blob: `complete`); get the bytes from them."""
    digest: str
    holder: str
    address: str
    expires_at: float
    complete: bool = False


@dataclass(slots=True)
class Metainfo:
    size: int
    piece_size: int
    hashes: list[bytes | None]  # None = not published yet

    @property
    def complete(self) -> bool:
        return all(h is not None for h in self.hashes)

    def known(self) -> int:
        return sum(h is not None for h in self.hashes)


@dataclass(frozen=True, slots=True)
class TagAnswer:
    digest: str
    media_type: str
    size: int
    checked_at: float


@dataclass(slots=True)
class _Claim:
    node: str
    address: str
    expires_at: float


class _IndexedHolders:
    """Holders of one digest: O(1) add/remove by node, O(k) random sample; per-zone sub-lists."""

    __slots__ = ("by_node", "complete", "order", "pos", "zones")

    def __init__(self) -> None:
        self.by_node: dict[str, Holder] = {}
        self.complete: dict[str, None] = {}  # nodes announcing the complete blob (insertion-ordered set)
        self.order: list[str] = []
        self.pos: dict[str, int] = {}
        self.zones: dict[str | None, _NodeList] = {}

    def put(self, h: Holder) -> None:
        old = self.by_node.get(h.node)
        if old is not None and old.zone != h.zone:
            self.zones[old.zone].remove(h.node)
            old = None
        self.by_node[h.node] = h
        if h.node not in self.pos:
            self.pos[h.node] = len(self.order)
            self.order.append(h.node)
        if old is None:
            self.zones.setdefault(h.zone, _NodeList()).add(h.node)
        self.mark(h)

    def mark(self, h: Holder) -> None:
        if h.complete:
            self.complete[h.node] = None
        else:
            self.complete.pop(h.node, None)

    def remove(self, node: str) -> None:
        h = self.by_node.pop(node, None)
        if h is None:
            return
        self.complete.pop(node, None)
        i = self.pos.pop(node)
        last = self.order.pop()
        if last != node:
            self.order[i] = last
            self.pos[last] = i
        z = self.zones[h.zone]
        z.remove(node)
        if not z.order:
            del self.zones[h.zone]


class _NodeList:
    __slots__ = ("order", "pos")

    def __init__(self) -> None:
        self.order: list[str] = []
        self.pos: dict[str, int] = {}

    def add(self, node: str) -> None:
        if node not in self.pos:
            self.pos[node] = len(self.order)
            self.order.append(node)

    def remove(self, node: str) -> None:
        i = self.pos.pop(node, None)
        if i is None:
            return
        last = self.order.pop()
        if last != node:
            self.order[i] = last
            self.pos[last] = i


@dataclass
class Tracker:
    rng: random.Random = field(default_factory=random.Random)
    announce_ttl: float = DEFAULT_ANNOUNCE_TTL
    claim_ttl: float = DEFAULT_CLAIM_TTL
    _holders: dict[str, _IndexedHolders] = field(default_factory=dict)
    _claims: dict[str, _Claim] = field(default_factory=dict)
    _meta: dict[str, Metainfo] = field(default_factory=dict)
    _tags: dict[str, TagAnswer] = field(default_factory=dict)
    # Digests one node may hold entries for here: its renewals are taken as sent, 1024 digests a frame, so
    # without a bound one member grew a tracker by 480 MB in 7 s (found in review). A node that really holds
    # more than this many blobs of one shard is tracked for the first ones it announced.
    max_per_node: int = 50_000
    _per_node: dict[str, int] = field(default_factory=dict)

    # --- holders -------------------------------------------------------------------------------------------
    def announce(
        self, now: float, digest: str, node: str, address: str = "", zone: str | None = None,
        pieces: int = 0, complete: bool = False, ttl: float | None = None,
    ) -> None:
        """`node` holds (part of) `digest` until now + ttl unless renewed."""
        ttl = self.announce_ttl if ttl is None else ttl
        entry = self._holders.get(digest)
        if entry is None:
            entry = self._holders[digest] = _IndexedHolders()
        h = entry.by_node.get(node)
        if h is not None and h.zone == zone:
            h.address, h.pieces, h.complete, h.expires_at = address, pieces, complete, now + ttl
            entry.mark(h)
            return
        if h is None:
            n = self._per_node.get(node, 0)
            if n >= self.max_per_node:
                if not entry.by_node:
                    del self._holders[digest]
                return
            self._per_node[node] = n + 1
        entry.put(Holder(node, address, zone, pieces, complete, now + ttl))

    def _drop(self, entry: _IndexedHolders, node: str) -> None:
        if node in entry.by_node:
            entry.remove(node)
            n = self._per_node.pop(node) - 1
            if n:
                self._per_node[node] = n

    def withdraw(self, digest: str, node: str) -> None:
        """`node` no longer holds `digest` (evicted, or gave up)."""
        entry = self._holders.get(digest)
        if entry is not None:
            self._drop(entry, node)
            if not entry.by_node:
                del self._holders[digest]

    def holders(
        self, digest: str, now: float, limit: int = 50, prefer_zone: str | None = None,
        exclude: str | int | Iterable[str] | None = None,
    ) -> list[Holder]:
        """Up to `limit` live holders in random order: up to 3/4 of them from `prefer_zone`, then any."""
        entry = self._holders.get(digest)
        if entry is None or limit <= 0:
            return []
        if exclude is None:
            skip: set = set()
        elif isinstance(exclude, str | bytes | int):
            skip = {exclude}
        else:
            skip = set(exclude)
        out: list[Holder] = []
        seen: set[str] = set()
        pools: list[tuple[list[str], int]] = []
        if prefer_zone is not None and prefer_zone in entry.zones and len(entry.zones) > 1:
            # at most 3/4 from the asker's zone: the rest is drawn from everyone, so every zone keeps some
            # links to the others (a zone whose nodes only know each other waits for the rest to reach it)
            pools.append((entry.zones[prefer_zone].order, limit - limit // 4))
        pools.append((entry.order, limit))
        for pool, cap in pools:
            for _attempt in range(3):
                want = cap - len(out)
                if want <= 0 or not pool:
                    break
                k = min(len(pool), want + len(skip) + len(seen))
                dropped = False
                for node in self.rng.sample(pool, k):
                    if node in seen or node in skip:
                        continue
                    h = entry.by_node[node]
                    if h.expires_at <= now:
                        dropped = True
                        continue
                    seen.add(node)
                    out.append(h)
                    if len(out) >= cap:
                        break
                if not dropped:
                    break
                # sampled entries that had expired: drop them, then sample again for the places they took
                for node in [n for n in pool if entry.by_node[n].expires_at <= now]:
                    self._drop(entry, node)
        if not entry.by_node:
            del self._holders[digest]
        return out

    def holder_count(self, digest: str) -> int:
        entry = self._holders.get(digest)
        return 0 if entry is None else len(entry.by_node)

    # --- the upstream claim --------------------------------------------------------------------------------
    def claim(
        self, digest: str, node: str, now: float, ttl: float | None = None, address: str = "",
    ) -> ClaimGranted | ClaimHeld:
        """Grant `node` the right to fetch `digest` from upstream, or say who has it.

        First asker wins; the holder renews by asking again; an expired claim goes to the next asker. A live
        holder of the complete blob makes the claim unnecessary: the answer names that holder (complete=True).
        """
        ttl = self.claim_ttl if ttl is None else ttl
        c = self._claims.get(digest)
        if c is not None and c.node != node and c.expires_at > now:
            return ClaimHeld(digest, c.node, c.address, c.expires_at)
        if c is None or c.node != node:
            full = self._complete_holder(digest, now, node)
            if full is not None:
                return ClaimHeld(digest, full.node, full.address, full.expires_at, complete=True)
        self._claims[digest] = _Claim(node, address, now + ttl)
        return ClaimGranted(digest, node, now + ttl)

    def release(self, digest: str, node: str) -> None:
        """The holder is done (or gives up); the next asker gets the claim at once."""
        c = self._claims.get(digest)
        if c is not None and c.node == node:
            del self._claims[digest]

    def claim_holder(self, digest: str, now: float) -> str | None:
        c = self._claims.get(digest)
        return c.node if c is not None and c.expires_at > now else None

    def _complete_holder(self, digest: str, now: float, asker: str) -> Holder | None:
        entry = self._holders.get(digest)
        if entry is None:
            return None
        for node in entry.complete:
            h = entry.by_node[node]
            if h.expires_at > now and node != asker:
                return h
        return None

    # --- metainfo ------------------------------------------------------------------------------------------
    def publish_metainfo(
        self, digest: str, node: str, now: float, size: int, piece_size: int, first: int,
        hashes: Sequence[bytes],
    ) -> bool:
        """Record the hashes of pieces first, first+1, … as published by the claim holder `node`.

        Returns False (and records nothing) if `node` does not hold the claim, if size/piece_size disagree with
        what was published before, or if a hash differs from one already published.
        """
        if self.claim_holder(digest, now) != node:
            return False
        if not valid_layout(size, piece_size):
            return False  # no layout a node makes, and its hash list would be the publisher's to size
        m = self._meta.get(digest)
        n = piece_count(size, piece_size)
        if first < 0 or first + len(hashes) > n:
            return False
        if m is None:
            m = self._meta[digest] = Metainfo(size, piece_size, [None] * n)
        elif (m.size, m.piece_size) != (size, piece_size):
            return False
        for i, h in enumerate(hashes, first):
            if m.hashes[i] is not None and m.hashes[i] != h:
                return False
        m.hashes[first:first + len(hashes)] = list(hashes)
        return True

    def metainfo(self, digest: str) -> Metainfo | None:
        return self._meta.get(digest)

    # --- tags ------------------------------------------------------------------------------------------------
    def put_tag(self, key: str, digest: str, media_type: str, size: int, checked_at: float) -> None:
        """Remember `key` (e.g. "docker.io/library/alpine:3.19|<accept key>") -> digest; newest wins."""
        old = self._tags.get(key)
        if old is None or old.checked_at <= checked_at:
            self._tags[key] = TagAnswer(digest, media_type, size, checked_at)

    def tag(self, key: str) -> TagAnswer | None:
        return self._tags.get(key)

    # --- housekeeping --------------------------------------------------------------------------------------
    def tracked(self) -> int:
        """Digests this shard tracks (holders or a claim): how much of the cluster's tracking lands here."""
        return len(self._holders.keys() | self._claims.keys())

    def expire(self, now: float) -> int:
        """Drop expired holders and claims (O(everything): call every few seconds, not per request).

        Metainfo of a digest nobody holds or claims any more is dropped too. Returns entries dropped.
        """
        dropped = 0
        for digest in list(self._holders):
            entry = self._holders[digest]
            for node in [n for n, h in entry.by_node.items() if h.expires_at <= now]:
                self._drop(entry, node)
                dropped += 1
            if not entry.by_node:
                del self._holders[digest]
        for digest in [d for d, c in self._claims.items() if c.expires_at <= now]:
            del self._claims[digest]
            dropped += 1
        for digest in [d for d in self._meta if d not in self._holders and d not in self._claims]:
            del self._meta[digest]
        return dropped
