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
