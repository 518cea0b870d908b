"""Bad requests straight at the node's registry port: invalid names and digests, traversal, unknown content,
push attempts, oversized heads, a client that stalls. Each gets a proper status and an OCI error body."""

from __future__ import annotations

import hashlib
import select
import socket
import time

import httpx
import pytest

from .harness.raw import raw_request, raw_send

pytestmark = pytest.mark.integration

ZERO = "sha256:" + "0" * 64
UNKNOWN = "sha256:" + hashlib.sha256(b"p2pcache: never pushed").hexdigest()


def req(node, method, target, **kw):
    return raw_request("127.0.0.1", node.port, method, target, **kw)


def assert_oci_error(r, status, *codes):
    assert r.status == status, (r.status, r.body[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    got = r.error_codes()
    assert got and got[0] in codes, f"want one of {codes}, got {got}"


@pytest.mark.parametrize("target", [
    "/v2/library/small/blobs/sha256:xyz",
    "/v2/library/small/blobs/sha256:" + "0" * 63,
    "/v2/library/small/blobs/sha256:" + "A" * 64,
    "/v2/library/small/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
])
def test_invalid_digests(node, target):
    assert_oci_error(req(node, "GET", target), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("target", [
    "/v2/Library/Small/manifests/1",
    "/v2/library/sm@ll/manifests/1",
    "/v2/library//small/manifests/1",
    "/v2/library/small/manifests/-bad",
    "/v2/library/small/manifests/" + "t" * 200,
])
def test_invalid_names_and_tags(node, target):
    assert_oci_error(req(node, "GET", target), 400, "NAME_INVALID", "TAG_INVALID", "MANIFEST_INVALID")


@pytest.mark.parametrize("target", [
    f"/v2/../../../../etc/blobs/{ZERO}",
    f"/v2/library/../../../etc/blobs/{ZERO}",
    "/v2/library/small/../../../../etc/passwd/manifests/1",
    f"/v2/library/%2e%2e/%2e%2e/etc/blobs/{ZERO}",
    f"/v2/library/..%2f..%2fetc/blobs/{ZERO}",
    "/v2/library/small/manifests/1?ns=../../etc",
    "/v2/library/small/manifests/..",
    "/v2/library/small/blobs/sha256:../../../../etc/passwd",
    "/v2/library/small/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
])
def test_traversal_attempts(node, target):
    """Issue 2: `..` gets 400 (an OCI error), never a file outside the store."""
    r = req(node, "GET", target)
    assert r.status == 400, (r.status, r.body[:200])
    assert r.error_codes(), r.body
    assert b"root:" not in r.body
    for f in node.data.rglob("*"):
        assert ".." not in f.name


def test_outside_the_api(node):
    for target in ("/../../etc/passwd", "/v2/../../etc/passwd", "/etc/passwd"):
        r = req(node, "GET", target)
        assert r.status in (400, 404), (target, r.status)
        assert b"root:" not in r.body


def test_unknown_blob_and_tag(node):
    r = req(node, "GET", f"/v2/library/small/blobs/{UNKNOWN}")
    assert_oci_error(r, 404, "BLOB_UNKNOWN")
    r = req(node, "HEAD", f"/v2/library/small/blobs/{UNKNOWN}")
    assert r.status == 404
    r = req(node, "GET", "/v2/library/small/manifests/no-such-tag",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN")
    r = req(node, "GET", "/v2/library/no-such-repo/manifests/1")
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN", "NAME_UNKNOWN")
    r = req(node, "GET", f"/v2/library/small/manifests/{UNKNOWN}")
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("method,target", [
    ("POST", "/v2/library/small/blobs/uploads/"),
    ("PATCH", "/v2/library/small/blobs/uploads/abc"),
    ("PUT", f"/v2/library/small/blobs/uploads/abc?digest={ZERO}"),
    ("PUT", "/v2/library/small/manifests/2"),
    ("DELETE", "/v2/library/small/manifests/1"),
    ("DELETE", f"/v2/library/small/blobs/{ZERO}"),
])
def test_push_methods_are_unsupported(node, upstream, method, target):
    mark = upstream.registry.log_mark()
    r = req(node, method, target, body=b"{}" if method in ("PUT", "PATCH") else b"",
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert_oci_error(r, 405, "UNSUPPORTED")
    # Nothing was passed on to the upstream.
    time.sleep(0.1)
    assert not [a for a in upstream.registry.accesses_since(mark) if a.method not in ("GET", "HEAD")]


def test_oversized_headers_get_431(node):
    r = req(node, "GET", "/v2/", headers={"X-Big": "a" * 20_000})
    assert r.status == 431, r.status
    r = req(node, "GET", "/v2/", headers={f"X-Many-{i}": "b" * 100 for i in range(300)})
    assert r.status == 431, r.status
    assert httpx.get(node.url + "/v2/", timeout=5).status_code == 200


def _still_open(s: socket.socket) -> bool:
    readable, _, _ = select.select([s], [], [], 0)
    if not readable:
        return True
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


def test_stalled_client_is_timed_out_others_are_served(make_node, upstream):
    n = make_node({"docker.io": upstream.url}, env={"P2PCACHE_CLIENT_HEADER_TIMEOUT": "3s"})
    small = upstream.images["library/small:1"]
    stalled = socket.create_connection(("127.0.0.1", n.port), timeout=30)
    stalled.sendall(b"GET /v2/library/small/manifests/1 HTTP/1.1\r\nHost: x\r\n")  # never finished
    stalled2 = socket.create_connection(("127.0.0.1", n.port), timeout=30)  # sends nothing at all
    try:
        t0 = time.monotonic()
        with httpx.Client(base_url=n.url, timeout=10) as c:
            assert c.get("/v2/").status_code == 200
            r = c.get(f"/v2/library/small/blobs/{small.layers[1].digest}")
            assert r.status_code == 200 and r.content == small.layers[1].data
        # Served while the stalled clients still held their connections: nobody waited for them.
        assert _still_open(stalled) and _still_open(stalled2), "stalled clients dropped too early"
        for s in (stalled, stalled2):
            data = b""
            try:
                while chunk := s.recv(4096):
                    data += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            waited = time.monotonic() - t0
            assert waited < 20, "the stalled client was never dropped"
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
        assert time.monotonic() - t0 >= 2.5, "dropped before the configured header timeout"
    finally:
        stalled.close()
        stalled2.close()


def test_request_line_garbage(node):
    r = raw_send("127.0.0.1", node.port, b"THIS IS NOT HTTP\r\n\r\n", timeout=10)
    assert r.status == 400
