"""A hostile member: a peer with the cluster secret (it passes the real handshake) that then misbehaves. What it
may cost a node is bounded, and pulls through the node still complete, from the other owners or from upstream.
A real node process and docker-registry; the member is `hostile_member.HostileMember`."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
import trio

from p2pcache.swarm.wire import encode

from .hostile_member import HostileMember, raw_frame, rss_mib, wait_member
from .swarm_harness import MANIFEST_ACCEPT, Cluster, push_random_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = b"cluster-secret"
RPCS = {"announce", "claim", "metainfo-req", "tag-req", "manifest-req", "ping"}


@pytest.fixture
def one_node(tmp_path, reg):
    c = Cluster(tmp_path / "c", reg, 1, secret=SECRET).start()
    yield c.nodes[0]
    c.stop()


def timed_fetch(node, name: str, digest: str) -> tuple[bytes, float]:
    """The blob from the node's registry API, and the seconds between its first body bytes and its last."""
    with httpx.Client(timeout=60) as c:
        with c.stream("GET", f"{node.url}/v2/{name}/blobs/{digest}") as r:
            assert r.status_code == 200, (r.status_code, r.read()[:300])
            chunks, first = [], None
            for chunk in r.iter_bytes(1 << 16):
                first = first or time.monotonic()
                chunks.append(chunk)
            return b"".join(chunks), time.monotonic() - (first or time.monotonic())


def pull_beside(node, member: HostileMember, name: str, digest: str, linger: float = 0) -> tuple[bytes, float]:
    """With the member connected (a live member: an owner of the digest), pull `digest` through `node`; the
    member stays `linger` seconds more."""
    out: dict[str, tuple[bytes, float]] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(member.run)
            await trio.to_thread.run_sync(wait_member, node)
            out["r"] = await trio.to_thread.run_sync(timed_fetch, node, name, digest)
            await trio.sleep(linger)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return out["r"]


def test_a_member_answering_every_call_with_another_kind_fails_no_pull(one_node, reg):
    """It answered every call with a "pong" of the right id: the node read fields a pong has not (KeyError),
    and every pull through it failed with a 503 (found in review). Now each such answer fails that call, as a
    dead owner would, and the node fetches from upstream on its own."""
    layer = push_random_image(reg, "library/wk", "1", [3_000_000]).layers[0]

    def on_frame(msg):
        return [encode("pong", id=msg["id"])] if msg.kind in RPCS else []

    member = HostileMember(one_node.peer_addr, SECRET, on_frame)
    data, _ = pull_beside(one_node, member, "library/wk", layer.digest)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
    assert {"announce", "claim", "metainfo-req"} <= member.kinds()  # it was asked, as an owner
    assert "KeyError" not in one_node.log_text()


def test_a_member_asking_for_a_large_manifest_again_and_again_without_reading_costs_megabytes(one_node, reg):
    """It asked 1000 times for one 512 KB manifest and read slowly: every answer was queued with its payload
    (the queue counted frames, 4096), ~500 MB (found in review). Now a manifest is answered "not held" once 4 MiB
    of answers wait for the peer, and 16 MiB of any frames close its connection."""
    image = push_random_image(reg, "library/big", "1", [1000])
    doc = json.loads(image.manifest.data)
    doc["annotations"] = {"org.example.padding": "A" * (512 << 10)}
    body = json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert httpx.put(f"{reg.url}/v2/library/big/manifests/2", content=body,
                     headers={"Content-Type": doc["mediaType"]}, timeout=30).status_code == 201
    r = httpx.get(f"{one_node.url}/v2/library/big/manifests/2", headers={"Accept": MANIFEST_ACCEPT}, timeout=30)
    assert r.status_code == 200 and r.content == body  # the node holds it now
    member = HostileMember(one_node.peer_addr, SECRET)  # it never reads
    peak = {"rss": 0.0}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(member.run)
            await trio.sleep(0.5)
            base = rss_mib(one_node)
            await member.send(b"".join(encode("manifest-req", id=i + 1, digest=digest) for i in range(300)))
            for _ in range(30):  # 3 s, inside the send-stall timeout (10 s)
                await trio.sleep(0.1)
                peak["rss"] = max(peak["rss"], rss_mib(one_node) - base)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert peak["rss"] < 48, f"the node grew by {peak['rss']:.0f} MiB"  # 300 answers: 150 MB
    with httpx.Client(timeout=10) as c:
        assert c.get(f"{one_node.url}/v2/").status_code == 200


def test_a_member_that_never_answers_does_not_hold_back_the_end_of_a_pull(one_node, reg):
    """The last bytes of every pull waited for the fill's tracker bookkeeping: the complete announce to each
    owner (up to 3 s) and the claim release (up to 2 s). With a silent owner that was 5 s at the end of each pull
    (found in review). Now the download finishes first and the bookkeeping follows in the swarm's nursery."""
    layer = push_random_image(reg, "library/silent", "1", [3_000_000]).layers[0]
    member = HostileMember(one_node.peer_addr, SECRET, lambda msg: [])  # reads everything, answers nothing
    data, tail = pull_beside(one_node, member, "library/silent", layer.digest, linger=4)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
    assert tail < 2.0, f"{tail:.1f} s from the first byte to the last"
    # It was asked (its first tracker calls timed out: the claim held the pull's start for 3 s), and then taken
    # for silent, as a failed dial would have it. Not asserted: that the complete announce and the claim release
    # then skip it. Its gossip (every 0.5 s, heartbeat from the wall clock) makes it alive again, so whether the
    # end's bookkeeping falls in the window where it is suspect depends on the machine's speed: the assertion
    # failed 2 runs of 3 at 13:39 UTC 2026-11-29 with this session's code and the code before alike. What the
    # test is for is the tail above: the bookkeeping no longer holds back the last bytes, whoever it waits on.
    said = [(m.kind, m.fields.get("complete"), m.fields.get("release")) for m in member.seen]
    assert ("announce", False, None) in said or ("claim", None, False) in said, said


BAD_ADDRS = ["no-port-here", "127.0.0.1:99999", "a" * 70 + ".example:80"]


@pytest.mark.parametrize("where", ["gossip", "holders", "claim-answer"])
def test_a_member_naming_addresses_nobody_can_dial_fails_no_pull(one_node, reg, where):
    """A member gossiped members, or as an owner answered with holders or a claim holder, at addresses that do
    not parse (no port, port 99999, a 70-character DNS label): the node stored them and dialling them raised a
    ValueError past every handler, so every pull through it failed (503, or a 200 cut off after its headers;
    found in review). Now such a frame is refused where it arrives (the member's connection is closed, as for
    any malformed frame) and a dial of an undiallable address is an unreachable peer."""
    layers = push_random_image(reg, f"library/addr-{where}", "1", [400_000] * 3).layers
    ghost = "ghost0000000001"

    def on_frame(msg):
        if where == "holders" and msg.kind == "announce":
            return [raw_frame("holders", id=msg["id"], digest=msg["digest"],
                              holders=[[ghost, addr, None, True] for addr in BAD_ADDRS], claim=None)]
        if where == "claim-answer":
            # an owner that knows no holder and no layout, and says a node it names holds the claim
            if msg.kind == "claim":
                return [raw_frame("claim-answer", id=msg["id"], digest=msg["digest"], granted=False, holder=ghost,
                                  addr=BAD_ADDRS[0], complete=True, ttl=5.0)]
            if msg.kind == "announce":
                return [encode("holders", id=msg["id"], digest=msg["digest"], holders=[], claim=None)]
            if msg.kind == "metainfo-req":
                return [encode("metainfo", id=msg["id"], digest=msg["digest"], size=None, piece_size=None,
                               hashes=[])]
        return []

    member = HostileMember(one_node.peer_addr, SECRET, on_frame)
    got: dict[str, tuple[int, str]] = {}

    def fetch_all() -> None:
        with httpx.Client(timeout=60) as c:
            for la in layers:
                r = c.get(f"{one_node.url}/v2/library/addr-{where}/blobs/{la.digest}")
                got[la.digest] = (r.status_code, "sha256:" + hashlib.sha256(r.content).hexdigest())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(member.run)
            await trio.to_thread.run_sync(wait_member, one_node)
            if where == "gossip":
                await member.send(raw_frame("gossip", members=[[f"forged{i:010d}", addr, None, 1]
                                                               for i, addr in enumerate(BAD_ADDRS)]))
                await trio.sleep(0.5)
            await trio.to_thread.run_sync(fetch_all)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert got == {la.digest: (200, la.digest) for la in layers}
    log = one_node.log_text()
    assert "ValueError" not in log and "UnicodeError" not in log and "Traceback" not in log, log[-3000:]
    assert member.closed_by_node, member.kinds()  # the frame naming them was refused where it arrived
