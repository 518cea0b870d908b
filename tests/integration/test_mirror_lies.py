"""An upstream that lies, and a registry whose disk rotted: no client ever receives a complete wrong blob, the
node's store never holds one, and once the upstream tells the truth again the blob is served right."""

from __future__ import annotations

import hashlib

import pytest

from .harness import images as im
from .harness.clients import sha256_file
from .harness.fetch import fetch_blob
from .lying_upstream import LyingUpstream

pytestmark = pytest.mark.integration

SIZE = 3 * 1024 * 1024 + 12345  # several pieces, an odd tail


def _check_store(node, digest):
    """The store holds no file for `digest`, or only the right bytes."""
    for f in node.store_files(digest):
        assert "sha256:" + sha256_file(f) == digest, f"the store holds a wrong blob: {f}"


def _setup(make_registry, name):
    reg = make_registry()
    layer = im.random_layer(SIZE)
    im.push(reg.url, f"library/{name}", "1", im.make_image([layer]))
    return reg, layer, f"/v2/library/{name}/blobs/{layer.digest}"


@pytest.mark.parametrize("mode", ["flip", "truncate", "short", "chunked_cut", "close_cut", "close_long"])
def test_persistent_liar_client_never_gets_a_wrong_blob(mode, make_registry, make_node):
    reg, layer, path = _setup(make_registry, f"lie-{mode}")
    with LyingUpstream(reg.url, mode=mode, only=layer.digest) as liar:
        node = make_node({"docker.io": liar.url}, env={"P2PCACHE_UPSTREAM_RETRIES": "1"})
        for _ in range(2):
            got = fetch_blob(node.url, path)
            assert not got.is_complete_wrong(layer.digest), f"the client got a complete wrong blob: {got}"
            if mode == "flip":  # every upstream response has a wrong byte: the blob cannot be had
                assert not got.complete, got
        if mode == "flip":
            assert node.store_files(layer.digest) == [], "a wrong blob was stored"
        _check_store(node, layer.digest)
        assert liar.tampered >= 1
        # The truth again: served right, and stored right.
        liar.mode = "honest"
        got = fetch_blob(node.url, path)
        assert got.complete and "sha256:" + got.sha256 == layer.digest, got
        _check_store(node, layer.digest)
    if mode == "flip":
        assert node.metric("p2pcache_digest_mismatches_total") >= 1


@pytest.mark.parametrize("plan", [["truncate", "wrong_range"], ["truncate", "ignore_range"],
                                  ["truncate", "wrong_range", "wrong_range", "wrong_range"]])
def test_liar_on_resumed_ranges(plan, make_registry, make_node):
    """The body is cut, and the node's retry with Range meets a lie (206 with bytes from 0) or a 200 whole."""
    reg, layer, path = _setup(make_registry, "lie-range")
    with LyingUpstream(reg.url, plan=plan, only=layer.digest) as liar:
        node = make_node({"docker.io": liar.url})
        got = fetch_blob(node.url, path)
        assert not got.is_complete_wrong(layer.digest), got
        _check_store(node, layer.digest)
        got = fetch_blob(node.url, path)  # the plan is used up: honest now
        assert got.complete and "sha256:" + got.sha256 == layer.digest, (got, liar.seen)
        _check_store(node, layer.digest)
        if "ignore_range" in plan:
            assert node.store_files(layer.digest), "the blob should be stored once it was fetched right"


@pytest.mark.parametrize("mode", ["chunked", "close"])
def test_a_blob_body_without_content_length_is_served_and_stored(mode, make_registry, make_node):
    """A proxy in front of the registry streams blobs chunked, or as HTTP/1.0 to the close (skopeo pulls these
    straight from it): the node learns the size from a HEAD and serves and stores the right blob."""
    reg, layer, path = _setup(make_registry, f"unsized-{mode}")
    with LyingUpstream(reg.url, mode=mode, only=layer.digest) as liar:
        node = make_node({"docker.io": liar.url})
        got = fetch_blob(node.url, path)
        assert got.complete and "sha256:" + got.sha256 == layer.digest, got
        assert liar.tampered >= 1
        assert any(s.method == "HEAD" and s.path == path for s in liar.seen)
    assert node.store_files(layer.digest), "the blob should be stored"
    _check_store(node, layer.digest)


def test_bit_rot_in_the_real_registry(make_registry, make_node):
    reg, layer, path = _setup(make_registry, "rot")
    f = reg.blob_file(layer.digest)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    node = make_node({"docker.io": reg.url}, env={"P2PCACHE_UPSTREAM_RETRIES": "1"})
    got = fetch_blob(node.url, path)
    assert not got.complete and not got.is_complete_wrong(layer.digest), got
    assert node.store_files(layer.digest) == []
    assert node.metric("p2pcache_digest_mismatches_total") >= 1
    # A second client meets the same rot: still no complete wrong blob.
    got = fetch_blob(node.url, path)
    assert not got.complete, got
    assert node.store_files(layer.digest) == []


def test_a_range_of_a_cold_blob_never_completes_with_a_wrong_byte(make_registry, make_node):
    """A Range that ends before the blob does: its bytes stream from upstream before any hash could check them,
    so its last byte waits for the whole-blob digest; a lie ends the 206 short, never complete."""
    reg, layer, path = _setup(make_registry, "lie-part")
    n = len(layer.data) // 2 + 11  # bytes [0, n) hold the one the liar flips (the middle one)
    rng = {"Range": f"bytes=0-{n - 1}"}
    # At 2 MB/s the range's last byte is there ~0.7 s before the body's end shows the blob is wrong.
    with LyingUpstream(reg.url, mode="flip_trickle", only=layer.digest, rate=2_000_000) as liar:
        node = make_node({"docker.io": liar.url}, env={"P2PCACHE_UPSTREAM_RETRIES": "1"})
        got = fetch_blob(node.url, path, headers=rng)
        assert got.status == 206, got
        assert got.error is not None and got.nbytes < n, f"a 206 with a wrong byte completed: {got}"
        assert node.store_files(layer.digest) == []
        liar.mode = "honest"
        got = fetch_blob(node.url, path, headers=rng)
        assert (got.status, got.error, got.nbytes) == (206, None, n), got
        assert got.sha256 == hashlib.sha256(layer.data[:n]).hexdigest()
        _check_store(node, layer.digest)
