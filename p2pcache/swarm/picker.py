"""Which piece to ask which peer for, for one download: rarest first, pipelined, endgame at the tail.

Rules:
- Sans-IO and clock-free: the picker is told what we have, what each peer has, what was requested and what
  arrived; it answers with piece indices. It never sends anything, never verifies anything and never reads a
  clock (timeouts are the scheduler's business). Randomness only comes from the seeded `rng` passed in.
- It does not know who it is running for (a node or a simulated node), so it cannot cheat in the simulator.
- Peers are any hashable ids (node-id strings in the node, small ints in the simulator).

Theory of operation:
- Bitfields are Python ints (bit i = piece i), so "pieces this peer has that we want and nobody is fetching" is
  one expression, whatever the piece count.
- Availability is counted per piece over the connected peers. Wanted pieces sit in buckets by availability
  (`_buckets[a]` = mask of wanted pieces that exactly a peers have), so rarest first is: walk the buckets from 1 up
  and take the first bucket that intersects the peer's candidates; ties are broken at random. A have message moves
  one bit between two buckets: O(1) big-int operations, no sorting.
- In flight: each requested piece records which peers it was asked of. Normally a piece is asked of one peer at a
  time. A peer gets at most `pipeline` outstanding requests (one in transfer, the next queued behind it hides
  the round trip), unless the caller gives it a different limit.
- Endgame: once every missing piece is in flight, a peer with free slots is also given pieces already requested
  elsewhere (at most `endgame_dups` requesters per piece, never twice the same peer). The first copy to arrive wins
  and `received` names the losers, which the caller cancels. Endgame only starts at the tail, so duplicates cost at
  most a few pieces.
- Pieces whose hash is not known yet (the metainfo is published piece by piece) are never picked: `set_known`.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable

__all__ = ["PiecePicker", "bits_of", "mask_of"]

Peer = Hashable


def mask_of(pieces: Iterable[int] | bytes | bytearray | int | None, n: int) -> int:
    """A bitfield as an int from: an int mask, an iterable of indices, or BitTorrent-style bytes (MSB first)."""
    if pieces is None:
        return 0
    if isinstance(pieces, int):
        return pieces & ((1 << n) - 1)
    if isinstance(pieces, bytes | bytearray):
        m = 0
        for i in range(min(n, len(pieces) * 8)):
            if pieces[i >> 3] & (0x80 >> (i & 7)):
                m |= 1 << i
        return m
    m = 0
    for i in pieces:
        if 0 <= i < n:
            m |= 1 << i
    return m


def bits_of(mask: int) -> list[int]:
    """Indices of the set bits, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class PiecePicker:
    def __init__(
        self, n_pieces: int, rng: random.Random, have: Iterable[int] | int = (), pipeline: int = 2,
        endgame_dups: int = 2,
    ) -> None:
        if n_pieces <= 0:
            raise ValueError("a blob has at least one piece")
        self.n = n_pieces
        self.rng = rng
        self.pipeline = pipeline
        self.endgame_dups = endgame_dups
        full = (1 << n_pieces) - 1
        self.have_mask = mask_of(have, n_pieces)
        self.wanted = full & ~self.have_mask
        self.known = full  # pieces whose hash we know; all by default
        self.avail = [0] * n_pieces
        self._buckets: list[int] = [self.wanted]
        self.peers: dict[Peer, int] = {}
        self.inflight: dict[int, list[Peer]] = {}  # piece -> peers asked, oldest first
        self.inflight_mask = 0
        self.peer_reqs: dict[Peer, set[int]] = {}
        self.limits: dict[Peer, int] = {}

    # --- state ---------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.wanted == 0

    @property
    def missing(self) -> int:
        return self.wanted.bit_count()

    def have(self, index: int) -> bool:
        return bool(self.have_mask >> index & 1)

    def outstanding(self, peer: Peer) -> int:
        reqs = self.peer_reqs.get(peer)
        return len(reqs) if reqs else 0

    def requests_of(self, peer: Peer) -> set[int]:
        return set(self.peer_reqs.get(peer, ()))

    def interesting(self, peer: Peer) -> bool:
        """Does the peer have a piece we want (and may request)?"""
        return bool(self.peers.get(peer, 0) & self.wanted & self.known)

    def sources(self, index: int) -> int:
        return self.avail[index]

    def set_known(self, pieces: Iterable[int] | int) -> None:
        """Only these pieces may be requested (their hashes are known)."""
        self.known = mask_of(pieces, self.n)

    def add_known(self, index: int) -> None:
        self.known |= 1 << index

    def set_limit(self, peer: Peer, limit: int | None) -> None:
        """Per-peer pipeline limit (None: the default)."""
        if limit is None:
            self.limits.pop(peer, None)
        else:
            self.limits[peer] = limit

    # --- availability --------------------------------------------------------------------------------------
    def _move(self, index: int, bit: int, old: int, new: int) -> None:
        b = self._buckets
        b[old] &= ~bit
        if new >= len(b):
            b.extend([0] * (new + 1 - len(b)))
        b[new] |= bit

    def add_peer(self, peer: Peer, pieces: Iterable[int] | bytes | int | None = None) -> None:
        """A peer connected, with its bitfield. Re-adding a peer replaces its bitfield."""
        if peer in self.peers:
            self.remove_peer(peer)
        mask = mask_of(pieces, self.n)
        self.peers[peer] = 0
        self.peer_reqs[peer] = set()
        for i in bits_of(mask):
            self.peer_has(peer, i)

    def peer_has(self, peer: Peer, index: int) -> bool:
        """The peer now has piece `index`. True if it is a piece we want (the peer became more interesting)."""
        m = self.peers.get(peer)
        if m is None or not 0 <= index < self.n:
            return False
        bit = 1 << index
        if m & bit:
            return False
        self.peers[peer] = m | bit
        a = self.avail[index]
        self.avail[index] = a + 1
        if self.wanted & bit:
            self._move(index, bit, a, a + 1)
            return True
        return False

    def peer_lost(self, peer: Peer, index: int) -> None:
        """The peer no longer has piece `index` (it said so when asked: it discarded the piece)."""
        m = self.peers.get(peer)
        if m is None or not 0 <= index < self.n:
            return
        bit = 1 << index
        if not m & bit:
            return
        self.peers[peer] = m & ~bit
        a = self.avail[index]
        self.avail[index] = a - 1
        if self.wanted & bit:
            self._move(index, bit, a, a - 1)

    def remove_peer(self, peer: Peer) -> list[int]:
        """The peer is gone. Returns the pieces that were in flight from it (now back in the pool)."""
        m = self.peers.pop(peer, None)
        if m is None:
            return []
        for i in bits_of(m):
            bit = 1 << i
            a = self.avail[i]
            self.avail[i] = a - 1
            if self.wanted & bit:
                self._move(i, bit, a, a - 1)
        reqs = sorted(self.peer_reqs.pop(peer, ()))
        for i in reqs:
            self._drop_request(peer, i)
        self.limits.pop(peer, None)
        return reqs

    # --- picking -------------------------------------------------------------------------------------------
    def _random_bit(self, c: int) -> int:
        cnt = c.bit_count()
        if cnt > 1:
            for _ in range(self.rng.randrange(cnt)):
                c &= c - 1
        return (c & -c).bit_length() - 1

    def endgame(self) -> bool:
        """Every missing piece is in flight."""
        return self.wanted != 0 and self.wanted & ~self.inflight_mask == 0

    def pick(self, peer: Peer, slots: int | None = None) -> list[int]:
        """Pieces to request from `peer` now (rarest first), recorded as in flight. May be empty."""
        m = self.peers.get(peer)
        if m is None:
            return []
        reqs = self.peer_reqs[peer]
        limit = self.limits.get(peer, self.pipeline) if slots is None else slots
        free = limit - len(reqs)
        if free <= 0:
            return []
        out: list[int] = []
        cand = m & self.wanted & self.known & ~self.inflight_mask
        buckets = self._buckets
        while free > 0 and cand:
            for a in range(1, len(buckets)):
                c = buckets[a] & cand
                if c:
                    break
            else:  # pragma: no cover - a piece the peer has is in a bucket >= 1
                break
            i = self._random_bit(c)
            cand &= ~(1 << i)
            self._add_request(peer, i)
            out.append(i)
            free -= 1
        if free > 0 and self.endgame():
            cand = m & self.wanted & self.known
            for i in bits_of(cand):
                if free <= 0:
                    break
                asked = self.inflight.get(i, ())
                if i in reqs or len(asked) >= self.endgame_dups:
                    continue
                self._add_request(peer, i)
                out.append(i)
                free -= 1
        return out

    def assign(self, peer: Peer, index: int) -> None:
        """Record a request the caller chose itself (e.g. the upstream stream, or a re-request)."""
        if peer not in self.peer_reqs:
            self.peer_reqs[peer] = set()
        if index not in self.peer_reqs[peer]:
            self._add_request(peer, index)

    def _add_request(self, peer: Peer, i: int) -> None:
        self.peer_reqs[peer].add(i)
        lst = self.inflight.get(i)
        if lst is None:
            self.inflight[i] = [peer]
            self.inflight_mask |= 1 << i
        else:
            lst.append(peer)

    def _drop_request(self, peer: Peer, i: int) -> None:
        lst = self.inflight.get(i)
        if lst is None:
            return
        try:
            lst.remove(peer)
        except ValueError:
            return
        if not lst:
            del self.inflight[i]
            self.inflight_mask &= ~(1 << i)

    # --- outcomes ------------------------------------------------------------------------------------------
    def received(self, peer: Peer, index: int) -> list[Peer]:
        """Piece `index` arrived from `peer` and verified. Returns the other peers it was asked of (cancel them)."""
        bit = 1 << index
        losers = [p for p in self.inflight.pop(index, ()) if p != peer]
        self.inflight_mask &= ~bit
        for p in losers:
            self.peer_reqs[p].discard(index)
        reqs = self.peer_reqs.get(peer)
        if reqs is not None:
            reqs.discard(index)
        if self.wanted & bit:
            self.wanted &= ~bit
            self._buckets[self.avail[index]] &= ~bit
            self.have_mask |= bit
        return losers

    def failed(self, peer: Peer, index: int) -> None:
        """The request of `index` from `peer` is over without the piece (bad hash, timeout, cancel)."""
        reqs = self.peer_reqs.get(peer)
        if reqs is not None and index in reqs:
            reqs.discard(index)
            self._drop_request(peer, index)

    def discard(self, index: int) -> None:
        """A piece we had is thrown away (the whole-blob digest failed): wanted again."""
        bit = 1 << index
        if self.have_mask & bit:
            self.have_mask &= ~bit
            self.wanted |= bit
            a = self.avail[index]
            if a >= len(self._buckets):
                self._buckets.extend([0] * (a + 1 - len(self._buckets)))
            self._buckets[a] |= bit

    def first_wanted(self, free_only: bool = True, no_peer: bool = False) -> int | None:
        """Lowest wanted piece (not in flight if free_only; if no_peer, one no connected peer can give us: none
        has it, or its hash is not known, so no copy of it could be checked)."""
        c = self.wanted
        if free_only:
            c &= ~self.inflight_mask
        if no_peer:
            c &= self._buckets[0] | ~self.known
        if not c:
            return None
        return (c & -c).bit_length() - 1
