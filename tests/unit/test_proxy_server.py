"""The HTTP server as a client sees it: keep-alive, HEAD, sendfile bodies, limits, timeouts, aborted bodies.

Real sockets on 127.0.0.1 port 0, h11 as the client so every byte on the wire is checked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import h11
import pytest
import trio

from p2pcache.config import Settings
from p2pcache.fetch import FetchFailed
from p2pcache.proxy.server import BlobBody, Request, Response, serve_http


class FakeHandle:
    """A BlobHandle over a file whose readable end grows as the test says (a download in progress)."""

    def __init__(self, data: bytes, readable: int | None = None, fail_at: int | None = None) -> None:
        self.size = len(data)
        self.file = tempfile.TemporaryFile()
        self.file.write(data)
        self.file.flush()
        self.end = self.size if readable is None else readable
        self.fail_at = fail_at
        self.changed = trio.Event()

    def advance(self, end: int) -> None:
        self.end = end
        self.changed.set()
        self.changed = trio.Event()

    async def readable(self, offset: int, stop: int | None = None) -> int:
        while True:
            if self.fail_at is not None and offset >= self.fail_at:
                raise FetchFailed("digest mismatch")  # the whole-blob check failed: the body must be cut short
            if self.fail_at is not None:
                return self.fail_at
            if self.end > offset or self.end == self.size:
                return self.end
            await self.changed.wait()


BLOB = os.urandom(3 * 1024 * 1024 + 17)


class App:
    def __init__(self) -> None:
        self.handles: dict[str, FakeHandle] = {"/blob": FakeHandle(BLOB)}
        self.sent: list[tuple[int, bool]] = []
        self.closed: list[str] = []

    async def __call__(self, req: Request) -> Response:
        if req.path == "/hello":
            return Response(200, [("content-type", "text/plain")], b"hello " + req.body)
        if req.path == "/boom":
            raise ValueError("bug")
        if req.path in self.handles:
            h = self.handles[req.path]
            req.resources.callback(self.closed.append, req.path)
            start = int(req.query.get("start", 0))
            end = int(req.query.get("end", h.size))
            return Response(200, [("content-type", "application/octet-stream")],
                            stream=BlobBody(h, start, end), on_sent=lambda n, ok: self.sent.append((n, ok)))
        if req.path.startswith("/echo"):
            return Response(200, [], req.path.encode())
        return Response(404, [], b"nope")


@pytest.fixture
async def server(nursery):
    app = App()
    settings = Settings(client_header_timeout=0.5, client_send_timeout=0.5, max_header_bytes=4096)
    host, port = await nursery.start(serve_http, "127.0.0.1:0", app, settings)
    return app, port


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def request(self, method: str, target: str, headers=(), body: bytes = b"") -> tuple[int, dict, bytes]:
        hs = [("host", "t")] + list(headers)
        if body:
            hs.append(("content-length", str(len(body))))
        await self.stream.send_all(self.conn.send(h11.Request(method=method, target=target, headers=hs)))
        if body:
            await self.stream.send_all(self.conn.send(h11.Data(data=body)))
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()))
        status, rheaders, rbody = 0, {}, bytearray()
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(1 << 20))
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                rheaders = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                rbody += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, rheaders, bytes(rbody)


async def eventually(check, timeout: float = 2.0) -> None:
    """The server finishes its bookkeeping just after the client has the last byte: poll for it."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.005)


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(data)
    out = bytearray()
    with trio.fail_after(5):
        while chunk := await s.receive_some(65536):
            out += chunk
    return bytes(out)


async def test_keep_alive_and_head(server):
    app, port = server
    c = await Client.connect(port)
    status, headers, body = await c.request("GET", "/hello")
    assert (status, body, headers["content-length"]) == (200, b"hello ", "6")
    status, headers, body = await c.request("HEAD", "/hello")
    assert (status, body, headers["content-length"]) == (200, b"", "6")
    status, headers, body = await c.request("GET", "/blob")  # same connection, third request
    assert status == 200 and body == BLOB and headers["content-length"] == str(len(BLOB))
    await eventually(lambda: app.sent == [(len(BLOB), True)])
    await eventually(lambda: app.closed == ["/blob"])  # request resources are released once the body went out


async def test_head_of_blob_sends_no_body(server):
    app, port = server
    c = await Client.connect(port)
    status, headers, body = await c.request("HEAD", "/blob")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(BLOB))
    status, _, body = await c.request("GET", "/hello")  # the connection is still in sync
    assert (status, body) == (200, b"hello ")


async def test_sendfile_range(server):
    _, port = server
    c = await Client.connect(port)
    status, headers, body = await c.request("GET", "/blob?start=1000&end=70000")
    assert body == BLOB[1000:70000] and headers["content-length"] == str(69000)


async def test_body_streams_while_download_progresses(server):
    app, port = server
    h = app.handles["/growing"] = FakeHandle(BLOB, readable=0)
    c = await Client.connect(port)
    result = []

    async def get():
        result.append(await c.request("GET", "/growing"))

    async with trio.open_nursery() as n:
        n.start_soon(get)
        for end in (100, 1 << 20, 2 << 20, len(BLOB)):
            await trio.sleep(0.01)
            h.advance(end)
    assert result[0][2] == BLOB


async def test_failed_download_aborts_body_before_the_end(server):
    app, port = server
    app.handles["/bad"] = FakeHandle(BLOB, fail_at=2 << 20)
    raw = await raw_exchange(port, b"GET /bad HTTP/1.1\r\nhost: t\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"content-length: {len(BLOB)}".encode() in head
    assert len(body) == 2 << 20  # truncated: the client can tell this blob is incomplete
    assert app.sent == [(2 << 20, False)]
    assert app.closed == ["/bad"]


async def test_handler_exception_is_a_500_oci_body(server):
    _, port = server
    status, headers, body = await (await Client.connect(port)).request("GET", "/boom")
    assert status == 500 and headers["content-type"] == "application/json" and b'"UNKNOWN"' in body


async def test_oversized_head_is_431(server):
    _, port = server
    raw = await raw_exchange(port, b"GET /hello HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431 ")
    assert b'"errors"' in raw


async def test_garbage_is_400(server):
    _, port = server
    raw = await raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")


async def test_content_length_and_chunked_together_is_400_and_closed(server):
    """Answered and kept open, the bytes a Content-Length-framing proxy in front counts as this body ran as a
    second request of their own (request smuggling; found in review). RFC 9112 6.1: reject and close."""
    _, port = server
    body = b"0\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = await raw_exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n" % len(body) + body)
    assert raw.startswith(b"HTTP/1.1 400 ") and raw.count(b"HTTP/1.1 ") == 1, raw[:300]
    assert b"connection: close" in raw.lower()


async def test_target_decoded_once(server):
    _, port = server
    c = await Client.connect(port)
    _, _, body = await c.request("GET", "/echo-path%2F%252e%2e")
    assert body == b"/echo-path/%2e."
    status, _, _ = await c.request("GET", "/echo%ff")  # not UTF-8 once decoded
    assert status == 400


async def test_absolute_form_targets_are_accepted(server):
    """RFC 9112 §3.2.2: a server MUST accept a request target in absolute form (a client that thinks it talks to
    a proxy sends one); the path is what follows the authority."""
    _, port = server
    c = await Client.connect(port)
    for target, path in [("http://t/echo-a%2Fb", b"/echo-a/b"), ("HTTP://t:5000/echo?x=1", b"/echo"),
                         ("https://t", None), ("http://t?x=1", None)]:
        status, _, body = await c.request("GET", target)
        if path is None:
            assert status == 404, target
        else:
            assert (status, body) == (200, path), target


async def test_small_body_is_read_and_large_refused(server):
    _, port = server
    c = await Client.connect(port)
    status, _, body = await c.request("POST", "/hello", body=b"world")
    assert (status, body) == (200, b"hello world")
    status, headers, _ = await c.request("POST", "/hello", body=b"x" * 100_000)
    assert status == 413 and headers.get("connection") == "close"


async def test_stalled_client_is_dropped_while_others_are_served(server):
    _, port = server
    stalled = await trio.open_tcp_stream("127.0.0.1", port)
    await stalled.send_all(b"GET /hello HTTP/1.1\r\nhost: t\r\n")  # and never the blank line
    for _ in range(3):
        status, _, body = await (await Client.connect(port)).request("GET", "/hello")
        assert (status, body) == (200, b"hello ")
    with trio.fail_after(2):  # header timeout is 0.5 s
        assert await stalled.receive_some(100) == b""


async def test_client_that_stops_reading_is_dropped(server):
    app, port = server
    big = os.urandom(16 << 20)  # more than the socket buffers hold, so the server must block
    app.handles["/big"] = FakeHandle(big)
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
    await trio.sleep(1.5)  # send timeout is 0.5 s
    assert app.sent and app.sent[0][1] is False and app.sent[0][0] < len(big)
    status, _, body = await (await Client.connect(port)).request("GET", "/hello")
    assert status == 200


async def test_oversized_head_in_pieces_is_431(server):
    _, port = server
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(b"GET /hello HTTP/1.1\r\nhost: t\r\nx-big: ")
    for _ in range(10):
        await s.send_all(b"a" * 1000)
    out = bytearray()
    with trio.fail_after(5):
        while chunk := await s.receive_some(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 431 ")


async def test_expect_100_continue(server):
    _, port = server
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(b"POST /hello HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
    with trio.fail_after(2):
        assert (await s.receive_some(100)).startswith(b"HTTP/1.1 100 ")
    await s.send_all(b"world")
    with trio.fail_after(2):
        reply = b""
        while not reply.endswith(b"hello world"):
            reply += await s.receive_some(1000)
    assert reply.startswith(b"HTTP/1.1 200 ")


@pytest.fixture
def thread_sends(monkeypatch):
    """Big bodies' threads from 1 MiB (8 MiB in the node), and a count of the stretches sent by a thread."""
    from p2pcache.proxy import server as server_module

    monkeypatch.setattr(server_module, "THREAD_SEND_MIN", 1 << 20)
    calls: list[int] = []
    original = server_module._Conn._sendfile_in_thread

    async def counted(self, sock, in_fd, offset, count, threads):  # type: ignore[no-untyped-def]
        calls.append(count)
        return await original(self, sock, in_fd, offset, count, threads)

    monkeypatch.setattr(server_module._Conn, "_sendfile_in_thread", counted)
    return calls


async def test_concurrent_big_bodies_are_sent_by_threads_intact(server, thread_sends):
    """One big body is sent from the loop; the others at the same time by worker threads (both cores)."""
    app, port = server
    big = os.urandom(6 << 20)
    app.handles["/big"] = FakeHandle(big)
    got: list[bytes] = []

    async def one() -> None:
        got.append((await (await Client.connect(port)).request("GET", "/big"))[2])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
    assert got == [big] * 4
    assert thread_sends, "no body went through a thread"
    await eventually(lambda: sorted(app.sent) == [(len(big), True)] * 4)


async def test_a_client_that_stops_reading_a_thread_send_is_dropped_and_shutdown_waits_for_no_one(thread_sends):
    """The thread's socket is blocking with a short send timeout: a client that stops reading is dropped after
    `client_send_timeout`, as on the loop, and cancelling the server ends its threads within a poll step."""
    app = App()
    big = os.urandom(32 << 20)  # more than the socket buffers hold
    app.handles["/big"] = FakeHandle(big)
    for timeout, cancel_after in ((0.5, None), (30.0, 0.5)):
        settings = Settings(client_header_timeout=5, client_send_timeout=timeout)
        app.sent.clear()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                _, port = await nursery.start(serve_http, "127.0.0.1:0", app, settings)
                stalled = []
                for _ in range(2):  # the first is sent from the loop, the second by a thread
                    s = await trio.open_tcp_stream("127.0.0.1", port)
                    await s.send_all(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
                    stalled.append(s)
                    await trio.sleep(0.1)
                if cancel_after is None:
                    await eventually(lambda: len(app.sent) == 2, timeout=3)
                    assert all(not ok and n < len(big) for n, ok in app.sent)
                    status, _, body = await (await Client.connect(port)).request("GET", "/hello")
                    assert status == 200
                else:
                    await trio.sleep(cancel_after)
                nursery.cancel_scope.cancel()
        assert thread_sends


async def test_a_slow_reader_of_a_thread_send_does_not_hold_shutdown_and_its_bytes_count(thread_sends):
    """A client that keeps reading, slowly, kept the thread's one sendfile call going until its body was sent:
    a stopping node waited for it (found in review: 37 s). And the bytes a thread sent before a body was cut
    short were not counted (its log and metrics said 0)."""
    app = App()
    big = os.urandom(32 << 20)
    app.handles["/big"] = FakeHandle(big)
    settings = Settings(client_header_timeout=5, client_send_timeout=30)

    async def slow_reader(port: int) -> None:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await s.receive_some(64 << 10):
                await trio.sleep(0.02)  # ~3 MB/s: the 32 MiB body would take 10 s

    with trio.fail_after(8):
        async with trio.open_nursery() as readers:  # outside the server's scope: they read on while it stops
            async with trio.open_nursery() as server:
                _, port = await server.start(serve_http, "127.0.0.1:0", app, settings)
                for _ in range(2):  # the first is sent from the loop, the second by a thread
                    readers.start_soon(slow_reader, port)
                    await trio.sleep(0.1)
                await trio.sleep(0.5)
                server.cancel_scope.cancel()
                stopping = trio.current_time()
            stopped_after = trio.current_time() - stopping
            readers.cancel_scope.cancel()
    assert thread_sends
    assert stopped_after < 1.5, f"the server took {stopped_after:.1f} s to stop"
    await eventually(lambda: len(app.sent) == 2)
    assert all(not ok and 0 < n < len(big) for n, ok in app.sent), app.sent
