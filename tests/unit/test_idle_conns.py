"""Which peer connections a node closes as idle (swarm/service.py: idle_connections)."""

from __future__ import annotations

from dataclasses import dataclass

from p2pcache.swarm.service import idle_connections


@dataclass(eq=False)
class Conn:
    name: str
    last_active: float
    outstanding: bool = False
    closed: bool = False

    def busy(self) -> bool:
        return self.outstanding


def test_only_unused_quiet_connections_with_nothing_outstanding_are_closed() -> None:
    quiet = Conn("quiet", last_active=0.0)
    recent = Conn("recent", last_active=250.0)  # a frame 50 s ago
    waiting = Conn("waiting", last_active=0.0, outstanding=True)  # a request or call of ours, or one of the peer's
    used = Conn("used", last_active=0.0)  # a download of ours has it among its peers
    gone = Conn("gone", last_active=0.0, closed=True)
    conns = [quiet, recent, waiting, used, gone]
    assert idle_connections(conns, {id(used)}, now=300.0, idle=300.0) == [quiet]
    assert idle_connections(conns, {id(used)}, now=299.0, idle=300.0) == []
