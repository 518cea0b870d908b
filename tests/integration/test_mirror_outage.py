"""The upstream goes away after a pull: what the node holds still pulls by tag (stale tag, counted), also
after the node restarts; what it never held fails cleanly."""

from __future__ import annotations

import pytest

from .harness import images as im
from .harness.clients import verify_dir_blobs

pytestmark = pytest.mark.integration


def test_upstream_down_cached_image_still_pulls_by_tag(make_registry, make_node, skopeo_via, tmp_path):
    reg = make_registry()
    image = im.small_image("outage", docker=True)
    im.push(reg.url, "library/outage", "1", image)
    node = make_node({"docker.io": reg.url}, args=["--tag-ttl", "0s"], env={"P2PCACHE_UPSTREAM_RETRIES": "1"})
    sk = skopeo_via(node)
    sk.copy("docker://docker.io/library/outage:1", tmp_path / "warm")
    assert {b.digest for b in image.blobs} <= set(verify_dir_blobs(tmp_path / "warm"))

    reg.stop()
    stale0 = node.metric("p2pcache_stale_tag_serves_total")
    sk.copy("docker://docker.io/library/outage:1", tmp_path / "stale")
    assert {b.digest for b in image.blobs} <= set(verify_dir_blobs(tmp_path / "stale"))
    assert (tmp_path / "stale" / "manifest.json").read_bytes() == image.manifest.data
    assert node.metric("p2pcache_stale_tag_serves_total") > stale0

    # What was never pulled cannot be had: an error, not a hang and not a wrong answer.
    p = sk.copy("docker://docker.io/library/never:1", tmp_path / "never", check=False, timeout=120)
    assert p.returncode != 0

    # The store and the tag cache survive a restart of the node while the upstream is still down.
    node.restart()
    sk.copy("docker://docker.io/library/outage:1", tmp_path / "restarted")
    assert {b.digest for b in image.blobs} <= set(verify_dir_blobs(tmp_path / "restarted"))
    assert node.metric("p2pcache_stale_tag_serves_total") >= 1
