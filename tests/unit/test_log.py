"""What the node's logging setup lets through: its own lines, never a library's line with a signed URL."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import httpx
import pytest

from p2pcache.log import setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide loggers: put them back for the other tests."""
    root = logging.getLogger()
    names = ("httpx", "httpcore", "hpack")
    saved = (root.level, list(root.handlers), {n: logging.getLogger(n).level for n in names})
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for n, level in saved[2].items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.parametrize("level", ["debug", "info"])
async def test_a_cdn_signed_url_never_reaches_the_log(level: str, restore_logging: None, nursery) -> None:
    """A registry redirects a blob to a CDN's signed URL. httpx logs every request's full URL at INFO and httpcore
    every response's headers (the Location) at DEBUG: at --log-level debug that put the signature (`?sig=...`)
    into the node's log. The node's own debug lines still come through."""
    import functools

    import trio

    async def serve(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        if head.startswith(b"GET /v2/"):
            await stream.send_all(b"HTTP/1.1 307 Temporary Redirect\r\nContent-Length: 0\r\n"
                                  b"Location: /cdn/blob?sig=s3cr3t\r\n\r\n")
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nblob")
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v2/x/blobs/sha256:abc"
    out = io.StringIO()
    setup_logging(level, "text", stream=out)
    async with httpx.AsyncClient(follow_redirects=True) as client:
        assert (await client.get(url)).content == b"blob"
    logging.getLogger("p2pcache.test").debug("a line of our own")
    text = out.getvalue()
    assert "s3cr3t" not in text, text
    assert ("a line of our own" in text) == (level == "debug")


def test_a_throttled_warning_is_one_line_per_interval_with_the_count_held_back(monkeypatch, caplog) -> None:
    import logging

    from p2pcache import log as plog

    clock = [100.0]
    monkeypatch.setattr(plog.time, "monotonic", lambda: clock[0])
    t = plog.Throttled(logging.getLogger("t-throttled"), interval=10.0)
    with caplog.at_level(logging.WARNING, logger="t-throttled"):
        for _ in range(5):
            t.warning("out of %s", "files")
        clock[0] += 10.0
        t.warning("out of %s", "files")
    assert [r.getMessage() for r in caplog.records] == ["out of files",
                                                         "out of files (4 more since the last such line)"]
