"""The upstream misbehaves without lying about content: rate limits (429 passed through with Retry-After, not
retried), server errors (retried, then an OCI error), a body that stalls (abandoned after the read timeout and
resumed). Clients see registry errors, never a hang or a wrong blob."""

from __future__ import annotations

import time

import httpx
import pytest

from .harness import images as im
from .harness.fetch import fetch_blob
from .lying_upstream import LyingUpstream

pytestmark = pytest.mark.integration

ACCEPT = {"Accept": ",".join(im.ALL_MANIFEST_TYPES)}


@pytest.fixture
def pushed(make_registry):
    reg = make_registry()
    image = im.make_image([im.random_layer(2 * 1024 * 1024 + 3)])
    im.push(reg.url, "library/flaky", "1", image)
    return reg, image


def _requests_for(liar, suffix):
    return [s for s in liar.seen if s.path.endswith(suffix)]


def test_429_is_passed_through_with_retry_after(pushed, make_node):
    reg, image = pushed
    layer = image.layers[0]
    with LyingUpstream(reg.url, mode="429", scope="all") as liar:
        node = make_node({"docker.io": liar.url})
        with httpx.Client(base_url=node.url, timeout=30) as c:
            r = c.get("/v2/library/flaky/manifests/1", headers=ACCEPT)
            assert r.status_code == 429, r.text
            assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert r.headers.get("Retry-After") == "7"
            assert len(_requests_for(liar, "/manifests/1")) == 1, "a 429 must not be retried"
            r = c.get(f"/v2/library/flaky/blobs/{layer.digest}")
            assert r.status_code == 429 and r.headers.get("Retry-After") == "7"
            assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert node.store_files(layer.digest) == []


def test_5xx_once_is_retried(pushed, make_node):
    reg, image = pushed
    layer = image.layers[0]
    with LyingUpstream(reg.url, plan=["500"], only=layer.digest) as liar:
        node = make_node({"docker.io": liar.url})
        got = fetch_blob(node.url, f"/v2/library/flaky/blobs/{layer.digest}")
        assert got.complete and "sha256:" + got.sha256 == layer.digest, got
        assert liar.gets(layer.digest) >= 2


def test_5xx_always_is_an_oci_error(pushed, make_node):
    reg, image = pushed
    with LyingUpstream(reg.url, mode="503", scope="all") as liar:
        node = make_node({"docker.io": liar.url}, env={"P2PCACHE_UPSTREAM_RETRIES": "1"})
        t0 = time.monotonic()
        with httpx.Client(base_url=node.url, timeout=60) as c:
            r = c.get(f"/v2/library/flaky/blobs/{image.layers[0].digest}")
            assert r.status_code >= 500 and r.json()["errors"], (r.status_code, r.text)
            r = c.get("/v2/library/flaky/manifests/1", headers=ACCEPT)
            assert r.status_code >= 500 and r.json()["errors"], (r.status_code, r.text)
        assert time.monotonic() - t0 < 30
        assert liar.seen


def test_stalled_upstream_body_is_abandoned_and_resumed(pushed, make_node):
    reg, image = pushed
    layer = image.layers[0]
    with LyingUpstream(reg.url, plan=["stall"], only=layer.digest) as liar:
        node = make_node({"docker.io": liar.url}, env={"P2PCACHE_UPSTREAM_READ_TIMEOUT": "2s"})
        t0 = time.monotonic()
        got = fetch_blob(node.url, f"/v2/library/flaky/blobs/{layer.digest}", timeout=60)
        elapsed = time.monotonic() - t0
        assert not got.is_complete_wrong(layer.digest), got
        assert got.complete and "sha256:" + got.sha256 == layer.digest, (got, liar.ranges_for(layer.digest))
        assert elapsed < 30, f"took {elapsed:.1f}s"
        assert liar.gets(layer.digest) >= 2
