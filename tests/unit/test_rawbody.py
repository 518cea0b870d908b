"""Blob bodies read past h11 (oci/rawbody.py), against a real HTTP/1.1 server on a loopback socket.

MockTransport has no connection to read from, so these tests run a small keep-alive server in the test's
nursery. They check what the fast path must keep from httpcore: exact bytes (including those h11 had buffered
with the head), a detached connection never going back to the pool, resumes of a short body, and the fallback
when a response is not a plain Content-Length body. The last tests drive a `Fetcher` over the same server, so a
cold download takes the worker-thread pump (`fetch.Download._pump`): exact bytes, resumes after a cut or a
stall from the exact last byte, a lagging hasher that still marks every chunk, a full disk that fails without a
resume, and a cancellation that stops its threads at once; the same pump over TLS (a self-signed certificate
made with the openssl command), byte exact, resumes included.
"""

from __future__ import annotations

import functools
import hashlib
import os
import ssl
import time
from pathlib import Path

import httpx
import pytest
import trio

from p2pcache.config import Settings
from p2pcache.fetch import Download, Fetcher, FetchFailed
from p2pcache.metrics import Metrics
from p2pcache.oci.errors import OciError
from p2pcache.oci.rawbody import RawBody, detach_body
from p2pcache.oci.reference import Repo
from p2pcache.oci.upstream import CHUNK_SIZE, Upstream
from p2pcache.store.blobs import BlobStore
from tests.selfsigned import self_signed_server

REPO = Repo("docker.io", "library/alpine")
DATA = hashlib.sha256(b"seed").digest() * (3 * CHUNK_SIZE // 32) + b"tail"  # 3 MiB + 4 bytes
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class Server:
    """Serves DATA at any /blobs/ path with keep-alive; `cut` makes the next answers stop early and close."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[str] = []  # the Range header of each request ("" for none)
        self.cut: list[int] = []
        self.stall: list[int] = []  # the next answers send this many body bytes, then nothing until cancelled
        self.chunked = False
        self.ignore_range = False  # answer every request with the whole body (200), Range or not
        self.port = 0

    async def start(self, nursery: trio.Nursery, tls: ssl.SSLContext | None = None) -> str:
        if tls is None:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, self.serve, 0, host="127.0.0.1"))
        else:
            listeners = await nursery.start(functools.partial(trio.serve_ssl_over_tcp, self.serve, 0, tls,
                                                              host="127.0.0.1"))
            listeners = [listener.transport_listener for listener in listeners]
        self.port = listeners[0].socket.getsockname()[1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        try:
            await self._serve(stream)
        except trio.BrokenResourceError:
            pass  # a TLS client that hung up without a close_notify (the node drops a connection it read past)

    async def _serve(self, stream: trio.abc.Stream) -> None:
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
            if self.ignore_range:
                rng = ""
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
            if self.stall:
                n = self.stall.pop(0)
                await stream.send_all(first[: len(first) - 5000 + n] if n < 5000 else first + body[5000:n])
                await trio.sleep_forever()
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


class Pumps:
    """Counts the downloads that took the worker-thread pump (and those over TLS), and the pumps running."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = self.running = self.tls = 0
        real = Download._pump

        async def pump(download: Download, *args: object, **kwargs: object) -> BaseException | None:
            self.started += 1
            self.tls += args[0].tls is not None  # type: ignore[attr-defined]
            self.running += 1
            try:
                return await real(download, *args, **kwargs)  # type: ignore[arg-type]
            finally:
                self.running -= 1

        monkeypatch.setattr(Download, "_pump", pump)


async def cold_fetch(tmp_path: Path, url: str, nursery: trio.Nursery, read_timeout: float = 10.0,
                     ca: Path | None = None) -> Fetcher:
    settings = Settings(data=tmp_path, upstreams={"docker.io": url}, upstream_retries=2,
                        upstream_read_timeout=read_timeout, upstream_ca=ca)
    metrics = Metrics()
    up = Upstream(settings, metrics, retry_backoff=0.001)
    fetcher = Fetcher(settings, BlobStore(settings.data, metrics=metrics), up, metrics)
    await nursery.start(fetcher.run)
    return fetcher


async def read_blob(fetcher: Fetcher) -> bytes:
    async with fetcher.open_blob(REPO, DIGEST) as h:
        out = bytearray()
        while len(out) < h.size:
            end = await h.readable(len(out))
            out += os.pread(h.file.fileno(), end - len(out), len(out))
    return bytes(out)


async def test_a_cold_download_is_pumped_by_worker_threads_byte_exact(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pumps = Pumps(monkeypatch)
    server = Server()
    fetcher = await cold_fetch(tmp_path, await server.start(nursery), nursery)
    with trio.fail_after(10):
        assert await read_blob(fetcher) == DATA
        while fetcher.store.stat(DIGEST) is None:
            await trio.sleep(0.01)
    assert pumps.started == 1 and server.requests == [""]
    assert fetcher.metrics.registry.get_sample_value("p2pcache_upstream_bytes_total") == len(DATA)


@pytest.mark.parametrize("how", ["cut", "stall"])
async def test_the_pump_resumes_a_cut_or_stalled_body_from_its_last_byte(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    pumps = Pumps(monkeypatch)
    server = Server()
    at = 5000 + CHUNK_SIZE + 17
    (server.cut if how == "cut" else server.stall).append(at)
    fetcher = await cold_fetch(tmp_path, await server.start(nursery), nursery, read_timeout=0.3)
    with trio.fail_after(10):
        assert await read_blob(fetcher) == DATA
    # Every byte received before the cut was written: the resume asks for exactly the rest.
    assert server.requests == ["", f"{at}-"] and pumps.started == 2


async def test_cancelling_a_pumped_download_stops_its_threads_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pumps = Pumps(monkeypatch)
    server = Server()
    server.stall.append(2 * CHUNK_SIZE)
    async with trio.open_nursery() as outer:
        url = await server.start(outer)
        with trio.fail_after(5):  # the read timeout (10 s) would end a thread that missed the cancellation
            async with trio.open_nursery() as nursery:
                fetcher = await cold_fetch(tmp_path, url, nursery)
                async with fetcher.open_blob(REPO, DIGEST) as h:
                    while await h.readable(0) < CHUNK_SIZE:
                        await trio.sleep(0.01)
                assert pumps.running == 1
                nursery.cancel_scope.cancel()
        assert pumps.running == 0 and fetcher.downloads() == {}
        outer.cancel_scope.cancel()


async def test_the_pump_hashes_every_chunk_received_before_the_body_ended(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hasher thread lags (slowed here): the receiver's end must not make it drop chunks still queued,
    which would leave them unmarked and cost a resume request for bytes already received."""
    real = Download._write_batch

    def slow(download: Download, batch: list, *, write: bool = True) -> object:
        time.sleep(0.05)
        return real(download, batch, write=write)

    monkeypatch.setattr(Download, "_write_batch", slow)
    server = Server()
    fetcher = await cold_fetch(tmp_path, await server.start(nursery), nursery)
    with trio.fail_after(10):
        assert await read_blob(fetcher) == DATA
    assert server.requests == [""]


async def test_a_full_disk_under_the_pump_fails_the_download_without_resuming(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pumps = Pumps(monkeypatch)
    server = Server()
    fetcher = await cold_fetch(tmp_path, await server.start(nursery), nursery)

    def no_space(fd: int, data: object, offset: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("p2pcache.fetch._pwrite_all", no_space)
    with trio.fail_after(10):
        async with fetcher.open_blob(REPO, DIGEST) as h:
            with pytest.raises(FetchFailed):
                await h.readable(0)
        while DIGEST in fetcher.downloads():
            await trio.sleep(0.01)
    assert pumps.started == 1 and server.requests == [""] and fetcher.store.stat(DIGEST) is None


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server context with a self-signed certificate for 127.0.0.1, and that certificate's file (the node's
    `--upstream-ca`)."""
    return self_signed_server(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("cut", [None, 5000 + CHUNK_SIZE + 17])
async def test_a_tls_body_is_decrypted_by_the_pump_byte_exact(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        tls_pair: tuple[ssl.SSLContext, Path], cut: int | None) -> None:
    """Over TLS (Docker Hub's case) the pump's receiver decrypts with the connection's own session (trio's
    SSLObject and BIOs): exact bytes, and a cut body resumes from its exact last byte over a new TLS
    connection."""
    pumps = Pumps(monkeypatch)
    server = Server()
    if cut is not None:
        server.cut.append(cut)
    url = await server.start(nursery, tls_pair[0])
    fetcher = await cold_fetch(tmp_path, url, nursery, ca=tls_pair[1])
    with trio.fail_after(10):
        assert await read_blob(fetcher) == DATA
    assert pumps.tls == pumps.started == (1 if cut is None else 2)
    assert server.requests == ([""] if cut is None else ["", f"{cut}-"])


async def test_an_upstream_with_an_untrusted_certificate_is_refused(
        nursery: trio.Nursery, tmp_path: Path, tls_pair: tuple[ssl.SSLContext, Path]) -> None:
    """Without `--upstream-ca` the self-signed upstream is not trusted: the client gets an error, no bytes."""
    server = Server()
    fetcher = await cold_fetch(tmp_path, await server.start(nursery, tls_pair[0]), nursery)
    with trio.fail_after(10), pytest.raises(OciError):
        await read_blob(fetcher)
    assert server.requests == [] and fetcher.store.stat(DIGEST) is None


async def test_many_pumps_at_once_never_wait_on_each_others_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pump runs three threads that wait on each other. From trio's shared limiter (40 threads), 14 pumps
    could each hold two and wait for a third for ever (found in review); each pump has a limiter of its own.
    One small buffer a pump, so no body fits in its buffers and every receiver waits for its writer."""
    import socket

    from p2pcache import pump as pump_module
    from p2pcache.oci.rawbody import SocketBody
    from p2pcache.pump import SocketPump

    monkeypatch.setattr(pump_module, "BUFFERS", 1)
    monkeypatch.setattr(pump_module, "CHUNK", 4096)

    n, size = 24, 300_000
    payload = os.urandom(size)
    pairs = [socket.socketpair() for _ in range(n)]
    got: list[bytearray] = [bytearray(size) for _ in range(n)]

    def writer(k: int):
        def write(pos: int, view: memoryview) -> None:
            got[k][pos:pos + len(view)] = view
        return write

    async def one(k: int, a: socket.socket) -> None:
        pump = SocketPump(SocketBody(a, None, b"", size, 10.0), write=writer(k),
                          digest=lambda pos, view: len(view), count=lambda n: None)
        await _run_draining(pump, size)

    def feed() -> None:
        for _, b in pairs:
            b.settimeout(15)  # deadlocked pumps read nothing: this fails the test instead of hanging it
            b.sendall(payload)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for k, (a, _) in enumerate(pairs):
                nursery.start_soon(one, k, a)
            await trio.to_thread.run_sync(feed, limiter=trio.CapacityLimiter(1))
    for _, b in pairs:
        b.close()
    assert all(bytes(g) == payload for g in got)


async def test_pumps_share_one_buffer_budget_and_size_buffers_to_the_body() -> None:
    """A pump's buffers are sized to its body, and all pumps of a node hold at most the budget at once (one
    buffer each at least, so none waits for ever): 16 pumps on a budget of 3 buffers all finish."""
    import socket

    from p2pcache.oci.rawbody import SocketBody
    from p2pcache.pump import BufferBudget, SocketPump

    n, size = 16, 50_000
    budget = BufferBudget(3 * size)
    payload = os.urandom(size)
    pairs = [socket.socketpair() for _ in range(n)]
    peak = 0
    pumps: list[SocketPump] = []

    async def one(a: socket.socket) -> None:
        nonlocal peak

        def write(pos: int, view: memoryview) -> None:
            nonlocal peak
            peak = max(peak, budget.lent)

        pump = SocketPump(SocketBody(a, None, b"", size, 10.0), write=write,
                          digest=lambda pos, view: len(view), count=lambda n: None, budget=budget)
        pumps.append(pump)
        await _run_draining(pump, size)

    def feed() -> None:
        for _, b in pairs:
            b.settimeout(15)
            b.sendall(payload)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for a, _ in pairs:
                nursery.start_soon(one, a)
            await trio.to_thread.run_sync(feed, limiter=trio.CapacityLimiter(1))
    for _, b in pairs:
        b.close()
    assert all(p.buffer_size == size and p.buffers == 1 for p in pumps)
    assert 0 < peak <= 3 * size and budget.lent == 0


async def _run_draining(pump, size: int) -> None:
    """Run `pump` over `size` bytes while a task reads its results (as the fetcher does)."""
    async with trio.open_nursery() as nursery:
        async def drain() -> None:
            async for _ in pump.results:
                pass
        nursery.start_soon(drain)
        assert await pump.run(0, size) is None


async def test_an_upstream_that_stalls_at_every_answer_fails_the_download_after_a_few_timeouts(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """It sent part of the body, then nothing, every time, and answered Range requests with the whole body
    (read past, not pumped): the download's resumes and the upstream client's own each waited out the read
    timeout, 17 requests and 16 timeouts for one blob, 8.7 minutes at 30 s (found in review). Now a stall is
    resumed only by the download: its idle budget, then the client's response is aborted."""
    from p2pcache.fetch import MAX_IDLE_RESUMES

    server = Server()
    server.ignore_range = True
    server.stall = [3 * CHUNK_SIZE // 2] * 50
    fetcher = await cold_fetch(tmp_path, await server.start(nursery), nursery, read_timeout=0.2)
    with trio.fail_after(20):
        with pytest.raises(FetchFailed):
            async with fetcher.open_blob(REPO, DIGEST) as h:
                while True:
                    await h.readable(h.size - 1)
    assert len(server.requests) <= MAX_IDLE_RESUMES + 3, server.requests
