"""A node stopped in the middle of a large download resumes it after a restart: the upstream is asked with a
Range from a nonzero offset, and the blob completes byte-exact."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .harness import images as im
from .harness.clients import sha256_file
from .harness.fetch import fetch_blob
from .harness.util import wait_until
from .lying_upstream import LyingUpstream

pytestmark = pytest.mark.integration

SIZE = 16 * 1024 * 1024  # 16 pieces of 1 MiB


def test_restart_resumes_download(make_registry, make_node):
    reg = make_registry()
    layer = im.random_layer(SIZE)
    im.push(reg.url, "library/big", "1", im.make_image([layer]))
    path = f"/v2/library/big/blobs/{layer.digest}"
    with LyingUpstream(reg.url, mode="trickle", rate=3_000_000, only=layer.digest) as liar:
        node = make_node({"docker.io": liar.url})
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", fetch_blob(node.url, path, timeout=120)),
                             daemon=True)
        t.start()
        wait_until(lambda: liar.blob_bytes_sent.get(path, 0) >= 6 * 1024 * 1024, 30,
                   "the node to receive 6 MiB from the upstream")
        node.stop()  # SIGTERM mid-download: must still exit cleanly
        t.join(30)
        assert not first["r"].is_complete_wrong(layer.digest)
        before = liar.blob_bytes_sent.get(path, 0)
        assert before < layer.size
        n_requests = liar.gets(layer.digest)

        liar.mode = "honest"
        mark = reg.log_mark()
        node.start()
        got = fetch_blob(node.url, path, timeout=120)
        assert got.complete and "sha256:" + got.sha256 == layer.digest, got
        ranges = liar.ranges_for(layer.digest)[n_requests:]
        offsets = [int(r.split("=", 1)[1].split("-", 1)[0]) for r in ranges if r and r.startswith("bytes=")]
        assert any(o > 0 for o in offsets), f"the restarted node did not resume: upstream requests {ranges}"
        time.sleep(0.3)
        assert [a.status for a in reg.accesses_since(mark) if a.path == path and a.method == "GET"][:1] == [206], \
            "the registry did not answer the resumed request with 206 Partial Content"
        refetched = liar.blob_bytes_sent[path] - before
        assert refetched < layer.size - 4 * 1024 * 1024, f"fetched {refetched} bytes again after the restart"
        files = node.store_files(layer.digest)
        assert files and "sha256:" + sha256_file(files[0]) == layer.digest


def test_a_stored_blob_damaged_while_the_node_was_down_never_reaches_a_client_whole(make_registry, make_node):
    """A blob stored by an earlier run is hashed on its first serve after a start: one flipped byte (bit rot, a
    hand edit) cuts the response before its last byte, removes the file, and the next request fetches it again.
    Before, the node sent the damaged blob whole, to every client, for as long as it kept it."""
    reg = make_registry()
    layer = im.random_layer(8 * 1024 * 1024)
    good = im.random_layer(1024 * 1024)
    im.push(reg.url, "library/rot", "1", im.make_image([layer, good]))
    node = make_node({"docker.io": reg.url})
    for blob in (layer, good):
        got = fetch_blob(node.url, f"/v2/library/rot/blobs/{blob.digest}")
        assert got.complete and "sha256:" + got.sha256 == blob.digest
    [stored] = node.store_files(layer.digest)
    node.stop()
    with open(stored, "r+b") as f:
        f.seek(5 * 1024 * 1024)
        byte = f.read(1)
        f.seek(5 * 1024 * 1024)
        f.write(bytes([byte[0] ^ 0x01]))

    node.start()
    mark = reg.log_mark()
    path = f"/v2/library/rot/blobs/{layer.digest}"
    first = fetch_blob(node.url, path)
    assert not first.complete and f"received {layer.size - 1} bytes" in (first.error or ""), first  # all but the last
    assert node.metric("p2pcache_digest_mismatches_total", source="store") == 1
    assert node.store_files(layer.digest) == []
    again = fetch_blob(node.url, path)
    assert again.complete and "sha256:" + again.sha256 == layer.digest, again
    assert reg.count("GET", path, since=mark) == 1  # fetched once more, from upstream
    # The undamaged blob is checked once, then served as before (and never fetched again).
    for _ in range(2):
        got = fetch_blob(node.url, f"/v2/library/rot/blobs/{good.digest}")
        assert got.complete and "sha256:" + got.sha256 == good.digest
    assert reg.count("GET", f"/v2/library/rot/blobs/{good.digest}", since=mark) == 0
    assert node.metric("p2pcache_digest_mismatches_total", source="store") == 1


def test_admin_verify_hashes_what_this_run_has_not_checked_and_removes_the_damaged(make_registry, make_node):
    """`POST /admin/verify`, a scrub: after a restart every stored blob is hashed once (damaged ones removed,
    without waiting for a client to ask for them); what the node fetched itself since it started is not."""
    reg = make_registry()
    layers = [im.random_layer(2 * 1024 * 1024) for _ in range(3)]
    im.push(reg.url, "library/scrub", "1", im.make_image(layers))
    node = make_node({"docker.io": reg.url})
    for blob in layers[:2]:
        assert fetch_blob(node.url, f"/v2/library/scrub/blobs/{blob.digest}").complete
    [rotten] = node.store_files(layers[0].digest)
    node.stop()
    with open(rotten, "r+b") as f:
        f.write(b"\0\0\0\0")
    node.start()
    assert fetch_blob(node.url, f"/v2/library/scrub/blobs/{layers[2].digest}").complete  # this run's own
    node.store_files()  # its commit has landed
    r = httpx.post(node.admin_url + "/admin/verify", timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["checked"], doc["already"], doc["damaged"]) == (1, 1, [layers[0].digest]), doc
    assert node.store_files(layers[0].digest) == []
    assert node.metric("p2pcache_digest_mismatches_total", source="store") == 1
    doc = httpx.post(node.admin_url + "/admin/verify", timeout=60).json()
    assert (doc["checked"], doc["already"], doc["damaged"]) == (0, 2, []), doc


def test_a_second_sigterm_while_the_node_stops_is_no_death_by_signal(make_registry, make_node):
    """The signal receiver closed after the first SIGTERM and re-raised the second with the default action: the
    node died of it (exit -15) instead of finishing its shutdown (found in review)."""
    import signal

    reg = make_registry()
    node = make_node({"docker.io": reg.url})
    assert httpx.get(f"{node.url}/v2/", timeout=10).status_code == 200
    proc = node.proc
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    node.proc = None
