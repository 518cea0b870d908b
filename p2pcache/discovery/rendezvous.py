"""Rendezvous (highest-random-weight) hashing: which few members are responsible for a key.

Rules:
- A pure function of (key, members, k). No clock, no sockets, no randomness beyond a fixed hash, so every node
  that sees the same membership computes the same owners.
- Stable under churn: a member joining only takes over the keys for which it now ranks in the top k, and a member
  leaving only hands its keys to the next in rank. Nobody else's keys move.

Theory of operation: every (key, member) pair gets a 64-bit weight from BLAKE2b(key NUL member). The owners of a
key are the k members with the highest weights, best first. The first owner is the key's primary (for example the
tracker shard that grants the upstream claim for a digest); the others are replicas asked when it does not answer.
Cost is O(len(members)) per lookup; with a few thousand members that is well under a millisecond, and callers that
look up often can cache by (key, membership version).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable

__all__ = ["owners", "weight"]


def _b(x: str | bytes) -> bytes:
    return x if isinstance(x, bytes) else x.encode()


def weight(key: str | bytes, member: str | bytes) -> int:
    """The pair's weight: a 64-bit integer, uniform over members for a fixed key."""
    h = hashlib.blake2b(_b(key) + b"\0" + _b(member), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def owners(key: str | bytes, members: Iterable[str], k: int = 3) -> list[str]:
    """The k members responsible for `key`, highest weight first (fewer if there are fewer members).

    Duplicates in `members` count once. Ties (a 64-bit collision) are broken by the member name, so the answer is
    the same everywhere.
    """
    if k <= 0:
        return []
    kb = _b(key) + b"\0"
    scored = (
        (int.from_bytes(hashlib.blake2b(kb + _b(m), digest_size=8).digest(), "big"), m)
        for m in set(members)
    )
    return [m for _, m in heapq.nlargest(k, scored)]
