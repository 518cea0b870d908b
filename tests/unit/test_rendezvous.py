from hypothesis import given
from hypothesis import strategies as st

from p2pcache.discovery.rendezvous import owners

members_st = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30, unique=True)


def test_owners_are_k_distinct_members_best_first():
    members = [f"node{i}" for i in range(20)]
    got = owners("sha256:abc", members, 3)
    assert len(got) == 3 and len(set(got)) == 3 and set(got) <= set(members)
    assert owners("sha256:abc", list(reversed(members)), 3) == got  # order of the input does not matter


def test_fewer_members_than_k():
    assert sorted(owners("k", ["a", "b"], 5)) == ["a", "b"]
    assert owners("k", [], 3) == []
    assert owners("k", ["a"], 0) == []


def test_keys_spread_over_members():
    members = [f"n{i}" for i in range(10)]
    counts = dict.fromkeys(members, 0)
    for k in range(2000):
        counts[owners(f"key{k}", members, 1)[0]] += 1
    assert min(counts.values()) > 120  # about 200 each


@given(members_st, st.text(max_size=20), st.integers(1, 5))
def test_removing_a_non_owner_changes_nothing(members, key, k):
    top = owners(key, members, k)
    others = [m for m in members if m not in top]
    if others:
        assert owners(key, [m for m in members if m != others[0]], k) == top


@given(members_st, st.text(max_size=20), st.integers(1, 5), st.text(min_size=1, max_size=8))
def test_a_newcomer_only_enters_or_leaves_things_alone(members, key, k, new):
    if new in members:
        return
    before = owners(key, members, k)
    after = owners(key, members + [new], k)
    assert [m for m in after if m != new] == before[: len([m for m in after if m != new])]
