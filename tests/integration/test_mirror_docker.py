"""The everyday Docker workflow with dockerd's `registry-mirrors` pointing at a node.

pull through the mirror → classic build FROM it (a RUN step executes busybox) → tag + push to the registry
that is docker.io's upstream → rmi → pull the pushed image again by its Docker Hub name, through the mirror.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_docker_pull_build_push_pull(dockerd, node, upstream, tmp_path):
    reg = upstream.registry
    bb = upstream.images["library/busybox:1"]
    layer = bb.layers[0]
    mark = reg.log_mark()
    served0 = node.metric("p2pcache_served_bytes_total")

    out = dockerd.docker("pull", "busybox:1").stdout.decode()
    assert bb.digest in out, out
    # The bytes came through the node: it served at least the layer, and it fetched the layer upstream.
    assert node.metric("p2pcache_served_bytes_total") - served0 >= layer.size
    assert reg.count("GET", f"/v2/library/busybox/blobs/{layer.digest}", since=mark) <= 1
    img_id = dockerd.docker("image", "inspect", "-f", "{{.Id}}", "busybox:1").stdout.decode().strip()
    assert img_id == bb.config.digest

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM busybox:1\nRUN echo built-through-p2pcache > /built.txt\n"
                                    'CMD ["cat", "/built.txt"]\n')
    target = f"{reg.host}/library/built:1"
    dockerd.docker("build", "-t", target, str(ctx), env={"DOCKER_BUILDKIT": "0"})
    pushed = dockerd.docker("push", target).stdout.decode()
    assert "digest: sha256:" in pushed, pushed
    built_digest = pushed.split("digest: ", 1)[1].split()[0]
    dockerd.docker("rmi", target)
    dockerd.docker("rmi", "busybox:1")

    mark = reg.log_mark()
    served0 = node.metric("p2pcache_served_bytes_total")
    out = dockerd.docker("pull", "built:1").stdout.decode()
    assert built_digest in out, out
    assert node.metric("p2pcache_served_bytes_total") > served0
    time.sleep(0.3)  # the registry logs a request when its response is done
    assert any(a.path.startswith("/v2/library/built/") for a in reg.accesses_since(mark)), \
        "the node never asked the upstream for library/built"
    run = dockerd.docker("run", "--rm", "--network", "none", "built:1").stdout.decode()
    assert run.strip() == "built-through-p2pcache"


def test_docker_pulls_its_platform_from_an_index(dockerd, node, upstream):
    idx = upstream.images["library/multi:1"]
    out = dockerd.docker("pull", "multi:1").stdout.decode()
    assert idx.digest in out, out
    image_id = dockerd.docker("image", "inspect", "-f", "{{.Id}} {{.Architecture}}", "multi:1").stdout.decode()
    assert image_id.split() == [idx.for_arch("amd64").config.digest, "amd64"]
    dockerd.docker("rmi", "multi:1")
