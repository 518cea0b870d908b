"""Eight clients ask for one cold ~20 MB blob at the same moment: all get it byte-exact, and the node fetched it
from the upstream exactly once (counted in the registry's access log)."""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from .harness import images as im
from .harness.fetch import afetch_blob
from .harness.util import proc_mib
from .lying_upstream import LyingUpstream

pytestmark = pytest.mark.integration


async def test_eight_clients_one_cold_blob(node, upstream):
    layer = im.random_layer(20 * 1000 * 1000)  # fresh random bytes: cold everywhere
    repo = f"library/cold-{layer.digest[7:19]}"
    im.push(upstream.url, repo, "1", im.make_image([layer]))
    reg = upstream.registry
    mark = reg.log_mark()
    path = f"/v2/{repo}/blobs/{layer.digest}"

    results = [None] * 8
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=node.url, timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            results[i] = await afetch_blob(client, path)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
    elapsed = time.monotonic() - t0

    for i, f in enumerate(results):
        assert f.complete, f"client {i}: {f}"
        assert "sha256:" + f.sha256 == layer.digest, f"client {i} got wrong bytes"
        assert f.nbytes == layer.size
    gets = reg.count("GET", path, since=mark, settle=0.5)
    assert gets == 1, f"the registry served {gets} GETs for the blob (want exactly 1)"
    upstream_bytes = sum(a.size for a in reg.accesses_since(mark) if a.path == path and a.method == "GET")
    assert upstream_bytes == layer.size
    print(f"8 clients x {layer.size / 1e6:.1f} MB through the node in {elapsed:.2f}s")


async def test_clients_stream_while_the_download_is_in_flight(make_registry, make_node):
    """Time to first byte stays low: waiting clients get verified pieces as they arrive from a slow upstream."""
    reg = make_registry()
    layer = im.random_layer(8 * 1024 * 1024)
    im.push(reg.url, "library/slow", "1", im.make_image([layer]))
    path = f"/v2/library/slow/blobs/{layer.digest}"
    with LyingUpstream(reg.url, mode="trickle", rate=4_000_000, only=layer.digest) as liar:
        node = make_node({"docker.io": liar.url})
        results = [None] * 4
        t0 = time.monotonic()
        async with httpx.AsyncClient(base_url=node.url, timeout=60) as client:

            async def one(i: int) -> None:
                await trio.sleep(0.2 * i)  # late joiners attach to the download in flight
                results[i] = await afetch_blob(client, path)

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, i)
        total = time.monotonic() - t0
        assert liar.gets(layer.digest) == 1
    for i, f in enumerate(results):
        assert f.complete and "sha256:" + f.sha256 == layer.digest, f"client {i}: {f}"
        assert f.ttfb is not None and f.ttfb < total / 2, (
            f"client {i} waited {f.ttfb:.2f}s for its first byte of a {total:.2f}s download")
    print("ttfb", [round(f.ttfb, 2) for f in results], "total", round(total, 2))


def _peak_rss_mib(node) -> float:
    return proc_mib(node.proc.pid, "VmHWM")


async def test_many_small_cold_blobs_at_once_keep_the_node_small(make_registry, make_node):
    """60 clients each pull a different cold 256 KiB blob at once (15 MiB in all): the node's peak RSS stays
    near its idle size. Every cold download zero-filled 8 x 1 MiB pump buffers whatever its size, with nothing
    bounding them together: +300 MB (found in review; the README promises <= 150 MiB, flat)."""
    reg = make_registry()
    layers = [im.random_layer(256 * 1024) for _ in range(60)]
    im.push(reg.url, "library/many", "1", im.make_image(layers))
    node = make_node({"docker.io": reg.url})
    idle = _peak_rss_mib(node)
    results: list = [None] * len(layers)
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=node.url, timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            results[i] = await afetch_blob(client, f"/v2/library/many/blobs/{layers[i].digest}")

        async with trio.open_nursery() as nursery:
            for i in range(len(layers)):
                nursery.start_soon(one, i)
    for la, f in zip(layers, results, strict=True):
        assert f.complete and "sha256:" + f.sha256 == la.digest, f
    grew = _peak_rss_mib(node) - idle
    assert grew < 48, f"the node's peak RSS grew by {grew:.0f} MiB for 15 MiB of cold blobs"


async def test_out_of_file_descriptors_is_503_and_one_log_line(make_registry, make_node):
    """A node whose open-files limit is 64 gets 150 GETs of a stored blob at once: those it has no descriptor
    for get 503 UNAVAILABLE (retryable, an OCI error body), the log says "too many open files" once, and no
    traceback. They got 500 UNKNOWN "internal error" and a traceback each (found in review)."""
    reg = make_registry()
    layer = im.random_layer(5 * 1024 * 1024)
    im.push(reg.url, "library/fds", "1", im.make_image([layer]))
    node = make_node({"docker.io": reg.url}, start=False)
    node.wrap = ["prlimit", "--nofile=64:64", "--"]
    node.start()
    path = f"/v2/library/fds/blobs/{layer.digest}"
    with httpx.Client(base_url=node.url, timeout=30) as c:
        assert c.get(path).status_code == 200  # stored
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=node.url, timeout=60, limits=limits) as client:

        async def one() -> None:
            r = await client.get(path)
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["errors"][0]["code"] == "UNAVAILABLE", r.text
            else:
                assert r.status_code == 200 and len(r.content) == layer.size, (r.status_code, r.text[:200])

        async with trio.open_nursery() as nursery:
            for _ in range(150):
                nursery.start_soon(one)
    assert statuses.count(503) > 0, f"the limit was never reached: {statuses.count(200)} x 200"
    log = node.log_text()
    assert 1 <= log.count("too many open files") <= 3, log[-3000:]
    assert "Traceback" not in log, log[-6000:]
