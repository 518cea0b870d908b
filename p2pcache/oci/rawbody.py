"""Read a blob response's body straight from its connection, past h11's receive buffer.

Why: on a cold pull the event loop is the bottleneck, and httpcore hands every body byte through h11's
`ReceiveBuffer`, which copies it twice (`+=` into a bytearray, then a slice out of it) and wraps each piece in a
`Data` event. A py-spy profile of a 1 GiB cold pull put 56% of the loop thread's samples under httpcore's
body iterator, against 13% for the socket reads themselves. httpx still makes the request (auth, redirects,
retries, status and header checks); only the body of a plain HTTP/1.1 response with a `Content-Length` is read
by us, from the same network stream httpcore exposes as the `network_stream` response extension.

How: after the head, the bytes h11 already received but did not parse (`h11.Connection.trailing_data`) are the
start of the body; the rest comes from `network_stream.read()`, exactly `Content-Length` bytes. The connection
is then useless to the pool (h11 never saw the body), and it is not returned there: closing the response closes
it, because httpcore only keeps a connection whose h11 state reached DONE on both sides.

Reaching the h11 state means walking private attributes of httpx and httpcore (one chain, checked step by step).
If any step is missing (another httpx or httpcore release, a mounted transport such as `httpx.MockTransport`, a
chunked or HTTP/2 response), `detach_body` returns None and the caller iterates `aiter_raw()` as before: an
upgrade may cost speed, never correctness.
"""

from __future__ import annotations

import math
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import h11
import httpcore
import httpx
import trio


def _h11_state(resp: httpx.Response) -> h11.Connection | None:
    """The h11 connection under an httpx response streamed over httpcore's HTTP/1.1 pool, if that is what it is."""
    stream: Any = resp.stream
    for attr in ("_stream", "_httpcore_stream", "_stream", "_connection", "_h11_state"):
        stream = getattr(stream, attr, None)
        if stream is None:
            return None
    return stream if isinstance(stream, h11.Connection) else None


@dataclass
class TlsState:
    """The TLS session of a connection, as trio's SSLStream holds it: the `ssl.SSLObject` and its two memory
    BIOs (ciphertext in from the socket, out to it). A reader in a worker thread decrypts with these while no
    task uses the stream; the session stays consistent for the stream's close afterwards."""

    ssl_object: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


@dataclass
class SocketBody:
    """The rest of a body for a reader in a worker thread: `sock`, a duplicate of the connection's TCP socket
    (the reader closes it; closing the response still closes the connection), whose Python-level timeout the
    reader sets as it likes; `tls`, the session to decrypt with (None: plain TCP); `leftover`, body bytes
    already received; then `left` more bytes to read; `timeout`, the response's read timeout (None: none)."""

    sock: socket.socket
    tls: TlsState | None
    leftover: bytes
    left: int
    timeout: float | None


def _tls_state(stream: httpcore.AsyncNetworkStream) -> TlsState | None:
    """The TLS session under httpcore's trio stream, if it is one we can read past (private attributes of
    httpcore's TrioStream and trio's SSLStream, checked step by step; None if anything differs)."""
    ssl_stream = getattr(stream, "_stream", None)
    if not isinstance(ssl_stream, trio.SSLStream) or not isinstance(ssl_stream.transport_stream, trio.SocketStream):
        return None
    obj = stream.get_extra_info("ssl_object")
    incoming, outgoing = getattr(ssl_stream, "_incoming", None), getattr(ssl_stream, "_outgoing", None)
    if not isinstance(obj, ssl.SSLObject) or not isinstance(incoming, ssl.MemoryBIO) \
            or not isinstance(outgoing, ssl.MemoryBIO):
        return None
    return TlsState(obj, incoming, outgoing)


class RawBody:
    """The rest of one response body, `length` bytes: first what h11 had buffered, then socket reads.

    Iterates chunks of at most `read_size` bytes; ends early (without an error) if the peer closes the
    connection first, as `aiter_raw()` would let the caller notice a short body. Read errors and stalls
    longer than `timeout` are raised as httpx's `ReadError` / `ReadTimeout`, the errors `aiter_raw()` raises.
    """

    def __init__(self, stream: httpcore.AsyncNetworkStream, leftover: bytes, length: int, read_size: int,
                 timeout: float | None) -> None:
        self._stream = stream
        # Plain TCP: read the trio socket itself under a bare cancel scope, skipping httpcore's per-read
        # fail_after and exception mapping (~8% of the loop thread on a cold pull). TLS: the stream's read().
        sock = stream.get_extra_info("socket") if stream.get_extra_info("ssl_object") is None else None
        self._sock = sock if isinstance(sock, trio.socket.SocketType) else None
        # TLS: nothing to read past on the loop, but a worker thread may decrypt the body (detach_socket).
        self._tls = _tls_state(stream) if self._sock is None else None
        self._leftover = leftover[:length]
        self._left = length
        self._read_size = read_size
        self._timeout = timeout

    def __aiter__(self) -> RawBody:
        return self

    async def __anext__(self) -> bytes:
        if self._left <= 0:
            raise StopAsyncIteration
        if self._leftover:
            chunk, self._leftover = self._leftover, b""
        else:
            chunk = await self._read(min(self._read_size, self._left))
            if not chunk:
                self._left = 0
                raise StopAsyncIteration
        self._left -= len(chunk)
        return chunk

    async def _read(self, n: int) -> bytes:
        if self._sock is None:
            try:
                return await self._stream.read(n, self._timeout)
            except httpcore.TimeoutException as e:
                raise httpx.ReadTimeout(str(e) or "read timed out") from e
            except httpcore.NetworkError as e:
                raise httpx.ReadError(str(e) or "read failed") from e
        deadline = math.inf if self._timeout is None else trio.current_time() + self._timeout
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                return await self._sock.recv(n)
            except OSError as e:
                raise httpx.ReadError(str(e) or "read failed") from e
        assert scope.cancelled_caught
        raise httpx.ReadTimeout(f"no byte from upstream for {self._timeout} s")

    def detach_socket(self) -> SocketBody | None:
        """Hand the rest of the body to a reader in a worker thread (see `fetch.Download._pump`), or None (a TLS
        stream whose session we cannot reach). Afterwards this iterator yields nothing: the bytes are the
        thread's."""
        sock = self._sock if self._tls is None else self._stream.get_extra_info("socket")
        if not isinstance(sock, trio.socket.SocketType) or self._left <= 0:
            return None
        dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        leftover = self._leftover
        body = SocketBody(dup, self._tls, leftover, self._left - len(leftover), self._timeout)
        self._leftover, self._left = b"", 0
        return body

    async def aclose(self) -> None:
        """Nothing of its own to close: closing the httpx response closes the connection."""


def detach_body(resp: httpx.Response, length: int, read_size: int) -> RawBody | None:
    """A `RawBody` over `resp`'s body of `length` bytes (its Content-Length), or None when we cannot read past
    h11 safely here: then iterate `resp.aiter_raw()`."""
    if resp.http_version != "HTTP/1.1" or "transfer-encoding" in resp.headers or resp.is_stream_consumed:
        return None
    stream = resp.extensions.get("network_stream")
    state = _h11_state(resp)
    if stream is None or state is None or state.their_state is not h11.SEND_BODY:
        return None
    leftover, _closed = state.trailing_data
    timeout = resp.request.extensions.get("timeout", {}).get("read")
    return RawBody(stream, leftover, length, read_size, timeout)
