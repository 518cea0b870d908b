import random

from hypothesis import given
from hypothesis import strategies as st

from p2pcache.swarm.picker import PiecePicker, bits_of, mask_of


def test_mask_forms():
    assert mask_of([0, 3], 8) == 0b1001
    assert mask_of(bytes([0b1001_0000]), 8) == 0b1001
    assert mask_of(0xFF, 4) == 0xF
    assert bits_of(0b1010) == [1, 3]


def test_rarest_first():
    p = PiecePicker(4, random.Random(0), pipeline=1)
    p.add_peer("a", [0, 1, 2, 3])
    p.add_peer("b", [0, 1, 2])
    p.add_peer("c", [0, 1])
    assert p.pick("a") == [3]  # only a has 3
    p.received("a", 3)
    assert p.pick("b") == [2]  # 2 is rarer than 0 and 1
    assert p.pick("a") in ([0], [1])


def test_pipeline_limit_and_no_double_requests():
    p = PiecePicker(10, random.Random(1), pipeline=3)
    p.add_peer("a", range(10))
    p.add_peer("b", range(10))
    got_a = p.pick("a")
    got_b = p.pick("b")
    assert len(got_a) == 3 and len(got_b) == 3 and not set(got_a) & set(got_b)
    assert p.pick("a") == []
    p.set_limit("a", 5)
    assert len(p.pick("a")) == 2


def test_endgame_duplicates_then_cancels_losers():
    p = PiecePicker(2, random.Random(2), pipeline=2)
    p.add_peer("a", [0, 1])
    assert sorted(p.pick("a")) == [0, 1]
    assert p.endgame()
    p.add_peer("b", [0, 1])
    assert sorted(p.pick("b")) == [0, 1]  # duplicates at the tail
    p.add_peer("c", [0, 1])
    assert p.pick("c") == []  # at most endgame_dups requesters per piece
    assert p.received("b", 0) == ["a"]
    assert p.outstanding("a") == 1


def test_peer_gone_returns_its_pieces_to_the_pool():
    p = PiecePicker(3, random.Random(3), pipeline=3)
    p.add_peer("a", [0, 1, 2])
    p.add_peer("b", [0, 1, 2])
    asked = p.pick("a")
    assert sorted(p.remove_peer("a")) == sorted(asked)
    assert sorted(p.pick("b")) == [0, 1, 2]
    assert p.sources(0) == 1


def test_unknown_hashes_are_not_requested():
    p = PiecePicker(3, random.Random(4), pipeline=3)
    p.set_known([1])
    p.add_peer("a", [0, 1, 2])
    assert p.pick("a") == [1]
    p.add_known(2)
    assert p.pick("a") == [2]


def test_failed_and_discard():
    p = PiecePicker(2, random.Random(5), pipeline=1)
    p.add_peer("a", [0, 1])
    i = p.pick("a")[0]
    p.failed("a", i)
    assert p.pick("a") != []
    p.received("a", 0)
    p.received("a", 1)
    assert p.complete
    p.discard(1)
    assert not p.complete and p.missing == 1
    assert p.first_wanted() == 1


@given(st.integers(1, 40), st.lists(st.tuples(st.integers(0, 5), st.integers(0, 39)), max_size=200),
       st.integers(0, 2**32))
def test_invariants_under_random_events(n, haves, seed):
    rng = random.Random(seed)
    p = PiecePicker(n, rng, pipeline=2)
    for peer in range(6):
        p.add_peer(peer, [])
    for peer, i in haves:
        p.peer_has(peer, i % n)
        for j in p.pick(peer):
            assert p.peers[peer] >> j & 1  # only ask a peer for what it has
            if rng.random() < 0.7:
                p.received(peer, j)
            else:
                p.failed(peer, j)
        # availability equals the number of peers holding each piece
        for j in range(n):
            assert p.avail[j] == sum(m >> j & 1 for m in p.peers.values())
        # every wanted piece sits in exactly the bucket of its availability
        for a, b in enumerate(p._buckets):
            for j in bits_of(b):
                assert p.avail[j] == a and p.wanted >> j & 1
        assert p.have_mask & p.wanted == 0
        assert all(len(r) <= 2 for r in p.peer_reqs.values())
