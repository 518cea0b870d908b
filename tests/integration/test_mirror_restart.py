"""A node stopped in the middle of a large download resumes it after a restart: the upstream is asked with a
Range from a nonzero offset, and the blob completes byte-exact."""

from __future__ import annotations

import threading
import time

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
