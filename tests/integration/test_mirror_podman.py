"""podman pulls through the node with a registries.conf mirror (podman honours CONTAINERS_REGISTRIES_CONF)."""

from __future__ import annotations

import json

import pytest

from .harness.clients import Podman

pytestmark = pytest.mark.integration


def test_podman_pull_through_node(node, upstream, tmp_path):
    image = upstream.images["library/dsmall:1"]
    served0 = node.metric("p2pcache_served_bytes_total")
    pm = Podman(tmp_path / "podman", {"docker.io": node.host})
    try:
        out = pm.podman("pull", "docker.io/library/dsmall:1").stdout.decode().strip()
        info = json.loads(pm.podman("image", "inspect", "docker.io/library/dsmall:1").stdout)[0]
    finally:
        pm.close()
    assert out.endswith(image.config.digest.split(":", 1)[1]), out
    assert f"docker.io/library/dsmall@{image.digest}" in info["RepoDigests"]
    assert info["Architecture"] == "amd64"
    assert node.metric("p2pcache_served_bytes_total") - served0 >= image.config.size
