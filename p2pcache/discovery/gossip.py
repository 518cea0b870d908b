"""Trio driver of membership: reach the `--join` seeds, then gossip the member list to a few peers every second.

The member table and its failure detection are `membership.py`'s (sans-IO); this module only keeps time and
moves messages through the swarm's connection pool. It never decides who is alive by itself, and it never blocks
the caller: one slow or dead peer costs that peer's connect timeout in a task of its own, nothing else.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from p2pcache.discovery.membership import Membership
    from p2pcache.swarm.peer import PeerConnection

log = logging.getLogger(__name__)

GOSSIP_EVERY = 1.0  # seconds between rounds: failure detection (3 s suspect) needs a few rounds per timeout
FANOUT = 3  # peers told per round: a member list reaches n nodes in ~log3(n) rounds
SEED_RETRY = 2.0  # a seed that is not up yet is retried this often


class GossipDriver:
    """Owns the gossip rounds of one node. `connect_node`/`connect_addr` come from the SwarmService's pool."""

    def __init__(self, membership: Membership, seeds: list[str],
                 connect_node: Callable[[str], Awaitable[PeerConnection]],
                 connect_addr: Callable[[str], Awaitable[PeerConnection]],
                 on_change: Callable[[], None] | None = None, rng: random.Random | None = None) -> None:
        self.membership = membership
        self.seeds = list(dict.fromkeys(seeds))
        self.connect_node = connect_node
        self.connect_addr = connect_addr
        self.on_change = on_change or (lambda: None)
        self.rng = rng or random.Random()
        self._seed_wake = trio.Event()
        # seed address -> the node that answered there: a seed reached through another address than the one
        # its node advertises (a Service VIP, a host name, --advertise) is not dialled again while that node is
        # alive (it was, every SEED_RETRY, for good, each time a handshake the pool then refused)
        self._seed_nodes: dict[str, str] = {}

    def add_seeds(self, addrs: list[str]) -> None:
        """New seed addresses (from DNS): contacted at the next round if no known member has that address."""
        new = [a for a in addrs if a not in self.seeds]
        if new:
            self.seeds.extend(new)
            self._seed_wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._seed_loop)
            while True:
                changes = self.membership.tick(trio.current_time())
                if changes:
                    log.info("membership: %s", ", ".join(f"{n}={s.value if s else 'forgotten'}" for n, s in changes))
                    self.on_change()
                others = [m for m in self.membership.live() if m.node != self.membership.me.node]
                # suspects too: telling them is how they learn we think so, and a reply revives them
                others += [m for m in self.membership.members.values()
                           if m.state.value == "suspect"]
                for m in self.rng.sample(others, min(FANOUT, len(others))):
                    nursery.start_soon(self._tell, m.node)
                await trio.sleep(GOSSIP_EVERY)

    async def _tell(self, node: str) -> None:
        try:
            conn = await self.connect_node(node)
            conn.send("gossip", members=self.membership.gossip_entries(self.rng))
        except Exception as e:  # a peer we cannot reach is the membership's news, not an error here
            log.debug("gossip to %s failed: %s", node, e)

    async def _seed_loop(self) -> None:
        """Contact every seed whose address no live member has; forever, since seeds may come and go."""
        while True:
            known = {m.addr for m in self.membership.live()}
            todo = [a for a in self.seeds if a not in known and a != self.membership.me.addr
                    and not self.membership.is_live(self._seed_nodes.get(a, ""))]
            async with trio.open_nursery() as nursery:
                for addr in todo:
                    nursery.start_soon(self._contact_seed, addr)
            self._seed_wake = trio.Event()
            with trio.move_on_after(SEED_RETRY):
                await self._seed_wake.wait()

    async def _contact_seed(self, addr: str) -> None:
        try:
            conn = await self.connect_addr(addr)
            self._seed_nodes[addr] = conn.peer.node
            conn.send("gossip", members=self.membership.gossip_entries(self.rng))
        except Exception as e:
            log.debug("seed %s not reachable: %s", addr, e)
