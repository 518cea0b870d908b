"""Blob bodies read past h11 (oci/rawbody.py), against a real HTTP/1.1 server on a loopback socket.

MockTransport has no connection to read from, so these tests run a small keep-alive server in the test's
nursery. They check what the fast path must keep from httpcore: exact bytes (including those h11 had buffered
with the head), a detached connection never going back to the pool, resumes of a short body, and the fallback
when a response is not a plain Content-Length body.
"""

from __future__ import annotations

import functools
import hashlib

import httpx
import pytest
import trio

from p2pcache.config import Settings
from p2pcache.oci.rawbody import RawBody, detach_body
from p2pcache.oci.reference import Repo
from p2pcache.oci.upstream import CHUNK_SIZE, Upstream

REPO = Repo("docker.io", "library/alpine")
DATA = hashlib.sha256(b"seed").digest() * (3 * CHUNK_SIZE // 32) + b"tail"  # 3 MiB + 4 bytes
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class Server:
    """Serves DATA at any /blobs/ path with keep-alive; `cut` makes the next answers stop early and close."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[str] = []  # the Range header of each request ("" for none)
        self.cut: list[int] = []
        self.chunked = False
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self.serve, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                got = await stream.receive_some(65536)
                if not got:
                    return
                buf += got
            head, buf = buf.split(b"\r\n\r\n", 1)
            rng = next((line.split(b"=", 1)[1].decode() for line in head.split(b"\r\n")
                        if line.lower().startswith(b"range:")), "")
            self.requests.append(rng)
            start = int(rng.split("-")[0]) if rng else 0
            body = DATA[start:]
            if rng:
                status = b"206 Partial Content\r\nContent-Range: bytes %d-%d/%d" % (start, len(DATA) - 1, len(DATA))
            else:
                status = b"200 OK"
            if self.chunked:
                await stream.send_all(b"HTTP/1.1 %s\r\nTransfer-Encoding: chunked\r\n\r\n" % status)
                for i in range(0, len(body), 100_000):
                    part = body[i:i + 100_000]
                    await stream.send_all(b"%x\r\n%s\r\n" % (len(part), part))
                await stream.send_all(b"0\r\n\r\n")
                continue
            # The head and the first body bytes in one write: h11 receives them in one read.
            first = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body[:5000]
            if self.cut:
                n = self.cut.pop(0)
                await stream.send_all(first[: len(first) - 5000 + n] if n < 5000 else first + body[5000:n])
                await stream.aclose()
                return
            await stream.send_all(first)
            await stream.send_all(body[5000:])


def upstream(url: str) -> Upstream:
    return Upstream(Settings(upstreams={"docker.io": url}, upstream_retries=2), retry_backoff=0.001)


async def read(up: Upstream, offset: int = 0) -> tuple[bytes, bool]:
    async with up.open_blob(REPO, DIGEST, offset) as blob:
        fast = isinstance(blob._chunks, RawBody) and blob._chunks._sock is not None  # plain TCP: the socket
        return b"".join([c async for c in blob]), fast


async def test_the_body_is_read_past_h11_byte_exact(nursery: trio.Nursery) -> None:
    server = Server()
    up = upstream(await server.start(nursery))
    with trio.fail_after(10):
        got, fast = await read(up)
        assert fast, "a plain HTTP/1.1 Content-Length body takes the fast path"
        assert got == DATA
        # Again, and a ranged read: a detached connection never goes back to the pool half-read.
        got2, _ = await read(up)
        got3, fast3 = await read(up, CHUNK_SIZE + 3)
    await up.aclose()
    assert got2 == DATA and got3 == DATA[CHUNK_SIZE + 3:] and fast3
    assert server.connections == 3
    assert server.requests == ["", "", f"{CHUNK_SIZE + 3}-"]


@pytest.mark.parametrize("cut", [100, 5000 + CHUNK_SIZE + 17])
async def test_a_short_body_is_resumed_with_range(nursery: trio.Nursery, cut: int) -> None:
    server = Server()
    server.cut = [cut]
    up = upstream(await server.start(nursery))
    with trio.fail_after(10):
        got, fast = await read(up)
    await up.aclose()
    assert fast and got == DATA
    assert server.requests == ["", f"{cut}-"]


async def test_a_chunked_body_falls_back_to_httpx(nursery: trio.Nursery) -> None:
    server = Server()
    server.chunked = True
    url = await server.start(nursery)
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", f"{url}/v2/x/blobs/{DIGEST}") as resp:
            assert detach_body(resp, len(DATA), CHUNK_SIZE) is None
            assert b"".join([c async for c in resp.aiter_raw()]) == DATA


async def test_a_mounted_transport_falls_back_to_httpx() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=DATA))
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("GET", f"http://registry.test/v2/x/blobs/{DIGEST}") as resp:
            assert detach_body(resp, len(DATA), CHUNK_SIZE) is None
