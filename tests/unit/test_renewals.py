"""Which tracker entries a node renews and withdraws each round (swarm/service.py: renewal_round)."""

from __future__ import annotations

from p2pcache.swarm.service import renewal_round


def test_a_blob_still_committing_is_renewed_not_withdrawn() -> None:
    # "a" is complete and stored, "b" complete but evicted, "c" complete and still committing (its download is
    # in flight; the store shows it once the fsync is done), "d" is being filled (its fill announces itself).
    announced = {"a": True, "b": True, "c": True, "d": False}
    stored = {"a"}
    renew, gone = renewal_round(announced, stored.__contains__, filling={"d"}, downloading={"c", "d"})
    assert gone == ["b"]
    assert renew == [("a", True), ("c", True)]


def test_an_evicted_blob_is_withdrawn_once_no_download_holds_it() -> None:
    renew, gone = renewal_round({"c": True}, lambda d: False, filling=set(), downloading=set())
    assert (renew, gone) == ([], ["c"])
