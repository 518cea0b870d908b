"""containerd (`ctr images pull --hosts-dir`) through the node: HEAD, `?ns=docker.io`, manifests by digest,
a non-default platform picked from a multi-arch index. A recording proxy between ctr and the node shows what
containerd sent, and that the node answered it."""

from __future__ import annotations

import hashlib

import pytest

from .lying_upstream import LyingUpstream

pytestmark = pytest.mark.integration


def _pull(containerd, node, ns_name, ref, *extra):
    with LyingUpstream(node.url) as rec:
        hosts = containerd.hosts_dir(ns_name, {"docker.io": rec.url})
        containerd.ctr("-n", ns_name, "images", "pull", "--hosts-dir", str(hosts), *extra, ref)
        return list(rec.seen)


def _check_content(containerd, ns_name, image):
    have = set(containerd.ctr("-n", ns_name, "content", "ls", "-q").stdout.decode().split())
    for b in [image.manifest, *image.blobs]:
        assert b.digest in have, f"{b.digest} missing from containerd's content store"
    for b in image.layers:
        data = containerd.ctr("-n", ns_name, "content", "get", b.digest).stdout
        assert hashlib.sha256(data).hexdigest() == b.digest.split(":", 1)[1]


def test_ctr_pull_through_node(containerd, node, upstream):
    image = upstream.images["library/small:1"]
    seen = _pull(containerd, node, "plain", "docker.io/library/small:1")
    assert any(s.method == "HEAD" and s.path == "/v2/library/small/manifests/1" for s in seen), seen
    assert all("ns=docker.io" in s.target for s in seen), [s.target for s in seen]
    assert any(s.path.endswith(f"/blobs/{image.layers[0].digest}") for s in seen)
    _check_content(containerd, "plain", image)
    images = containerd.ctr("-n", "plain", "images", "ls", "-q").stdout.decode().split()
    assert "docker.io/library/small:1" in images
    # Unpacked, too: the layers became snapshots.
    snaps = containerd.ctr("-n", "plain", "snapshots", "ls").stdout.decode().strip().splitlines()
    assert len(snaps) - 1 >= len(image.layers), snaps


def test_ctr_pull_arm64_from_index(containerd, node, upstream):
    idx = upstream.images["library/multi:1"]
    arm, amd = idx.for_arch("arm64"), idx.for_arch("amd64")
    seen = _pull(containerd, node, "arm", "docker.io/library/multi:1", "--platform", "linux/arm64")
    paths = {s.path for s in seen}
    assert f"/v2/library/multi/manifests/{arm.digest}" in paths
    assert f"/v2/library/multi/blobs/{amd.layers[1].digest}" not in paths  # only the platform asked for
    assert all("ns=docker.io" in s.target for s in seen)
    _check_content(containerd, "arm", arm)
    listed = containerd.ctr("-n", "arm", "images", "ls").stdout.decode()
    assert idx.digest in listed
