"""A stored blob's piece hashes (for peers' metainfo requests) are computed once per digest however many ask at
once, and the answer is the same for all."""

from __future__ import annotations

import hashlib
import os

import trio

from p2pcache.config import Settings
from p2pcache.node import build_node
from p2pcache.swarm.service import SwarmService


async def test_concurrent_metainfo_requests_for_a_stored_blob_hash_it_once(tmp_path) -> None:
    settings = Settings(data=tmp_path / "data", peer_listen="127.0.0.1:0")
    node = build_node(settings)
    svc = SwarmService(settings, node.store, node.fetcher, node.upstream, node.metrics)
    data = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    node.store.put_bytes(digest, data)
    passes = 0
    real = svc._hash_stored

    async def counted(d: str):
        nonlocal passes
        passes += 1
        return await real(d)

    svc._hash_stored = counted  # type: ignore[method-assign]
    answers = []

    async def ask() -> None:
        answers.append(await svc._hash_complete_blob(digest))

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(ask)
    assert passes == 1
    size, piece_size, hashes = answers[0]
    assert size == len(data) and len(hashes) >= 1 and all(a == answers[0] for a in answers)


async def test_the_swarms_whole_digest_pass_counts_as_the_fetchers_check_and_removes_a_pinned_damaged_blob(
        tmp_path) -> None:
    """The swarm hashes a stored blob whole for its piece hashes: a good one needs no second pass for its next
    client (fetch.StoreCheck), and a damaged one goes even while a client holds it (store.delete refused a
    pinned blob, and the damaged file stayed)."""
    settings = Settings(data=tmp_path / "data", peer_listen="127.0.0.1:0")
    node = build_node(settings)
    svc = SwarmService(settings, node.store, node.fetcher, node.upstream, node.metrics)
    good, bad = os.urandom(1 << 20), os.urandom(1 << 20)
    good_d, bad_d = ("sha256:" + hashlib.sha256(b).hexdigest() for b in (good, bad))
    node.store.put_bytes(good_d, good)
    node.store.put_bytes(bad_d, bad)
    with open(node.store.path(bad_d), "r+b") as f:
        f.write(b"rot")
    with node.store.pin(bad_d):  # a client is reading it
        assert await svc._hash_complete_blob(bad_d) is None
        assert node.store.stat(bad_d) is None and not node.store.path(bad_d).exists()
    assert await svc._hash_complete_blob(good_d) is not None
    assert node.fetcher._checked.get(good_d) == os.stat(node.store.path(good_d)).st_ino
