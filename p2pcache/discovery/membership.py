"""Who is in the cluster, and who is alive: a gossip-style member table with failure detection.

Sans-IO: the table changes only through the events below, each given the current time (`now`, seconds on any
monotonic clock). It never opens a socket, reads a clock or sleeps; `discovery/gossip.py` feeds it from trio and the
simulator could feed it from virtual time.

Theory of operation
-------------------
Every node keeps a heartbeat counter that it bumps on each `tick` and spreads in its gossip; it starts at a value
derived from the wall clock at start-up (given by the driver), so a restarted node's heartbeat is always higher
than the one the cluster remembers. A member's entry is *refreshed* (`updated = now`) when we hear from it directly
(`heard`) or when gossip carries a heartbeat higher than the one we hold (`merge`). A member not refreshed for
`suspect_after` seconds becomes SUSPECT, for `dead_after` seconds DEAD, and is forgotten `forget_after` seconds
later (kept that long so stale gossip cannot resurrect it). A direct failure to reach a member (`unreachable`)
makes it SUSPECT at once: the swarm stops routing to it without waiting a full timeout, and a fresher heartbeat
from anyone brings it back. Only ALIVE members count for rendezvous (`live()`), so tracker ownership moves off
a failed node within `suspect_after` seconds.

Transitions (the whole state machine):

    any state  --heard / fresher heartbeat-->  ALIVE
    ALIVE      --unreachable-->                SUSPECT
    ALIVE      --no refresh for suspect_after--> SUSPECT
    SUSPECT    --no refresh for dead_after-->  DEAD
    DEAD       --no refresh for forget_after--> (removed)
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

SUSPECT_AFTER = 3.0  # three missed gossip rounds (1 s apart): a slow round is not a death
DEAD_AFTER = 6.0  # twice that: long enough for a GC pause, short enough that a claim moves on quickly
FORGET_AFTER = 60.0  # remember the dead a while, so old gossip cannot bring them back
# Gossip is taken from any member, so what one frame can do is bounded (found in review: 100 frames of forged
# members grew a node's table to 409,600 entries it dialled and handed tracker ownership to):
MAX_MEMBERS = 20_000  # entries learnt from gossip beyond this are ignored (heard-from members still count)
GOSSIP_ENTRIES = 4096  # entries per gossip frame (wire.py's limit): a random sample in a larger cluster


class State(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass
class Member:
    node: str
    addr: str
    zone: str | None
    heartbeat: int
    state: State
    updated: float  # `now` of the last refresh


class Membership:
    """The member table of one node (which is itself a member, always ALIVE)."""

    def __init__(self, node: str, addr: str, zone: str | None, heartbeat: int = 0, *,
                 suspect_after: float = SUSPECT_AFTER, dead_after: float = DEAD_AFTER,
                 forget_after: float = FORGET_AFTER) -> None:
        self.me = Member(node, addr, zone, heartbeat, State.ALIVE, 0.0)
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.forget_after = forget_after
        self.members: dict[str, Member] = {}
        self._last_tick: float | None = None
        # Bumped whenever a member becomes ALIVE (new or back): rendezvous ownership may have moved, and the
        # driver re-announces what it holds to the new owners without waiting for its next round.
        self.joined = 0

    # -- events --------------------------------------------------------------------------------------------
    def tick(self, now: float) -> list[tuple[str, State | None]]:
        """Bump our heartbeat and age the others. Returns the (node, new state or None if forgotten) changes.

        A gap of `suspect_after` or more since our last tick is our own absence (the process was stopped or
        starved), not everyone else's: the others get a full window from now to be heard from again. Aged by
        it, every member went DEAD at once when a stopped node resumed, it took tracker ownership of every
        digest for itself and granted itself claims the cluster already held (found in review: a SIGSTOP of
        10 s, then a second upstream fetch)."""
        if self._last_tick is not None and now - self._last_tick >= self.suspect_after:
            for m in self.members.values():  # a full window to hear from each again (gossip takes a round or two)
                if m.state is not State.DEAD:
                    m.updated = now
        self._last_tick = now
        self.me.heartbeat += 1
        self.me.updated = now
        changes: list[tuple[str, State | None]] = []
        for node, m in list(self.members.items()):
            age = now - m.updated
            if m.state is State.DEAD:
                if age >= self.dead_after + self.forget_after:
                    del self.members[node]
                    changes.append((node, None))
            elif age >= self.dead_after:
                m.state = State.DEAD
                changes.append((node, State.DEAD))
            elif age >= self.suspect_after and m.state is State.ALIVE:
                m.state = State.SUSPECT
                changes.append((node, State.SUSPECT))
        return changes

    def heard(self, node: str, addr: str, zone: str | None, now: float) -> bool:
        """A message came from `node` itself (after a good handshake). Returns True if it is new or revived."""
        if node == self.me.node:
            return False
        m = self.members.get(node)
        if m is None:
            self.members[node] = Member(node, addr, zone, 0, State.ALIVE, now)
            self.joined += 1
            return True
        revived = m.state is not State.ALIVE
        m.addr, m.zone, m.state, m.updated = addr, zone, State.ALIVE, now
        self.joined += revived
        return revived

    def merge(self, entries: Iterable[list[Any] | tuple[Any, ...]], now: float,
              max_heartbeat: int | None = None) -> list[str]:
        """Gossip from a peer: [[node, addr, zone, heartbeat], ...]. Returns nodes that became ALIVE.

        Second-hand news is bounded: a heartbeat above `max_heartbeat` (the driver's: no node's heartbeat runs
        ahead of the wall clock it starts from, plus skew) is ignored, or one forged entry of 2^62 would pin its
        address for good; a member we hold ALIVE keeps its address (only the member itself, `heard`, moves it;
        gossip only once we cannot reach it); and the table takes no new member beyond MAX_MEMBERS."""
        became: list[str] = []
        for node, addr, zone, heartbeat in entries:
            if node == self.me.node or (max_heartbeat is not None and heartbeat > max_heartbeat):
                continue
            m = self.members.get(node)
            if m is None:
                if len(self.members) >= MAX_MEMBERS:
                    continue
                self.members[node] = Member(node, addr, zone, heartbeat, State.ALIVE, now)
                became.append(node)
            elif heartbeat > m.heartbeat:
                if m.state is not State.ALIVE:
                    became.append(node)
                    m.addr, m.zone = addr, zone
                m.heartbeat, m.state, m.updated = heartbeat, State.ALIVE, now
        self.joined += len(became)
        return became

    def unreachable(self, node: str, now: float) -> bool:
        """We failed to reach `node` directly. Returns True if that changed its state."""
        m = self.members.get(node)
        if m is None or m.state is not State.ALIVE:
            return False
        m.state = State.SUSPECT
        # Its heartbeat must advance past what we hold to count again; `updated` stays, so it still ages out.
        return True

    # -- queries -------------------------------------------------------------------------------------------
    def live(self) -> list[Member]:
        """ALIVE members, this node included, sorted by node id (what rendezvous hashing runs over)."""
        out = [m for m in self.members.values() if m.state is State.ALIVE] + [self.me]
        return sorted(out, key=lambda m: m.node)

    def get(self, node: str) -> Member | None:
        return self.me if node == self.me.node else self.members.get(node)

    def is_live(self, node: str) -> bool:
        m = self.get(node)
        return m is not None and m.state is State.ALIVE

    def gossip_entries(self, rng: random.Random | None = None) -> list[list[Any]]:
        """What we tell others: ourselves and everyone not DEAD (the dead age out on their own elsewhere). In a
        cluster of more than GOSSIP_ENTRIES members, ourselves and a random sample (`rng`) of the others: one
        frame carries no more, and a node that could not encode its gossip was soon taken for dead."""
        out = [[self.me.node, self.me.addr, self.me.zone, self.me.heartbeat]]
        others = [[m.node, m.addr, m.zone, m.heartbeat] for m in self.members.values() if m.state is not State.DEAD]
        if len(others) >= GOSSIP_ENTRIES:
            others = (rng or random.Random()).sample(others, GOSSIP_ENTRIES - 1)
        return out + others
