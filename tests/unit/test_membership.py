"""Member table: gossip spreads members, silence makes them suspect then dead, fresher heartbeats revive."""

from p2pcache.discovery.membership import Membership, State


def test_gossip_merge_and_failure_detection():
    m = Membership("a", "a:1", None, suspect_after=3, dead_after=6, forget_after=10)
    assert m.merge([["b", "b:1", None, 5], ["c", "c:1", "z", 1], ["a", "x", None, 99]], now=0) == ["b", "c"]
    assert [x.node for x in m.live()] == ["a", "b", "c"]
    assert m.tick(1) == m.tick(2) == []  # the driver ticks every second
    m.merge([["b", "b:1", None, 6]], now=2.5)  # b's heartbeat moves on, c's does not
    assert m.tick(3) == [("c", State.SUSPECT)]
    assert [x.node for x in m.live()] == ["a", "b"]
    m.merge([["c", "c:1", "z", 1]], now=4)  # stale gossip does not revive
    assert m.tick(4) == m.tick(5) == []
    assert sorted(m.tick(6)) == [("b", State.SUSPECT), ("c", State.DEAD)]
    assert m.merge([["c", "c:1", "z", 2]], now=7) == ["c"]  # a fresher heartbeat does
    assert m.is_live("c")


def test_our_own_pause_does_not_age_the_others():
    """A node stopped for 10 s (SIGSTOP, a starved host) heard nobody meanwhile: that is no news of them. Aged
    by it, every member went DEAD at once and the node owned every digest alone (found in review)."""
    m = Membership("a", "a:1", None, suspect_after=3, dead_after=6)
    m.merge([["b", "b:1", None, 5]], now=0)
    joined = m.joined
    for t in range(1, 3):
        assert m.tick(t) == []
    assert m.tick(12) == []  # back after 10 s away
    assert m.is_live("b") and m.joined == joined
    assert m.tick(13) == m.tick(14) == []  # a full window to hear from b again
    assert m.tick(15) == [("b", State.SUSPECT)]  # but silence after we are back counts again
    m.merge([["b", "b:1", None, 6]], now=15.5)
    assert m.is_live("b") and m.joined == joined + 1  # back: ownership may have moved, the driver re-announces


def test_unreachable_is_suspect_at_once_and_heard_revives():
    m = Membership("a", "a:1", None)
    m.heard("b", "b:1", None, now=0)
    assert m.unreachable("b", now=0.1)
    assert not m.is_live("b")
    m.heard("b", "b:1", None, now=0.2)
    assert m.is_live("b")


def test_dead_are_forgotten_and_not_gossiped():
    m = Membership("a", "a:1", None, suspect_after=1, dead_after=2, forget_after=3)
    m.heard("b", "b:1", None, now=0)
    m.tick(2)
    assert m.get("b").state is State.DEAD
    assert [e[0] for e in m.gossip_entries()] == ["a"]
    assert m.tick(5) == [("b", None)] and m.get("b") is None
    hb = m.me.heartbeat
    m.tick(6)
    assert m.me.heartbeat == hb + 1


def test_second_hand_news_is_bounded():
    """Gossip comes from any member: a forged heartbeat, an address for a live member and a flood of invented
    members do only so much (found in review: 409,600 forged members, a real member's address pinned)."""
    from p2pcache.discovery import membership as mod

    m = Membership("a", "a:1", None)
    m.heard("b", "10.0.0.2:5002", None, now=0)
    m.merge([["b", "203.0.113.66:22", None, 2**62]], now=1, max_heartbeat=1000)  # from the future: ignored
    assert m.get("b").addr == "10.0.0.2:5002" and m.get("b").heartbeat == 0
    m.merge([["b", "203.0.113.66:22", None, 7]], now=1, max_heartbeat=1000)  # fresher, but b is ALIVE here
    assert m.get("b").addr == "10.0.0.2:5002" and m.get("b").heartbeat == 7
    m.unreachable("b", now=2)  # once we cannot reach it, gossip may tell us where it is
    assert m.merge([["b", "10.0.0.9:5002", None, 8]], now=3, max_heartbeat=1000) == ["b"]
    assert m.get("b").addr == "10.0.0.9:5002"
    flood = [[f"f{i}", f"10.1.{i // 250}.{i % 250}:1", None, 1] for i in range(mod.MAX_MEMBERS + 500)]
    m.merge(flood, now=4)
    assert len(m.members) == mod.MAX_MEMBERS


def test_gossip_of_a_large_cluster_fits_one_frame():
    from p2pcache.discovery.membership import GOSSIP_ENTRIES
    from p2pcache.swarm.wire import FrameDecoder, encode

    m = Membership("a", "a:1", None)
    m.merge([[f"n{i}", f"10.2.{i // 250}.{i % 250}:5002", "zone-x", 5] for i in range(10_000)], now=0)
    entries = m.gossip_entries()
    assert len(entries) == GOSSIP_ENTRIES and entries[0][0] == "a"
    dec = FrameDecoder()
    dec.feed(encode("gossip", members=entries))
    assert len(next(dec.events())["members"]) == GOSSIP_ENTRIES


async def test_join_dns_names_resolve_to_peer_addresses():
    from p2pcache.discovery.dns import resolve, split_name

    assert split_name("peers.default.svc", 5002) == ("peers.default.svc", 5002)
    assert split_name("peers.default.svc:7000", 5002) == ("peers.default.svc", 7000)
    assert "127.0.0.1:5002" in await resolve("127.0.0.1", 5002)
