"""Five nodes pull the same image at the same moment: every byte right, each blob fetched from upstream once."""

from __future__ import annotations

import pytest

from .harness.registry import Registry
from .harness.util import wait_until
from .swarm_harness import Cluster, pull_everywhere, push_random_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def pull_at_once_exactly_once(cluster: Cluster, reg: Registry, image, name: str) -> int:
    """Start the cluster, have every node pull `name:1` at the same moment, and check every byte on every node
    and one upstream GET per blob. Returns the registry log mark taken before the pulls."""
    cluster.start()
    cluster.wait_members()
    mark = reg.log_mark()
    results = pull_everywhere(cluster.nodes, name, "1")
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    for r in results:
        for blob in image.blobs:
            assert r[blob.digest] == blob.data  # byte-exact on every node
    for blob in image.blobs:
        assert cluster.upstream_blob_gets(blob.digest, mark) == 1, blob.digest
    return mark


def test_five_nodes_pull_at_once_one_upstream_fetch_per_blob(tmp_path):
    reg = Registry(tmp_path / "reg").start()
    cluster = Cluster(tmp_path, reg, 5)
    try:
        image = push_random_image(reg, "library/five", "1", [24_000_000, 6_000_000, 300_000])
        mark = pull_at_once_exactly_once(cluster, reg, image, "library/five")
        image_bytes = sum(b.size for b in image.blobs)
        assert cluster.upstream_blob_bytes(mark) <= 1.05 * image_bytes
        from_peers = sum(n.metric("p2pcache_peer_bytes_total", direction="in") for n in cluster.nodes)
        assert from_peers >= 3 * image_bytes  # four of five nodes got (nearly) everything from peers
        assert sum(n.metric("p2pcache_pieces_verified_total") for n in cluster.nodes) > 0
        assert sum(n.metric("p2pcache_pieces_rejected_total") for n in cluster.nodes) == 0
        # everyone stored it: a second round is served from the stores, upstream untouched
        mark = reg.log_mark()
        assert all(not isinstance(r, BaseException) for r in pull_everywhere(cluster.nodes, "library/five", "1"))
        assert sum(cluster.upstream_blob_gets(b.digest, mark) for b in image.blobs) == 0
    finally:
        cluster.stop()
        reg.stop()
    for n in cluster.nodes:
        n.check_log()


def test_five_skopeo_clients_through_five_nodes_at_once(tmp_path):
    """The same, with the real client: skopeo copies the image through each node at the same moment."""
    import threading

    from .harness.clients import Skopeo, verify_dir_blobs

    reg = Registry(tmp_path / "reg").start()
    cluster = Cluster(tmp_path, reg, 5)
    try:
        image = push_random_image(reg, "library/skopeo5", "1", [12_000_000, 200_000])
        cluster.start()
        cluster.wait_members()
        mark = reg.log_mark()
        barrier = threading.Barrier(5)
        outs = [tmp_path / f"out{i}" for i in range(5)]
        errors: list[BaseException] = []

        def copy(i: int) -> None:
            sk = Skopeo(tmp_path / f"skopeo{i}", mirrors={"docker.io": cluster.nodes[i].host})
            barrier.wait()
            try:
                sk.copy("docker://docker.io/library/skopeo5:1", outs[i])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=copy, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        for out in outs:
            assert set(verify_dir_blobs(out)) >= {b.digest for b in image.blobs}
        for blob in image.blobs:
            assert cluster.upstream_blob_gets(blob.digest, mark) == 1, blob.digest
    finally:
        cluster.stop()
        reg.stop()


def test_tracker_mode_one_tracker_node_one_upstream_fetch_per_blob(tmp_path):
    """`--tracker ADDR` (one tracker for a small setup, instead of rendezvous over the members): every node,
    the tracker itself included, is told the same address; three nodes pulling at once still fetch each blob
    from upstream once and get every byte right."""
    reg = Registry(tmp_path / "reg").start()
    cluster = Cluster(tmp_path, reg, 0)
    try:
        first = cluster.add_node(start=False)
        tracker = ["--tracker", first.peer_addr]  # type: ignore[attr-defined]
        first.args += tracker
        cluster.add_node(start=False, args=tracker)
        cluster.add_node(start=False, args=tracker)
        image = push_random_image(reg, "library/tracked", "1", [12_000_000, 200_000])
        pull_at_once_exactly_once(cluster, reg, image, "library/tracked")
        assert sum(n.metric("p2pcache_peer_bytes_total", direction="in") for n in cluster.nodes) > 12_000_000
        # the tracker node tracks every blob (config and layers); the others track nothing
        wait_until(lambda: first.metric("p2pcache_tracked_digests") >= len(image.blobs), 10,
                   "the tracker node to report its digests")
        assert [n.metric("p2pcache_tracked_digests") for n in cluster.nodes[1:]] == [0, 0]
    finally:
        cluster.stop()
        reg.stop()
    for n in cluster.nodes:
        n.check_log()
