import random

import pytest

from p2pcache.swarm.scheduler import (
    DRAIN_REFUSALS,
    UPSTREAM,
    AskClaim,
    Ban,
    BanList,
    Cancel,
    Done,
    DownloadScheduler,
    FetchUpstream,
    Request,
    SchedulerConfig,
    Serve,
    StopUpstream,
    UploadSlots,
    source_shares,
)

MiB = 1 << 20


def sched(n=8, **kw):
    cfg = SchedulerConfig(**kw)
    return DownloadScheduler(n * MiB, MiB, rng=random.Random(0), zone="z1", config=cfg)


def reqs(decisions):
    return [(d.peer, d.index) for d in decisions if isinstance(d, Request)]


def test_claim_holder_streams_everything_from_upstream_once():
    s = sched(4)
    assert s.start(0) == [AskClaim()]
    assert s.claim_granted(0.1) == [FetchUpstream(0, "claim")]
    for i in range(3):
        assert s.upstream_progress(i, MiB, 1 + i) == []
    assert s.upstream_progress(3, MiB, 5) == [Done()]
    assert s.bytes_from_upstream == 4 * MiB and s.bytes_from_peers == 0


def test_a_peer_claiming_pieces_nobody_could_check_does_not_hold_back_the_claim_holders_stream():
    """A member sent a bitfield of all ones for a blob whose hashes nobody had published: the first holder
    counted those pieces as available from a peer, streamed none of them, and waited for the 60 s stall
    fallback (found in review, with a real node)."""
    s = DownloadScheduler(4 * MiB, MiB, rng=random.Random(0), zone="z1", known=[])
    s.start(0)
    assert reqs(s.peer_added("liar", "z1", [0, 1, 2, 3], 0.05)) == []  # nothing it has can be checked
    assert s.claim_granted(0.1) == [FetchUpstream(0, "claim")]
    for i in range(3):
        assert s.upstream_progress(i, MiB, 1 + i) == []  # the stream goes on past what the liar "has"
    assert s.upstream_progress(3, MiB, 5) == [Done()]


def test_a_claim_lost_at_renewal_stops_the_upstream_stream_and_the_new_holder_serves_the_rest():
    s = sched(6, pipeline=2)
    s.start(0)
    assert s.claim_granted(0.1) == [FetchUpstream(0, "claim")]
    s.upstream_progress(0, MiB, 1)
    s.upstream_progress(1, MiB, 2)
    assert s.upstream == 2
    # the renewal's answer: another node got the claim from the tracker's new owner
    out = s.claim_denied("new", 3)
    assert StopUpstream() in out and s.upstream is None
    assert s.claim == "denied"
    # the rest comes from the new holder (piece 2 is no longer in flight from upstream)
    out = s.peer_added("new", "z1", [2, 3], 3.1)
    assert sorted(reqs(out)) == [("new", 2), ("new", 3)]
    # a piece the stopped stream still finishes is kept, and nothing starts another stream
    assert all(not isinstance(d, FetchUpstream) for d in s.upstream_progress(2, MiB, 3.2))
    assert s.picker.have(2)


def test_a_node_with_nothing_in_flight_wakes_for_the_next_busy_back_off():
    """Every peer said "busy"; the first back-off's wake-up found the others still backing off, and nothing
    was armed for them: the node sat idle until the stall fallback, 60 s, then went upstream (found in review)."""
    s = sched(4, busy_backoff=0.02)
    s.start(0)
    s.claim_denied("x", 0)
    out = s.peer_added("a", "z1", [0, 1, 2, 3], 0) + s.peer_added("b", "z1", [0, 1, 2, 3], 0)
    for p, i in reqs(out):
        s.piece_refused(p, i, 1.0 if p == "a" else 1.01)  # a busy until 1.02, b until 1.03
    s.peer_gone("a", 1.015)
    assert s.next_deadline() == pytest.approx(1.02)
    assert reqs(s.tick(1.025)) == []  # b still backs off, and nothing is in flight
    assert s.next_deadline() == pytest.approx(1.03)  # so b's back-off has a wake-up of its own
    assert {p for p, _ in reqs(s.tick(1.035))} == {"b"}


def test_the_last_delivery_in_flight_arms_the_wake_up_for_a_backing_off_peer():
    """The same idle node in another order of events: the wake-up fired while a piece was still in flight (so
    it was not re-armed), then that piece arrived while b still backed off (found in review of the first fix)."""
    s = sched(4, busy_backoff=0.02)
    s.start(0)
    s.claim_denied("x", 0)
    out = s.peer_added("c", "z1", [0], 0) + s.peer_added("a", "z1", [0, 1, 2, 3], 0)
    out += s.peer_added("b", "z1", [0, 1, 2, 3], 0)
    from_c = [(p, i) for p, i in reqs(out) if p == "c"]
    for p, i in reqs(out):
        if p != "c":
            s.piece_refused(p, i, 1.0 if p == "a" else 1.01)  # a busy until 1.02, b until 1.03
    s.peer_gone("a", 1.015)
    assert reqs(s.tick(1.025)) == []  # c's piece is still in flight
    for p, i in from_c:
        s.piece_received(p, i, True, MiB, 1.026)  # now nothing is
    assert s.next_deadline() == pytest.approx(1.03)  # it was 5 s, and the node idled until the stall fallback
    assert {p for p, _ in reqs(s.tick(1.035))} == {"b"}


def test_a_second_refusing_peer_is_asked_again_while_the_first_delivers():
    """Two holders said "busy" at once; the first one's back-off ended, it was asked and kept delivering, and
    nothing woke the node for the second's: it stayed idle for the rest of the layer (simulations/
    monotonicity.py: 3 nodes, one read a whole layer from one of its two holders, 8.9 s behind a 20 MB/s
    registry and 13.5 s behind a 40 MB/s one)."""
    s = sched(64, busy_backoff=0.02)
    s.start(0)
    s.claim_denied("x", 0)
    out = s.peer_added("a", "z1", range(64), 0) + s.peer_added("b", "z1", range(64), 0)
    for p, i in reqs(out):
        s.piece_refused(p, i, 1.0 if p == "a" else 1.01)  # a busy until 1.02, b until 1.03
    assert s.next_deadline() == pytest.approx(1.02)
    asked = reqs(s.tick(1.02))
    assert {p for p, _ in asked} == {"a"}
    assert s.next_deadline() == pytest.approx(1.03)  # b's back-off: there is room for another source
    t = 1.025
    for p, i in asked:  # a delivers, and is asked for more
        s.piece_received(p, i, True, MiB, t)
    assert {p for p, _ in reqs(s.tick(1.03))} == {"b"}


def test_a_refusing_peer_of_another_zone_is_not_woken_for():
    """... but a far peer's back-off is no reason to wake: it is taken when a fill finds no near one."""
    s = sched(64, busy_backoff=0.02)
    s.start(0)
    s.claim_denied("x", 0)
    out = s.peer_added("a", "z1", range(64), 0) + s.peer_added("far", "z2", range(64), 0)
    for p, i in reqs(out):
        s.piece_refused(p, i, 1.0 if p == "a" else 1.01)
    assert {p for p, _ in reqs(s.tick(1.02))} == {"a"}
    assert s.next_deadline() != pytest.approx(1.03)


def test_denied_node_downloads_from_peers_rarest_first_and_finishes():
    s = sched(4, pipeline=2)
    s.start(0)
    assert s.claim_denied("seed", 0.1) == []
    out = s.peer_added("seed", "z1", [0, 1], 0.2)
    assert sorted(reqs(out)) == [("seed", 0), ("seed", 1)]
    out = s.piece_received("seed", 0, True, MiB, 0.5)
    assert reqs(out) == []  # nothing else to ask for yet
    out = s.peer_has("seed", 2, 0.6)
    assert reqs(out) == [("seed", 2)]
    s.piece_received("seed", 1, True, MiB, 0.7)
    s.peer_has("seed", 3, 0.8)
    s.piece_received("seed", 2, True, MiB, 0.9)
    out = s.piece_received("seed", 3, True, MiB, 1.0)
    assert Done() in out and s.done


def test_bad_piece_bans_the_peer_and_asks_elsewhere():
    bans = BanList()
    s = DownloadScheduler(2 * MiB, MiB, rng=random.Random(1), bans=bans,
                          config=SchedulerConfig(pipeline=2))
    s.start(0)
    s.claim_denied("x", 0)
    s.peer_added("liar", None, [0, 1], 0)
    s.peer_added("good", None, [0, 1], 0)
    out = s.piece_received("liar", 0, False, MiB, 1)
    assert any(isinstance(d, Ban) and d.peer == "liar" and d.until == 601 for d in out)
    assert "liar" not in s.peers and bans.banned("liar", 2)
    assert s.peer_added("liar", None, [0, 1], 2) == []  # refused while banned
    assert "liar" not in s.peers
    s.tick(2)
    pending = set(s.peers["good"].reqs)
    assert pending == {0, 1}


def test_late_request_moves_to_another_peer_but_not_when_nobody_else_has_it():
    s = sched(3, pipeline=1, few_peers=0, timeout_min=5, silence_timeout=100)
    s.start(0)
    s.claim_denied("x", 0)
    (p, i), = reqs(s.peer_added("slow", None, [0], 0))
    out = s.tick(6)
    assert reqs(out) == [] and not any(isinstance(d, Cancel) for d in out)  # nobody else has piece 0
    s.peer_added("fast", None, [0, 1, 2], 6)
    out = s.tick(12)
    assert Cancel("slow", 0) in out


def test_few_peers_get_deep_pipelines_many_peers_the_default():
    s = sched(16, pipeline=1, few_peers=2, deep_pipeline=4)
    s.start(0)
    s.claim_denied("x", 0)
    everything = list(range(16))
    assert len(reqs(s.peer_added("a", None, everything, 0))) == 4  # alone: four in flight
    s.peer_added("b", None, everything, 0)
    assert len(s.peers["b"].reqs) == 4
    s.peer_added("c", None, everything, 0)  # three peers: back to one each, as pieces come in
    for peer in ("a", "b"):
        for i in list(s.peers[peer].reqs):
            s.piece_received(peer, i, True, MiB, 1)
    assert len(s.peers["a"].reqs) == 1 and len(s.peers["b"].reqs) == 1 and len(s.peers["c"].reqs) == 1
    s.peer_gone("c", 2)  # two again: deep once more
    for i in list(s.peers["a"].reqs):
        s.piece_received("a", i, True, MiB, 3)
    assert len(s.peers["a"].reqs) == 4


def test_silent_peer_is_snubbed_and_dead_peer_releases_pieces_at_once():
    s = sched(2, pipeline=2, timeout_min=5, silence_timeout=10)
    s.start(0)
    s.claim_denied("x", 0)
    s.peer_added("a", None, [0, 1], 0)
    out = s.tick(10)
    assert {d for d in out if isinstance(d, Cancel)} == {Cancel("a", 0), Cancel("a", 1)}
    s2 = sched(2, pipeline=2)
    s2.start(0)
    s2.claim_denied("x", 0)
    s2.peer_added("a", None, [0, 1], 0)
    s2.peer_added("b", None, [0, 1], 0)  # a took both pieces; b duplicates them (endgame)
    s2.peer_gone("a", 1)
    assert set(s2.peers["b"].reqs) == {0, 1} and s2.picker.inflight == {0: ["b"], 1: ["b"]}


def test_endgame_cancels_the_loser():
    s = sched(1, pipeline=1)
    s.start(0)
    s.claim_denied("x", 0)
    assert reqs(s.peer_added("a", None, [0], 0)) == [("a", 0)]
    assert reqs(s.peer_added("b", None, [0], 0)) == [("b", 0)]
    out = s.piece_received("b", 0, True, MiB, 1)
    assert Cancel("a", 0) in out and Done() in out


def test_takeover_holder_fetches_only_what_the_swarm_lacks():
    s = sched(4, pipeline=4)
    s.start(0)
    s.claim_denied("old", 0)
    s.peer_added("old", None, [0, 1], 0)
    s.peer_added("p", None, [0, 1], 0)  # the old holder spread pieces 0 and 1 before dying
    s.peer_gone("old", 1)
    out = s.tick(1)
    assert AskClaim() in out
    out = s.claim_granted(2)
    assert out == [FetchUpstream(2, "claim")]
    out = s.upstream_progress(2, MiB, 3)
    assert out == []  # 3 is next and nobody has it
    s.piece_received("p", 0, True, MiB, 3)
    s.piece_received("p", 1, True, MiB, 3)
    assert s.upstream_progress(3, MiB, 4) == [Done()]
    assert s.bytes_from_upstream == 2 * MiB


def test_stall_falls_back_to_upstream():
    s = sched(2, stall_timeout=30)
    s.start(0)
    s.claim_denied("x", 0)
    assert s.next_deadline() <= 30
    out = s.tick(31)
    assert FetchUpstream(0, "stall") in out


def test_a_tick_at_the_stall_deadline_falls_back_whatever_the_rounding():
    """next_deadline() said last_progress + stall_timeout; tick() tested now - last_progress >= stall_timeout.
    With last_progress 34.38802240020318 the deadline is 94.38802240020317 and the difference 59.99999999999999:
    the tick at the deadline did nothing and the deadline stayed due, and the simulator spun at that instant for
    ever (found in review: 10 nodes, 2 MB/s up, 16 MiB pieces)."""
    s = sched(2, stall_timeout=60, claim_retry=1000)  # the claim's retry must not come first
    s.start(0)
    s.claim_denied("x", 0)
    s.last_progress = 34.38802240020318
    due = s.next_deadline()
    assert due == 34.38802240020318 + 60 and due - s.last_progress < 60  # the rounding that bit
    assert FetchUpstream(0, "stall") in s.tick(due)
    assert s.next_deadline() > due


def test_pieces_only_requested_once_their_hash_is_known():
    s = DownloadScheduler(3 * MiB, MiB, rng=random.Random(0), known=0)
    s.start(0)
    s.claim_denied("x", 0)
    assert reqs(s.peer_added("a", None, [0, 1, 2], 0)) == []
    assert reqs(s.piece_known(1, 1)) == [("a", 1)]


def test_upstream_stop_when_peers_have_the_rest():
    s = sched(3, pipeline=1)
    s.start(0)
    s.claim_granted(0)
    s.peer_added("p", None, [1], 0)  # piece 1 is out there; the stream should skip it
    out = s.upstream_progress(0, MiB, 1)
    assert StopUpstream() in out and FetchUpstream(2, "claim") in out
    assert s.picker.inflight.get(1) == ["p"]
    assert s.picker.inflight.get(2) == [UPSTREAM]


def test_upload_slots_refuse_when_full_by_default():
    u = UploadSlots(slots=1)
    assert u.request("a", "d", 0) == [Serve("a", "d", 0)]
    assert u.request("b", "d", 0) is None
    assert u.finished("a", "d", 0) == []
    assert u.request("b", "d", 0) == [Serve("b", "d", 0)]


def test_a_second_peer_gets_one_slot_beyond_them_when_one_peer_holds_every_slot_of_a_link_with_room():
    """One peer with a slow download held all four slots of a fast uploader, whose link then sat mostly idle
    while the others were told "busy" (UploadSlots._guest)."""
    u = UploadSlots(slots=2)
    assert u.request("a", "d", 0) == [Serve("a", "d", 0)]
    assert u.request("a", "d", 1) == [Serve("a", "d", 1)]
    assert u.request("b", "d", 2) is None  # the link is full: no guest
    assert u.request("a", "d", 3, spare=True) is None  # the peer holding the slots gets no more
    assert u.request("b", "d", 2, spare=True) == [Serve("b", "d", 2)]
    assert u.request("b", "d", 4, spare=True) is None  # one guest slot per peer
    assert u.request("c", "d", 5, spare=True) is None  # two peers hold slots: no guest
    assert u.finished("a", "d", 0) == []  # three running on two slots: nothing starts
    assert u.finished("b", "d", 2) == []
    assert u.request("c", "d", 5) == [Serve("c", "d", 5)]


def test_upload_slots_least_served_piece_first():
    u = UploadSlots(slots=1, queue=4)
    assert u.request("a", "d", 0) == [Serve("a", "d", 0)]
    assert u.request("b", "d", 0) == []
    assert u.request("c", "d", 1) == []
    assert u.finished("a", "d", 0) == [Serve("c", "d", 1)]  # piece 1 was never sent, piece 0 was


def test_while_streaming_from_upstream_each_piece_goes_out_once_before_any_goes_twice():
    u = UploadSlots(slots=4)
    u.fresh("d", 0)
    u.fresh("d", 1)
    assert u.request("a", "d", 0) == [Serve("a", "d", 0)]
    assert u.request("b", "d", 0) is None  # piece 1 has not gone out once: no second copy of 0 (slots are free)
    assert u.request("x", "other", 5) == [Serve("x", "other", 5)]  # another blob is not held back
    assert u.request("b", "d", 1) == [Serve("b", "d", 1)]
    assert u.request("c", "d", 0) == [Serve("c", "d", 0)]  # every fresh piece sent once: copies again
    u.fresh("d", 2)
    u.fresh("d", 0)  # sent already: not fresh again
    assert u.request("e", "d", 1) is None
    u.stream_ended("d")  # the stream is over, but piece 2 has not gone out once: it still goes first
    assert u.finished("x", "other", 5) == []
    assert u.request("e", "d", 1) is None
    assert u.request("f", "d", 2) == [Serve("f", "d", 2)]
    assert u.finished("a", "d", 0) == []  # (all 4 slots were taken)
    assert u.request("e", "d", 1) == [Serve("e", "d", 1)]  # every piece went out once: copies again


def test_after_the_stream_the_first_copies_rule_lasts_until_nobody_wants_the_waiting_pieces():
    # 10 nodes, one 80 MB layer, 10 MB/s uploads: a 20 MB/s registry's stream ended at 4 s with half the pieces
    # not sent once, and second copies sent then made the rollout 9.21 s instead of 8.75 s (a 10 MB/s registry)
    u = UploadSlots(slots=4)
    for i in range(3):
        u.fresh("d", i)
    assert u.request("a", "d", 0) == [Serve("a", "d", 0)]
    u.finished("a", "d", 0)
    u.stream_ended("d")
    for _ in range(DRAIN_REFUSALS - 1):
        assert u.request("b", "d", 0) is None
    assert u.request("c", "d", 1) == [Serve("c", "d", 1)]  # a first copy: the count starts over
    u.finished("c", "d", 1)
    for _ in range(DRAIN_REFUSALS):
        assert u.request("b", "d", 0) is None
    # piece 2 got to the others another way (a second upstream fetch): a peer that can get piece 0 only here
    # is not refused for ever
    assert u.request("b", "d", 0) == [Serve("b", "d", 0)]
    u.fresh("d", 3)  # a new stream of it: the rule holds again
    assert u.request("e", "d", 1) is None


def test_upload_slots_first_come_first_served():
    u = UploadSlots(slots=2, per_peer=2, queue=8)
    assert u.request("a", "d", 0) == [Serve("a", "d", 0)]
    assert u.request("b", "d", 0) == [Serve("b", "d", 0)]
    assert u.request("c", "d", 0) == []
    assert u.request("c", "d", 1) == []
    assert u.request("c", "d", 2) is None  # per-peer queue bound
    assert u.cancel("c", "d", 0) == []
    assert u.finished("a", "d", 0) == [Serve("c", "d", 1)]
    assert u.peer_gone("b") == []


def test_a_piece_read_ahead_after_stop_upstream_still_counts():
    s = sched(3, pipeline=1)
    s.start(0)
    s.claim_granted(0)
    s.peer_added("p", None, [1], 0)
    s.upstream_progress(0, MiB, 1)  # -> StopUpstream (1 is out there), FetchUpstream(2)
    out = s.upstream_progress(1, MiB, 1.1)  # the driver had already read piece 1 ahead
    assert Cancel("p", 1) in out and s.picker.have(1)
    assert s.upstream_progress(2, MiB, 2) == [Done()]


def test_a_peer_that_no_longer_holds_a_piece_is_not_asked_for_it_again():
    s = sched(2, pipeline=1, few_peers=0)
    s.start(0)
    s.claim_denied("x", 0)
    asked = reqs(s.peer_added("a", None, [0, 1], 0))
    (peer, i), = asked
    out = s.piece_not_held("a", i, 0.1)
    assert (peer, i) not in reqs(out)  # not asked again at once ...
    assert s.picker.avail[i] == 0
    for t in (0.7, 1.5, 3.0):  # ... nor after any busy back-off
        assert ("a", i) not in reqs(s.tick(t))
    assert ("b", i) in reqs(s.peer_added("b", None, [i], 3.1))  # another holder gets the request


def test_a_nodes_sources_are_split_among_its_downloads_oldest_first():
    assert source_shares(4, 0) == []
    assert source_shares(4, 1) == [4]
    assert source_shares(4, 2) == [2, 2]
    assert source_shares(4, 3) == [2, 1, 1]
    assert source_shares(4, 6) == [1] * 6  # every download keeps one source
    assert source_shares(5, 2) == [3, 2]


def test_a_smaller_share_takes_no_new_source_and_a_larger_one_is_used_at_once():
    s = sched(32, max_sources=4)
    s.start(0)
    s.claim_denied("x", 0)
    assert s.set_max_sources(2, 0) == []  # nothing asked yet
    everything = list(range(32))
    for peer in "abcdef":
        s.peer_added(peer, None, everything, 0)
    assert len(s._active) == 2  # two sources, though six peers hold everything
    out = s.set_max_sources(4, 1)
    assert len({p for p, _ in reqs(out)}) == 2 and len(s._active) == 4  # two more at once
    assert s.set_max_sources(1, 2) == []  # no request is withdrawn...
    assert len(s._active) == 4
    for peer in list(s._active):
        for i in list(s.peers[peer].reqs):
            s.piece_received(peer, i, True, MiB, 3)
    assert len(s._active) == 1  # ...but as pieces come in, only one source is asked again


def test_a_busy_peer_is_asked_again_soon_until_a_rate_is_measured_then_after_one_piece_time():
    s = sched(16, busy_backoff=0.02, busy_backoff_max=0.5, few_peers=0)
    s.start(0)
    s.claim_denied("holder", 0)
    everything = list(range(16))
    [(_, i)] = reqs(s.peer_added("holder", None, everything, 0))
    s.piece_refused("holder", i, 0.0)
    assert s.peers["holder"].busy_until == 0.02  # nothing measured: not half a second at the assumed 4 MB/s
    assert s.next_deadline() == 0.02
    [(_, j)] = reqs(s.tick(0.02))
    [(_, k)] = reqs(s.piece_received("holder", j, True, MiB, 0.27))  # 1 MiB in 0.25 s
    s.piece_refused("holder", k, 0.3)
    # one piece time at that rate (two made the claim holder's peers back off while its slots turned over)
    assert s.peers["holder"].busy_until == pytest.approx(0.3 + 0.25)
    assert reqs(s.tick(0.54)) == []
    assert [p for p, _ in reqs(s.tick(0.55))] == ["holder"]


def test_upload_counts_are_kept_for_the_most_recently_served_blobs_only(monkeypatch):
    from p2pcache.swarm import scheduler

    monkeypatch.setattr(scheduler, "SERVED_KEYS", 3)
    u = UploadSlots(slots=1)
    for key in ("a", "b", "c", "a", "d"):  # "a" served again: "b" is now the one served longest ago
        assert u.request("p", key, 0) == [Serve("p", key, 0)]
        u.finished("p", key, 0)
    assert list(u.served) == ["c", "a", "d"]
    assert u.times_served("a", 0) == 2 and u.times_served("b", 0) == 0


def test_an_upload_of_a_piece_not_held_is_not_counted():
    """A peer asking for indexes of a blob we lack must not grow the served counts (one entry per index)."""
    u = UploadSlots(slots=1)
    for i in range(1000):
        assert u.request("p", "x", i) == [Serve("p", "x", i)]
        u.not_held("x", i)  # the driver found no bytes for it
        u.finished("p", "x", i)
    assert "x" not in u.served
    u.request("p", "y", 0)
    u.finished("p", "y", 0)
    u.request("p", "y", 0)
    u.not_held("y", 0)
    u.finished("p", "y", 0)
    assert u.times_served("y", 0) == 1
