"""The swarm when things go wrong: dead nodes, a dead claim holder, a lying peer, an upstream outage, a stranger
without the cluster secret, garbage on the peer port. Real node processes, real docker-registry upstream."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .harness import images as im
from .harness.util import free_port, wait_until
from .lying_upstream import LyingUpstream
from .swarm_harness import Cluster, fetch_blob, pull_everywhere, pull_image, push_random_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1 << 20


@pytest.fixture
def cluster_of(tmp_path, reg):
    made: list[Cluster] = []

    def make(n: int, **kw) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", reg, n, **kw)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()


def fetch_in_background(nodes, name, digest):
    """Start fetching `digest` from every node at once; returns {node index: bytes or exception} when joined."""
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(nodes))

    def one(i, node):
        barrier.wait()
        try:
            results[i] = fetch_blob(node, name, digest, timeout=120)
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i, n), daemon=True) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    return threads, results


def claim_holder(nodes):
    for n in nodes:
        try:
            if n.running and n.metric("p2pcache_claims_held") >= 1:
                return n
        except Exception:
            pass
    return None


def pull_until_the_holder_shares(cluster_of, reg, name: str, rate: str):
    """3 nodes at `rate` pull one 30 MB layer at once, until the claim holder has shared 2 MiB with the others.
    Returns (cluster, layer, fetch threads, their results, the claim holder)."""
    layer = push_random_image(reg, name, "1", [30_000_000]).layers[0]
    c = cluster_of(3, extra_args=["--download-limit", rate])
    c.wait_members()
    threads, results = fetch_in_background(c.nodes, name, layer.digest)
    holder = wait_until(lambda: claim_holder(c.nodes), 20, "a node to hold the upstream claim", interval=0.05)
    wait_until(lambda: holder.metric("p2pcache_peer_bytes_total", direction="out") > 2 * MIB, 20,
               "the claim holder to share some pieces", interval=0.05)
    return c, layer, threads, results, holder


def test_claim_holder_killed_mid_fetch_another_node_completes(cluster_of, reg):
    # 10 MB/s per node: the 30 MB layer takes the claim holder ~3 s from upstream; we kill it in the middle.
    c, layer, threads, results, holder = pull_until_the_holder_shares(cluster_of, reg, "library/claim", "10MB/s")
    holder.kill()
    t0 = time.monotonic()
    for t in threads:
        t.join(120)
    survivors = [i for i, n in enumerate(c.nodes) if n is not holder]
    for i in survivors:
        assert results[i] == layer.data, f"node {i}: {results[i]!r:.200}"
    took = time.monotonic() - t0
    assert took < 60, f"takeover took {took:.1f}s"
    # another node took the claim over and fetched from upstream (ranged GETs for what the swarm lacked)
    assert c.upstream_blob_gets(layer.digest) >= 2
    took_over = [n for n in c.nodes if n is not holder and n.metric("p2pcache_upstream_bytes_total") > 0]
    assert took_over


def test_a_hung_claim_holder_loses_its_claim_when_membership_calls_it_dead(cluster_of, reg):
    """SIGSTOP, not SIGKILL: a hung process keeps its connections open, so nothing released its claim until the
    TTL ran out (found in review: every waiter stalled ~12 s). An owner now releases a claim whose holder is not
    alive; the holder, resumed, is refused its renewal and stops its stream; everyone ends with the right bytes."""
    c, layer, threads, results, holder = pull_until_the_holder_shares(cluster_of, reg, "library/hung", "5MB/s")
    assert holder.proc is not None
    holder.proc.send_signal(signal.SIGSTOP)
    try:
        others = [n for n in c.nodes if n is not holder]
        wait_until(lambda: any("which is not alive: released" in n.log_text() for n in others), 30,
                   "an owner to release the hung holder's claim")
    finally:
        holder.proc.send_signal(signal.SIGCONT)
    for t in threads:
        t.join(120)
    for i in range(len(c.nodes)):
        assert results[i] == layer.data, f"node {i}: {results[i]!r:.200}"


def test_a_node_back_from_a_pause_does_not_take_the_others_for_dead(cluster_of, reg):
    """Stopped for 8 s, a node heard nobody; aging everyone by that made them all DEAD at once, and the node
    owned every digest alone and granted itself claims the cluster held (found in review)."""
    c = cluster_of(3)
    c.wait_members()
    paused = c.nodes[2]
    assert paused.proc is not None
    paused.proc.send_signal(signal.SIGSTOP)
    time.sleep(8)
    paused.proc.send_signal(signal.SIGCONT)
    time.sleep(3)  # a few gossip rounds after it is back
    tail = paused.log_text()
    assert "=dead" not in tail, tail[-2000:]
    assert paused.metric("p2pcache_peers_connected") >= 2


def test_a_seed_reached_at_another_address_than_it_advertises_is_not_redialled(tmp_path, reg):
    """--join through an address the seed does not advertise (a Service VIP, a host name): it was dialled again
    every 2 s for good, a handshake each time that the pool then refused (found in review)."""
    c = Cluster(tmp_path / "c", reg, 0)
    port = free_port()
    c.add_node(start=False, join=False, peer_addr=f"0.0.0.0:{port}", args=["--advertise", f"127.0.0.2:{port}"])
    for _ in range(2):
        c.add_node(start=False, join=False, args=["--join", f"127.0.0.1:{port}"])
    try:
        c.start()
        c.wait_members()
        time.sleep(3)

        def closed_towards_seed() -> int:  # connections to the seed's port that were opened and closed since
            out = subprocess.run(["ss", "-tanH", "state", "time-wait", f"( dport = :{port} )"],
                                 capture_output=True, text=True, check=True).stdout
            return len(out.splitlines())

        before = closed_towards_seed()
        time.sleep(10)
        assert closed_towards_seed() - before <= 1
    finally:
        c.stop()


def test_node_killed_mid_transfer_others_finish(cluster_of, reg):
    image = push_random_image(reg, "library/kill", "1", [24_000_000])
    layer = image.layers[0]
    c = cluster_of(4, extra_args=["--download-limit", "8MB/s", "--upload-limit", "8MB/s"])
    c.wait_members()
    threads, results = fetch_in_background(c.nodes, "library/kill", layer.digest)
    holder = wait_until(lambda: claim_holder(c.nodes), 20, "the claim holder", interval=0.05)
    others = [n for n in c.nodes if n is not holder]

    def busy_leecher():
        # one that uploads to others if there is one, else one that is halfway through receiving
        for n in others:
            if n.metric("p2pcache_peer_bytes_total", direction="out") > MIB:
                return n
        for n in others:
            if n.metric("p2pcache_peer_bytes_total", direction="in") > layer.size / 2:
                return n
        return None

    victim = wait_until(busy_leecher, 30, "a leecher in the middle of the transfer", interval=0.02)
    victim.kill()
    for t in threads:
        t.join(120)
    for i, n in enumerate(c.nodes):
        if n is not victim:
            assert results[i] == layer.data, f"node {i}: {results[i]!r:.200}"
    assert c.upstream_blob_gets(layer.digest) == 1


def test_lying_peer_is_caught_banned_and_no_wrong_byte_reaches_a_client(cluster_of, reg):
    image = push_random_image(reg, "library/lie", "1", [16_000_000])
    layer = image.layers[0]
    c = cluster_of(3)
    c.wait_members()
    liar, honest, victim = c.nodes
    assert fetch_blob(liar, "library/lie", layer.digest) == layer.data
    assert fetch_blob(honest, "library/lie", layer.digest) == layer.data
    # bit rot on the liar's disk: one flipped byte in every MiB (every piece), same size
    (path,) = liar.store_files(layer.digest)
    data = bytearray(path.read_bytes())
    for off in range(1000, len(data), MIB):
        data[off] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    mark = reg.log_mark()
    got = fetch_blob(victim, "library/lie", layer.digest)
    assert got == layer.data
    assert victim.metric("p2pcache_pieces_rejected_total") >= 1
    assert victim.metric("p2pcache_peer_bans_total") >= 1
    assert c.upstream_blob_gets(layer.digest, mark) == 0  # the honest peer had every piece


def test_a_lying_piece_list_fails_the_whole_digest_and_the_blob_is_refetched_from_upstream(cluster_of, reg):
    """The claim holder streams from an upstream that flips one byte, so the piece hashes it publishes describe
    wrong bytes, and every piece it serves matches them. Its peers can only find out with the whole-blob digest:
    then they discard what came from the swarm and fetch from their own (honest) upstream. No client ever gets
    a complete wrong blob; the honest nodes end up serving the right one."""
    image = push_random_image(reg, "library/pieces", "1", [24_000_000])
    layer = image.layers[0]
    with LyingUpstream(reg.url, mode="flip", only=layer.digest) as liar:
        c = cluster_of(2)
        # slow on its upstream side only (its uploads are not limited), so the peers join while it streams
        victim = c.add_node(upstream=liar.url, args=["--download-limit", "8MB/s"])
        c.wait_members()
        a, b = c.nodes[0], c.nodes[1]
        results: dict[str, object] = {}

        def fetch(name: str, node) -> None:
            try:
                results[name] = fetch_blob(node, "library/pieces", layer.digest, timeout=120)
            except BaseException as e:
                results[name] = e

        t_victim = threading.Thread(target=fetch, args=("victim", victim), daemon=True)
        t_victim.start()
        wait_until(lambda: victim.metric("p2pcache_claims_held") >= 1, 20, "the victim to hold the claim",
                   interval=0.05)
        threads = [threading.Thread(target=fetch, args=(name, node), daemon=True) for name, node in
                   (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in [t_victim, *threads]:
            t.join(150)
        for name in ("victim", "a", "b"):
            got = results[name]
            assert not (isinstance(got, bytes) and got != layer.data and len(got) == len(layer.data)), \
                f"{name} served a complete wrong blob"
        assert not isinstance(results["victim"], bytes), "the victim's upstream lies: it cannot serve the blob"
        # the honest nodes get the right bytes (now, or on the client's retry after an aborted response)
        for node in (a, b):
            assert fetch_blob(node, "library/pieces", layer.digest, timeout=120) == layer.data
        assert a.metric("p2pcache_digest_mismatches_total", source="swarm") + \
            b.metric("p2pcache_digest_mismatches_total", source="swarm") >= 1, \
            "neither honest node took the lying pieces: the test did not test the lie"
        for node in (a, b, victim):
            for path in node.store_files(layer.digest):
                assert im.sha256_digest(path.read_bytes()) == layer.digest


def test_upstream_down_new_node_pulls_image_and_tag_from_the_cluster(cluster_of, reg):
    image = push_random_image(reg, "library/outage", "1", [5_000_000, 200_000])
    c = cluster_of(2)
    c.wait_members()
    for r in pull_everywhere(c.nodes, "library/outage", "1"):
        assert not isinstance(r, BaseException), r
    reg.stop()
    newcomer = c.add_node()
    c.wait_members()
    wait_until(lambda: newcomer.metric("p2pcache_peers_connected") >= 2, 15, "the newcomer to meet both nodes")
    got = pull_image(newcomer, "library/outage", "1")
    assert got[image.digest] == image.manifest.data
    for b in image.blobs:
        assert got[b.digest] == b.data
    reg.start()


def test_a_restarted_cluster_finds_what_a_node_holds_through_its_renewals(cluster_of, reg):
    """Tracker state is soft: after both nodes restart, only A's periodic renewal ("renew" frames to each
    owner, batched) tells the owners that A holds the image. B, whose store is empty, then pulls it with the
    upstream down: every blob comes from A, found through the trackers."""
    image = push_random_image(reg, "library/renewed", "1", [4_000_000, 150_000])
    c = cluster_of(2)
    c.wait_members()
    a, b = c.nodes
    pull_image(a, "library/renewed", "1")  # only A holds it
    b.stop()
    a.restart()  # the holder forgets its downloads; the tracker shards it and B kept are gone
    b.start()
    reg.stop()
    c.wait_members()
    got = pull_image(b, "library/renewed", "1")
    assert got[image.digest] == image.manifest.data
    for blob in image.blobs:
        assert got[blob.digest] == blob.data
    assert b.metric("p2pcache_peer_bytes_total", direction="in") >= sum(x.size for x in image.blobs)
    reg.start()


def test_nodes_that_join_hear_at_once_who_holds_what_they_now_own(cluster_of, reg):
    """Two nodes join a cluster that holds an image: rendezvous hands them ownership of some of its digests,
    which they knew nothing of until the holders' next renewal, up to 10 s later, and meanwhile granted the
    claim to whoever asked: the cluster fetched from upstream what it held (found in review). A join now brings
    the holders' renewal forward, so a newcomer pulls the whole image with the upstream down."""
    image = push_random_image(reg, "library/joiners", "1", [200_000 + k for k in range(12)])
    c = cluster_of(2)
    c.wait_members()
    pull_image(c.nodes[0], "library/joiners", "1")
    pull_image(c.nodes[1], "library/joiners", "1")
    for _ in range(2):
        c.add_node(start=False)
    c.nodes[2].start()
    c.nodes[3].start()
    c.wait_members()
    for holder in c.nodes[:2]:  # the round a join brings forward, not the next one of every 10 s
        wait_until(lambda h=holder: "members joined: renewing" in h.log_text(), 5, "a renewal at once")
    reg.stop()
    try:
        got = pull_image(c.nodes[3], "library/joiners", "1")
    finally:
        reg.start()
    for blob in image.blobs:
        assert got[blob.digest] == blob.data


def test_wrong_cluster_secret_is_refused(cluster_of, reg, tmp_path):
    c = cluster_of(2)
    c.wait_members()
    wrong = tmp_path / "wrong.secret"
    wrong.write_bytes(b"not-the-secret")
    stranger = c.add_node(secret_file=wrong)
    time.sleep(3)
    assert stranger.metric("p2pcache_peers_connected") == 0
    assert all(n.metric("p2pcache_peers_connected") == 1 for n in c.nodes[:2])
    assert "refused" in c.nodes[0].log_text()
    # alone, it is still a working mirror
    image = push_random_image(reg, "library/alone", "1", [100_000])
    assert pull_image(stranger, "library/alone", "1")[image.layers[0].digest] == image.layers[0].data


def test_garbage_on_the_peer_port_does_not_hurt_the_node(cluster_of, reg):
    c = cluster_of(2)
    c.wait_members()
    host, port = c.nodes[0].peer_addr.rsplit(":", 1)

    def attack(payload: bytes) -> None:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(payload)
                s.settimeout(5)
                s.recv(1024)
            except OSError:
                pass

    payloads = [os.urandom(65536), b"\xff" * 8, b"\x00\x00\x00\x05\x00\x00\x00\x00\xc1\xc1\xc1\xc1\xc1",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b""]
    with ThreadPoolExecutor(len(payloads)) as ex:
        list(ex.map(attack, payloads))
    assert c.nodes[0].running
    image = push_random_image(reg, "library/after", "1", [3_000_000])
    for r in pull_everywhere(c.nodes, "library/after", "1"):
        assert not isinstance(r, BaseException), r
    assert c.upstream_blob_gets(image.layers[0].digest) == 1
    assert c.nodes[0].metric("p2pcache_peers_connected") >= 1


def test_a_flood_of_silent_connections_from_one_address_locks_no_peer_out(cluster_of, reg):
    """600 connections from one address that never handshake (the node allowed 512 in all, handshaking or not,
    so they locked every peer out): at most MAX_HANDSHAKING_PER_IP stay open, and a peer with the secret
    still completes its handshake meanwhile."""
    import trio

    from p2pcache.swarm.handshake import Handshake, PeerInfo, load_secret
    from p2pcache.swarm.peer import handshake, open_peer_socket
    from p2pcache.swarm.service import MAX_HANDSHAKING_PER_IP
    from p2pcache.swarm.wire import FrameDecoder

    c = cluster_of(2)
    c.wait_members()
    host, port = c.nodes[0].peer_addr.rsplit(":", 1)
    flood = []
    try:
        for _ in range(600):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))  # another loopback address: the flood's own
            s.connect((host, int(port)))
            flood.append(s)
        for s in flood:
            s.setblocking(False)

        def still_open() -> int:
            n = 0
            for s in flood:
                try:
                    n += s.recv(1) != b""  # b"": the node closed it at once
                except BlockingIOError:
                    n += 1  # open: handshaking, or not yet accepted (the listen backlog)
                except OSError:
                    pass
            return n

        deadline = time.monotonic() + 3  # within the 5 s handshake timeout
        while (open_ := still_open()) > MAX_HANDSHAKING_PER_IP and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_ <= MAX_HANDSHAKING_PER_IP, open_

        async def a_peer_handshakes() -> str:
            with trio.fail_after(3):
                sock = await open_peer_socket(c.nodes[0].peer_addr)
                hs = Handshake("client", load_secret(c.secret_file), PeerInfo("probe", "127.0.0.1:9", None))
                peer = await handshake(sock, hs, FrameDecoder())
                sock.close()
                return peer.node

        assert trio.run(a_peer_handshakes)
    finally:
        for s in flood:
            s.close()
    assert c.nodes[0].running


def test_the_lowest_limits_slow_the_swarm_but_break_nothing(cluster_of, reg):
    """Found in review: under --upload-limit 300kB/s an upload waited behind the other uploads' whole 1 MiB
    throttle calls for longer than a peer's stall timeout, peers dropped each other as stalled (43 times), and
    the registry sent the image 2.13 times (this test failed so at 300kB/s); under 64kB/s tracker calls waited
    behind whole pieces and a claim holder was taken for dead. At the lowest limits taken now (1MB/s, both
    ways): one GET, no stall, no timed-out call."""
    image = push_random_image(reg, "library/slowup", "1", [3_000_000])
    layer = image.layers[0]
    c = cluster_of(5, extra_args=["--upload-limit", "1MB/s", "--download-limit", "1MB/s"])
    c.wait_members()
    threads, results = fetch_in_background(c.nodes, "library/slowup", layer.digest)
    for t in threads:
        t.join(120)
    assert all(results[i] == layer.data for i in range(5)), [f"{r!r:.120}" for r in results.values()]
    assert c.upstream_blob_gets(layer.digest) == 1
    lines = [line for n in c.nodes for line in n.log_text().splitlines()]
    assert not [x for x in lines if "timed out" in x or "not alive" in x]
    # The defect dropped peers as stalled 43 times in one pull. One 5 s stall can still come of a CPU-starved
    # machine, with the code of before this test too (2 runs in 5 with two busy loops beside it; once in seven
    # clean CI runs on 2026-11-29): that is the stall timeout doing its job, not the throttle holding a peer.
    stalls = [x for x in lines if "stalled" in x]
    assert len(stalls) <= 1, stalls[:10]
