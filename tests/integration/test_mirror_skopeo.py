"""skopeo through the node with a registries.conf mirror: Docker Hub names and another namespace (ghcr.io)."""

from __future__ import annotations

import time

import pytest

from .harness.clients import verify_dir_blobs

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("ref", ["library/small:1", "library/dsmall:1"])  # OCI and Docker schema2
def test_skopeo_copy_docker_hub_name(node, upstream, skopeo_via, tmp_path, ref):
    reg = upstream.registry
    image = upstream.images[ref]
    name = ref.split(":")[0]
    mark = reg.log_mark()
    served0 = node.metric("p2pcache_served_bytes_total")
    out = tmp_path / "out"
    skopeo_via(node).copy(f"docker://docker.io/{ref}", out)
    got = set(verify_dir_blobs(out))
    assert {b.digest for b in image.blobs} <= got
    assert (out / "manifest.json").read_bytes() == image.manifest.data
    # It really went through the node (skopeo would otherwise try the real Docker Hub), at most once upstream.
    assert node.metric("p2pcache_served_bytes_total") - served0 >= sum(b.size for b in image.blobs)
    for b in image.blobs:
        assert reg.count("GET", f"/v2/{name}/blobs/{b.digest}", since=mark, settle=0.1) <= 1


def test_skopeo_copy_other_namespace(node, ghcr_upstream, skopeo_via, tmp_path):
    """registries.conf mirror `location = "NODE/ghcr.io"`: skopeo sends /v2/ghcr.io/org/app/…"""
    image = ghcr_upstream.images["org/app:1"]
    reg = ghcr_upstream.registry
    mark = reg.log_mark()
    out = tmp_path / "out"
    skopeo_via(node).copy("docker://ghcr.io/org/app:1", out)
    assert {b.digest for b in image.blobs} <= set(verify_dir_blobs(out))
    assert (out / "manifest.json").read_bytes() == image.manifest.data
    time.sleep(0.2)
    assert {("GET", f"/v2/org/app/blobs/{b.digest}") for b in image.layers} <= set(reg.counts(since=mark))


def test_skopeo_second_pull_is_served_from_store(node, upstream, skopeo_via, tmp_path):
    image = upstream.images["library/small:1"]
    sk = skopeo_via(node)
    sk.copy("docker://docker.io/library/small:1", tmp_path / "a")
    mark = upstream.registry.log_mark()
    sk.copy("docker://docker.io/library/small:1", tmp_path / "b")
    assert {b.digest for b in image.blobs} <= set(verify_dir_blobs(tmp_path / "b"))
    time.sleep(0.3)
    gets = [a for a in upstream.registry.accesses_since(mark) if a.method == "GET"]
    assert gets == [], f"a warm pull still GETs from the upstream: {gets}"  # a tag HEAD at most
