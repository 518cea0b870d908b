import random

import pytest

from p2pcache.swarm.tracker import ClaimGranted, ClaimHeld, Tracker

D = "sha256:" + "a" * 64


def test_first_asker_wins_and_others_are_told_who():
    t = Tracker(rng=random.Random(1))
    assert isinstance(t.claim(D, "a", now=0, ttl=15), ClaimGranted)
    held = t.claim(D, "b", now=1, ttl=15)
    assert isinstance(held, ClaimHeld) and held.holder == "a"
    assert isinstance(t.claim(D, "a", now=10, ttl=15), ClaimGranted)  # renewal
    assert isinstance(t.claim(D, "b", now=20, ttl=15), ClaimHeld)  # renewed until 25
    assert isinstance(t.claim(D, "b", now=26, ttl=15), ClaimGranted)  # a stopped renewing


def test_release_hands_the_claim_on_at_once():
    t = Tracker()
    t.claim(D, "a", now=0)
    t.release(D, "a")
    assert isinstance(t.claim(D, "b", now=1), ClaimGranted)


def test_complete_holder_makes_the_claim_unnecessary():
    t = Tracker()
    t.announce(0, D, "a", "10.0.0.1:5002", complete=True)
    ans = t.claim(D, "b", now=1)
    assert isinstance(ans, ClaimHeld) and ans.complete and ans.holder == "a"
    assert isinstance(t.claim(D, "b", now=100), ClaimGranted)  # a's announcement expired


def test_holders_sample_expire_and_prefer_zone():
    t = Tracker(rng=random.Random(2))
    for i in range(100):
        t.announce(0, D, f"n{i}", f"10.0.0.{i}:5002", zone="z1" if i < 10 else "z2", pieces=i)
    got = t.holders(D, now=1, limit=10, prefer_zone="z1", exclude="n0")
    assert len(got) == 10 and "n0" not in {h.node for h in got}
    # up to 3/4 (8) from the asker's zone, the rest from anywhere (so zones stay linked to each other)
    assert 8 <= sum(h.zone == "z1" for h in got) <= 9
    t.announce(50, D, "n5", "x", zone="z1")
    got = t.holders(D, now=40, limit=50)
    assert [h.node for h in got] == ["n5"]
    assert t.holder_count(D) == 1


def test_metainfo_only_from_the_claim_holder_and_never_rewritten():
    t = Tracker()
    t.claim(D, "a", now=0)
    assert t.publish_metainfo(D, "a", 0, size=160, piece_size=64, first=0, hashes=[b"h0"])
    assert not t.publish_metainfo(D, "b", 0, size=160, piece_size=64, first=1, hashes=[b"h1"])
    assert not t.publish_metainfo(D, "a", 0, size=160, piece_size=64, first=0, hashes=[b"xx"])
    assert t.publish_metainfo(D, "a", 0, size=160, piece_size=64, first=1, hashes=[b"h1", b"h2"])
    m = t.metainfo(D)
    assert m.hashes == [b"h0", b"h1", b"h2"] and m.complete


@pytest.mark.parametrize("size,piece_size", [
    (2**27, 1),  # 2^27 one-byte pieces: a gigabyte of hash list for the tracker, from one frame
    (2**40, 2**20),  # more pieces than a metainfo answer can carry
    (10, 0), (10, -4), (-1, 4), (10, (16 << 20) + 1),
    (10**6, 100_000),  # off SHA-256's 64-byte block: no piece after the first could be checked
    (10.0, 64), (10, 64.0), (10, True),
])
def test_metainfo_of_no_layout_a_node_makes_is_refused(size, piece_size):
    t = Tracker()
    t.claim(D, "a", now=0)
    assert not t.publish_metainfo(D, "a", 0, size=size, piece_size=piece_size, first=0, hashes=[b"h0"])
    assert t.metainfo(D) is None


def test_tags_newest_wins():
    t = Tracker()
    t.put_tag("docker.io/library/alpine:3", "sha256:1", "x", 10, checked_at=5)
    t.put_tag("docker.io/library/alpine:3", "sha256:0", "x", 10, checked_at=4)
    assert t.tag("docker.io/library/alpine:3").digest == "sha256:1"


def test_expire_drops_everything_stale():
    t = Tracker()
    t.announce(0, D, "a", ttl=5)
    t.claim(D, "a", now=0, ttl=5)
    assert t.expire(10) == 2
    assert t.holders(D, 10) == [] and t.claim_holder(D, 10) is None


def test_one_node_holds_at_most_max_per_node_entries_and_they_come_back_as_it_drops_some():
    t = Tracker(max_per_node=3)
    ds = [f"sha256:{i:064x}" for i in range(5)]
    for d in ds:
        t.announce(0, d, "flood", ttl=10)
    for d in ds[3:]:
        t.announce(0, d, "honest", ttl=100)  # the cap is per node: another node is not affected
    assert [t.holder_count(d) for d in ds] == [1, 1, 1, 1, 1]  # "flood" is tracked for its first 3 only
    t.announce(1, ds[0], "flood", ttl=10)  # a renewal of one it holds is fine
    t.withdraw(ds[0], "flood")
    t.announce(2, ds[3], "flood", ttl=10)  # room again
    assert [t.holder_count(d) for d in ds] == [0, 1, 1, 2, 1]
    t.expire(50)  # all of "flood"'s expire: it may announce 3 again
    for d in ds[2:]:
        t.announce(60, d, "flood", ttl=10)
    assert [t.holder_count(d) for d in ds] == [0, 0, 1, 2, 2]


def test_every_layout_a_node_makes_is_one_a_tracker_takes():
    """--piece-size is doubled where a blob would have more pieces than a metainfo answer carries."""
    from p2pcache.swarm.metainfo import MAX_META_PIECES, piece_count, piece_size_for

    for size in (0, 1, 10**6, 10**9, 10 * 2**30, 200 * 2**30):
        for override in (None, 64 << 10, 512 << 10, 4 << 20):
            ps = piece_size_for(size, override)
            assert piece_count(size, ps) <= MAX_META_PIECES
            if override and piece_count(size, override) <= MAX_META_PIECES:
                assert ps == override
            t = Tracker()
            t.claim(D, "a", now=0)
            assert t.publish_metainfo(D, "a", 0, size=size, piece_size=ps, first=0, hashes=[b"h0"])
