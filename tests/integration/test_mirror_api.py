"""The read-only registry API of the node as clients see it: headers, exact lengths, verbatim manifests,
Range, HEAD, /healthz and /metrics."""

from __future__ import annotations

import httpx
import pytest

from .harness import images as im

pytestmark = pytest.mark.integration


@pytest.fixture
def client(node):
    with httpx.Client(base_url=node.url, timeout=30) as c:
        yield c


def test_base_and_health(client):
    r = client.get("/v2/")
    assert r.status_code == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert client.get("/healthz").status_code == 200
    m = client.get("/metrics")
    assert m.status_code == 200 and "p2pcache_requests" in m.text


@pytest.mark.parametrize("ref,accept", [
    ("library/small:1", im.OCI_MANIFEST),
    ("library/dsmall:1", im.DOCKER_MANIFEST),
    ("library/multi:1", ",".join(im.ALL_MANIFEST_TYPES)),
    # curl's default: docker-registry 2.8 turned it into a schema1 conversion of the tag whose digest it cannot
    # serve, and the node answered 404 for a tag that exists (found in review)
    ("library/dsmall:1", "*/*"), ("library/multi:1", "*/*"),
])
def test_manifest_by_tag_and_digest_verbatim(client, upstream, ref, accept):
    thing = upstream.images[ref]
    name, tag = ref.split(":")
    for r_ in (tag, thing.digest):
        h = client.head(f"/v2/{name}/manifests/{r_}", headers={"Accept": accept})
        assert h.status_code == 200
        assert h.headers["Docker-Content-Digest"] == thing.digest
        assert int(h.headers["Content-Length"]) == thing.manifest.size
        r = client.get(f"/v2/{name}/manifests/{r_}", headers={"Accept": accept})
        assert r.status_code == 200
        assert r.content == thing.manifest.data
        assert r.headers["Content-Type"] == thing.manifest.media_type
        assert r.headers["Docker-Content-Digest"] == thing.digest


def test_blob_head_get_range(client, upstream):
    layer = upstream.images["library/small:1"].layers[1]
    path = f"/v2/library/small/blobs/{layer.digest}"
    h = client.head(path)
    assert h.status_code == 200 and int(h.headers["Content-Length"]) == layer.size
    assert h.headers["Docker-Content-Digest"] == layer.digest
    r = client.get(path)
    assert r.content == layer.data and r.headers.get("Accept-Ranges") == "bytes"
    r = client.get(path, headers={"Range": "bytes=10-99"})
    assert r.status_code == 206 and r.content == layer.data[10:100]
    assert r.headers["Content-Range"] == f"bytes 10-99/{layer.size}"
    r = client.get(path, headers={"Range": "bytes=-100"})
    assert r.status_code == 206 and r.content == layer.data[-100:]
    r = client.get(path, headers={"Range": f"bytes={layer.size + 10}-"})
    assert r.status_code == 416


def test_range_on_a_cold_blob(client, upstream):
    layer = im.random_layer(2 * 1024 * 1024 + 7)
    im.push(upstream.url, "library/coldrange", "1", im.make_image([layer]))
    r = client.get(f"/v2/library/coldrange/blobs/{layer.digest}", headers={"Range": "bytes=1000000-1000099"})
    assert r.status_code == 206 and r.content == layer.data[1000000:1000100]
    r = client.get(f"/v2/library/coldrange/blobs/{layer.digest}")
    assert r.content == layer.data


def test_conditional_requests_answered_as_the_registry_answers_them(client, upstream):
    """If-None-Match (an HTTP cache revalidating), If-Range and If-Match (a client resuming) against the node and
    against docker-registry itself: the same statuses. Found in review: the node ignored all three (200 with the
    whole body for a matching If-None-Match, 206 for an If-Range or If-Match that did not match), and sent no
    Date header."""
    thing = upstream.images["library/small:1"]
    layer = thing.layers[1]
    blob = f"/v2/library/small/blobs/{layer.digest}"
    etag = f'"{layer.digest}"'
    cases = [
        (blob, {"If-None-Match": etag}, 304),
        (blob, {"If-None-Match": f'"sha256:{"0" * 64}", W/{etag}'}, 304),
        (blob, {"If-None-Match": '"sha256:0000"'}, 200),
        (blob, {"Range": "bytes=0-3", "If-Range": etag}, 206),
        (blob, {"Range": "bytes=0-3", "If-Range": '"sha256:0000"'}, 200),
        (blob, {"Range": "bytes=0-3", "If-Range": "Sat, 28 Nov 2026 10:00:00 GMT"}, 200),
        (blob, {"If-Match": etag}, 200),
        (blob, {"If-Match": '"sha256:0000"'}, 412),
        (blob, {"If-Match": '"sha256:0000"', "Range": "bytes=100-"}, 412),  # no bytes to splice on
        (f"/v2/library/small/manifests/{thing.digest}", {"If-None-Match": f'"{thing.digest}"'}, 304),
        ("/v2/library/small/manifests/1", {"If-None-Match": f'"{thing.digest}"'}, 304),
        ("/v2/library/small/manifests/1", {"If-None-Match": '"sha256:0000"'}, 200),
    ]
    with httpx.Client(base_url=upstream.url, timeout=30) as registry:
        for path, headers, want in cases:
            headers = {"Accept": im.OCI_MANIFEST, **headers}
            with registry.stream("GET", path, headers=headers) as theirs:  # its 412 declares a body it never sends
                pass
            ours = client.get(path, headers=headers)
            assert (theirs.status_code, ours.status_code) == (want, want), (path, headers)
            if want == 304:
                assert ours.content == b"" and ours.headers["ETag"] in (etag, f'"{thing.digest}"')
            if want == 200 and "Range" in headers:
                assert ours.content == layer.data
    r = client.get(blob)
    assert "Date" in r.headers and r.headers["Cache-Control"] == "max-age=31536000"
    assert "Date" in client.get("/v2/library/small/blobs/sha256:" + "0" * 64).headers  # errors too
