"""The harness checked against the real registry directly (no node): if these fail, the mirror tests' verdicts
mean nothing. Cheap: they reuse the session's upstream registry and containerd."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from . import lying_upstream as lu
from .harness import images as im
from .harness.clients import Skopeo, verify_dir_blobs
from .harness.registry import parse_access_log

pytestmark = pytest.mark.integration


def test_access_log_parser():
    line = ('127.0.0.1 - - [28/Nov/2026:02:50:00 +0000] "GET /v2/library/x/blobs/sha256:ab HTTP/1.1" 200 52435854 '
            '"" "curl/8"')
    (a,) = parse_access_log(line + "\nnoise\n")
    assert (a.method, a.path, a.status, a.size) == ("GET", "/v2/library/x/blobs/sha256:ab", 200, 52435854)


def test_images_are_well_formed(upstream):
    idx = upstream.images["library/multi:1"]
    with upstream.registry.client() as c:
        r = c.get("/v2/library/multi/manifests/1", headers={"Accept": ",".join(im.ALL_MANIFEST_TYPES)})
        assert r.status_code == 200 and r.headers["Content-Type"] == im.OCI_INDEX
        assert r.headers["Docker-Content-Digest"] == idx.digest
        arm = idx.for_arch("arm64")
        for b in arm.blobs:
            got = c.get(f"/v2/library/multi/blobs/{b.digest}").content
            assert im.sha256_digest(got) == b.digest
        bb = upstream.images["library/busybox:1"]
        r = c.get("/v2/library/busybox/manifests/1", headers={"Accept": im.DOCKER_MANIFEST})
        assert r.headers["Content-Type"] == im.DOCKER_MANIFEST and r.content == bb.manifest.data


def test_skopeo_straight_from_registry(upstream, tmp_path):
    sk = Skopeo(tmp_path / "sk", insecure=[upstream.registry.host])
    for ref in ("library/small:1", "library/dsmall:1"):
        out = tmp_path / ref.replace("/", "_")
        sk.copy(f"docker://{upstream.registry.host}/{ref}", out)
        want = {b.digest for b in upstream.images[ref].blobs}
        assert want <= set(verify_dir_blobs(out))


def test_containerd_straight_from_registry(upstream, containerd):
    hosts = containerd.hosts_dir("direct", {"docker.io": upstream.url})
    idx = upstream.images["library/multi:1"]
    containerd.ctr("-n", "harness", "images", "pull", "--hosts-dir", str(hosts), "--platform", "linux/arm64",
                   "docker.io/library/multi:1")
    have = containerd.ctr("-n", "harness", "content", "ls", "-q").stdout.decode().split()
    assert {b.digest for b in idx.for_arch("arm64").blobs} <= set(have)
    layer = idx.for_arch("arm64").layers[1]
    data = containerd.ctr("-n", "harness", "content", "get", layer.digest).stdout
    assert hashlib.sha256(data).hexdigest() == layer.digest.split(":")[1]


def test_lying_upstream_modes(upstream):
    small = upstream.images["library/small:1"]
    blob = small.layers[1]
    path = f"/v2/library/small/blobs/{blob.digest}"
    with lu.LyingUpstream(upstream.url) as liar, httpx.Client(base_url=liar.url, timeout=10) as c:
        assert c.get(path).content == blob.data
        liar.mode = "flip"
        got = c.get(path).content
        assert len(got) == blob.size and got != blob.data
        liar.mode = "short"
        assert c.get(path).content == blob.data[:-1000]
        liar.mode = "truncate"
        with pytest.raises(httpx.HTTPError):
            c.get(path)
        liar.mode = "ignore_range"
        r = c.get(path, headers={"Range": "bytes=100-"})
        assert r.status_code == 200 and r.content == blob.data
        liar.mode = "wrong_range"
        r = c.get(path, headers={"Range": "bytes=100-"})
        assert r.status_code == 206 and r.headers["Content-Range"] == f"bytes 100-{blob.size - 1}/{blob.size}"
        assert r.content == blob.data[: blob.size - 100]
        liar.mode, liar.times, liar.tampered = "flip", 1, 0
        assert c.get(path).content != blob.data
        assert c.get(path).content == blob.data
        assert liar.ranges_for(blob.digest)[4] == "bytes=100-"
