"""A small HTTP/1.1 server: h11 for the protocol, trio for the sockets, os.sendfile for blob bodies.

One task per connection (keep-alive), one handler call per request. The server owns the limits every client
is held to, so a slow or hostile client can only ever cost its own connection:
- a request head larger than `max_header_bytes` gets 431 (h11's `max_incomplete_event_size`);
- a client that stalls while sending its request for `client_header_timeout` is dropped (this also bounds how
  long an idle keep-alive connection is kept);
- a client that stops reading for `client_send_timeout` is dropped (the timeout is on progress, not on the
  whole transfer, so a slow-but-moving client of a big blob is fine);
- request bodies are read only up to `max_body_bytes` (the registry port is read-only; admin takes small JSON),
  and only after `before_body` (if given) saw the head: the registry port answers a push 405 from its head,
  not 413 after reading (or inviting with 100-continue) a layer's worth of it.

Blob bodies (`Response.stream`) take the fast path: headers through h11, then the bytes straight from the
blob's file to the non-blocking socket with `os.sendfile`, waiting on `trio.lowlevel.wait_writable` when the
socket is full and on `BlobHandle.readable()` while the blob is still downloading. While another big body is
being sent, a big stretch goes by a blocking sendfile in a worker thread instead (`_sendfile_in_thread`), so
several clients use more than the loop's one core. h11 still accounts for the
body: we pass it a `_SendfileRange` (an object whose `len()` is the byte count) through
`send_with_data_passthrough`, which hands the same object back instead of bytes, so h11 checks Content-Length
and keep-alive exactly as for a bytes body.

This module must never send a complete body that is not what the handler meant: if anything fails after the
headers went out (FetchFailed from `readable()`, a short file, a client error), the connection is closed
without the rest, so the client sees a truncated response, never a complete wrong blob. It never interprets
paths or knows about registries: that is the handler's job.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import functools
import logging
import os
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, BinaryIO, Protocol

import h11
import trio

from p2pcache.config import Settings
from p2pcache.hostport import parse_hostport
from p2pcache.log import Throttled
from p2pcache.oci.errors import OciError
from p2pcache.pump import run_cancellable

log = logging.getLogger(__name__)
# Out of file descriptors: one line every 10 s, not a traceback per request.
_out_of_files = Throttled(log)

SERVER_NAME = "p2pcache"
_READ_SIZE = 64 * 1024
DEFAULT_MAX_BODY = 64 * 1024  # registry requests carry no body; admin JSON is tiny
LINGER_SECONDS = 1.0  # how long an error response waits for the client to stop sending before closing
LINGER_BYTES = 1 << 20  # and how much of what it still sends is read and dropped meanwhile
# While one big body is being sent, a readable stretch of at least THREAD_SEND_MIN bytes of another is sent by
# one blocking sendfile in a worker thread (one of SEND_THREADS; when all are busy, from the loop). Why: the loop
# is one thread, so four clients of a warm 1 GiB blob got 2.35 GB/s together from it (docker-registry: 3.66 on
# both cores); with the threads, 3.7-4.3 GB/s (256 MiB: 4.2-5.3). One body alone stays on the loop: 6.2-6.8 GB/s
# there in its fast runs against 5.2-5.6 from a thread (bench/README.md).
THREAD_SEND_MIN = 8 << 20
SEND_THREADS = 16
# How long a blocking sendfile waits for room in the socket before it looks at its cancel flag again.
SEND_POLL = 0.25
# A send failing with one of these means the client went away (not a fault of ours).
_GONE_ERRNOS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)


class BlobSource(Protocol):
    """What the fast path needs from a blob: `fetch.BlobHandle` satisfies it (ARCHITECTURE.md)."""

    size: int
    file: BinaryIO

    async def readable(self, offset: int, stop: int | None = None) -> int: ...


@dataclass
class BlobBody:
    """Bytes [start, end) of a blob, sent with os.sendfile as they become readable."""

    handle: BlobSource
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class Request:
    method: str
    target: str  # raw request target, as sent
    path: str  # percent-decoded once; may contain anything, the handler validates
    query: dict[str, str]
    headers: list[tuple[str, str]]  # names lower-case
    body: bytes = b""
    # Closed by the server after the response (body included) was sent or aborted: a handler enters what the
    # body needs (e.g. `fetcher.open_blob`) here so it stays open exactly as long as the transfer.
    resources: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: BlobBody | None = None
    # Called once the response is finished: (body bytes actually sent, True if the whole body went out).
    on_sent: Callable[[int, bool], None] | None = None


Handler = Callable[[Request], Awaitable[Response]]
# Called with a request's head before its body is read (or invited with 100-continue): a Response here is sent
# instead of calling the handler, and the connection is closed (the body is never read).
BeforeBody = Callable[[Request], Response | None]


def _timeval(seconds: float) -> bytes:
    """A `struct timeval` for SO_SNDTIMEO (0: no timeout)."""
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))


def oci_error_response(err: OciError) -> Response:
    """An OCI JSON error body with the error's status and headers (Retry-After, WWW-Authenticate, …)."""
    headers = [("content-type", "application/json")]
    headers += [(k.lower(), v) for k, v in err.headers.items()]
    return Response(err.status, headers, err.body())


def _http_date() -> str:
    """The Date header's value for now (IMF-fixdate)."""
    return _date_of(int(time.time()))


@functools.lru_cache(maxsize=2)
def _date_of(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)  # once per second, not per response


class _SendfileRange:
    """Stands for `n` body bytes in h11's accounting; the bytes themselves go out with os.sendfile."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class _ClientGone(Exception):
    """The client closed, reset or stalled: drop the connection quietly."""


class _BodyAborted(Exception):
    """The body could not be completed after the headers went out: close without the rest."""


class _BigSends:
    """The big body stretches a listener is sending: from the loop (a count) and from worker threads."""

    def __init__(self) -> None:
        self.on_loop = 0
        self.threads = trio.CapacityLimiter(SEND_THREADS)

    def thread_for(self, stretch: int) -> bool:
        """Whether a stretch of `stretch` bytes goes to a thread: big, another big one is being sent, and a thread
        is free."""
        return (stretch >= THREAD_SEND_MIN and bool(self.on_loop or self.threads.borrowed_tokens)
                and self.threads.available_tokens >= 1)


class _Conn:
    """One client connection: the h11 state machine plus the socket it drives."""

    def __init__(self, stream: trio.SocketStream, handler: Handler, settings: Settings, max_body: int,
                 before_body: BeforeBody | None = None, big_sends: _BigSends | None = None) -> None:
        self.stream = stream
        self.big_sends = big_sends if big_sends is not None else _BigSends()  # else one of its own
        self.handler = handler
        self.before_body = before_body
        self.settings = settings
        self.max_body = max_body
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_header_bytes)
        self.body_sent = 0  # body bytes of the current response that reached the socket

    # --- receiving ---------------------------------------------------------------------------------------

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise _ClientGone from e
            self.h11.receive_data(data)  # b"" = EOF; h11 turns it into ConnectionClosed or an error

    async def _read_request(self) -> Request | Response | None:
        """The next request (head and body), a Response to send instead (431, 400, 413), or None to close."""
        with trio.move_on_after(self.settings.client_header_timeout):
            try:
                event = await self._next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return None
                assert isinstance(event, h11.Request)
                # h11 only limits heads that arrive in pieces (its buffer of an incomplete event); a big head
                # that arrives in one read is measured here, from what h11 parsed (within a few bytes of raw).
                head_size = len(event.method) + len(event.target) + 12
                head_size += sum(len(k) + len(v) + 4 for k, v in event.headers) + 2
                if head_size > self.settings.max_header_bytes:
                    err = OciError("UNKNOWN", "request header fields too large", status=431)
                    return oci_error_response(err)
                names = {k for k, _ in event.headers}
                if b"transfer-encoding" in names and b"content-length" in names:
                    # h11 frames such a body by Transfer-Encoding; a proxy in front that frames it by
                    # Content-Length would take the rest for a second request of its own (request smuggling).
                    # RFC 9112 6.1: reject, and close the connection (found in review: it was answered and kept).
                    err = OciError("UNKNOWN", "bad HTTP request: both Content-Length and Transfer-Encoding",
                                   status=400)
                    return oci_error_response(err)
                req = _make_request(event)
                if isinstance(req, Response):
                    return req
                if self.before_body is not None:
                    early = self.before_body(req)
                    if early is not None:
                        return early
                declared = req.header("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                    # Refused before reading (or inviting, with 100-continue) a byte of it.
                    return oci_error_response(OciError("SIZE_INVALID", "request body too large", status=413))
                if self.h11.they_are_waiting_for_100_continue:
                    await self._send_event(h11.InformationalResponse(status_code=100, headers=[]))
                body = bytearray()
                while True:
                    event = await self._next_event()
                    if isinstance(event, h11.EndOfMessage):
                        break
                    if isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > self.max_body:
                            err = OciError("SIZE_INVALID", "request body too large", status=413)
                            return oci_error_response(err)
                    elif isinstance(event, h11.ConnectionClosed):
                        return None
                req.body = bytes(body)
                return req
            except h11.RemoteProtocolError as e:
                msg = "request header fields too large" if e.error_status_hint == 431 else "bad HTTP request"
                return oci_error_response(OciError("UNKNOWN", msg, status=e.error_status_hint))
        log.debug("client stalled while sending its request; dropping it")
        return None

    # --- sending -----------------------------------------------------------------------------------------

    async def _send_bytes(self, data: bytes) -> None:
        if not data:
            return
        with trio.move_on_after(self.settings.client_send_timeout) as cs:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise _ClientGone from e
        if cs.cancelled_caught:
            raise _ClientGone("client stopped reading")

    async def _send_event(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self._send_bytes(data)

    async def _sendfile(self, body: BlobBody) -> None:
        """Send [start, end) of the blob, counting progress in self.body_sent.

        Raises _BodyAborted / _ClientGone on failure."""
        sock = self.stream.socket
        in_fd = body.handle.file.fileno()
        offset, end = body.start, body.end
        while offset < end:
            try:
                readable = min(await body.handle.readable(offset, end), end)
            except Exception as e:  # FetchFailed, or anything else: the rest of this body cannot be trusted
                raise _BodyAborted(f"blob became unreadable at {offset}: {e!r}") from e
            if readable <= offset:
                raise _BodyAborted(f"readable() returned {readable} at offset {offset}")
            big = self.big_sends
            if big.thread_for(readable - offset):
                offset += await self._sendfile_in_thread(sock, in_fd, offset, readable - offset, big.threads)
                continue
            counted = int(readable - offset >= THREAD_SEND_MIN)
            big.on_loop += counted
            try:
                await self._sendfile_on_loop(sock, in_fd, offset, readable)
            finally:
                big.on_loop -= counted
            offset = readable

    async def _sendfile_on_loop(self, sock: Any, in_fd: int, offset: int, readable: int) -> None:
        """Bytes [offset, readable) of `in_fd` from the loop: non-blocking sendfile, waiting for room."""
        out_fd = sock.fileno()
        timeout = self.settings.client_send_timeout
        while offset < readable:
            try:
                n = os.sendfile(out_fd, in_fd, offset, readable - offset)
            except BlockingIOError:
                with trio.move_on_after(timeout) as cs:
                    await trio.lowlevel.wait_writable(sock)
                if cs.cancelled_caught:
                    raise _ClientGone("client stopped reading") from None
                continue
            except OSError as e:
                if e.errno in _GONE_ERRNOS:
                    raise _ClientGone from e
                raise _BodyAborted(f"sendfile failed: {e!r}") from e
            if n == 0:
                raise _BodyAborted(f"blob file ended at {offset}, expected {readable}")
            offset += n
            self.body_sent += n
            # A fast client never makes the socket block: yield so other connections get their turn.
            await trio.lowlevel.checkpoint()

    async def _sendfile_in_thread(self, sock: Any, in_fd: int, offset: int, count: int,
                                  threads: trio.CapacityLimiter) -> int:
        """Bytes [offset, offset+count) of `in_fd` by a blocking sendfile in a worker thread; returns how many
        went out (counted in body_sent, also when it raises).

        The socket is blocking meanwhile (nothing else on the loop uses it: this connection's one task waits
        here), with a send timeout of SEND_POLL, so that a client that stopped reading is noticed
        (`client_send_timeout` without progress: _ClientGone), and non-blocking again before this returns. A
        client that keeps reading, however slowly, keeps one sendfile call going until its stretch is sent: a
        cancellation (node shutdown) shuts the socket's sending side, which ends the call at once (found in
        review: a slow reader held a stopping node for as long as it took to read its body)."""
        out_fd = sock.fileno()
        timeout = self.settings.client_send_timeout
        cancel = threading.Event()
        progress = [0]  # what the thread sent so far: read on the loop also when this call is cancelled

        def send() -> tuple[int, BaseException | None]:
            sent, last = 0, time.monotonic()
            while sent < count and not cancel.is_set():
                try:
                    n = os.sendfile(out_fd, in_fd, offset + sent, count - sent)
                except BlockingIOError:  # SO_SNDTIMEO passed without room
                    if time.monotonic() - last >= timeout:
                        return sent, _ClientGone("client stopped reading")
                    continue
                except OSError as e:
                    if e.errno in _GONE_ERRNOS:
                        return sent, _ClientGone(str(e))
                    return sent, _BodyAborted(f"sendfile failed: {e!r}")
                if n == 0:
                    return sent, _BodyAborted(f"blob file ended at {offset + sent}, expected {offset + count}")
                sent += n
                progress[0] = sent
                last = time.monotonic()
            return sent, None

        def stop_sending() -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

        os.set_blocking(out_fd, True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(SEND_POLL))
        try:
            sent, problem = await run_cancellable(send, cancel, threads, on_cancel=stop_sending)
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
            os.set_blocking(out_fd, False)
            self.body_sent += progress[0]  # also when cut short: an aborted body's bytes count in logs and metrics
        if problem is not None:
            raise problem
        return sent

    async def _send_response(self, req_method: str | None, resp: Response) -> None:
        headers = [(k.lower(), v) for k, v in resp.headers]
        names = {k for k, _ in headers}
        if resp.stream is not None:
            length = len(resp.stream)
        else:
            length = len(resp.body)
        if "content-length" not in names and resp.status not in (204, 304) and resp.status >= 200:
            headers.append(("content-length", str(length)))
        if "server" not in names:
            headers.append(("server", SERVER_NAME))
        if "date" not in names:
            headers.append(("date", _http_date()))  # RFC 9110 §6.6.1: an origin with a clock MUST send it
        self.body_sent, complete = 0, False
        try:
            head = self.h11.send(h11.Response(status_code=resp.status, headers=headers, reason=_reason(resp.status)))
            assert head is not None
            if resp.stream is not None and len(resp.stream) > 0 and req_method != "HEAD":
                await self._send_bytes(head)
                passthrough = self.h11.send_with_data_passthrough(
                    h11.Data(data=_SendfileRange(len(resp.stream)))  # type: ignore[arg-type]
                )
                assert passthrough is not None and all(isinstance(p, _SendfileRange) for p in passthrough)
                await self._sendfile(resp.stream)
                await self._send_event(h11.EndOfMessage())
            else:
                # Small answers (manifests, errors, HEAD) leave in one write: one packet, no Nagle/ACK dance.
                out = bytearray(head)
                if resp.body and req_method != "HEAD":
                    out += self.h11.send(h11.Data(data=resp.body)) or b""
                out += self.h11.send(h11.EndOfMessage()) or b""
                await self._send_bytes(bytes(out))
                self.body_sent = len(resp.body) if req_method != "HEAD" else 0
            complete = True
        finally:
            if resp.on_sent is not None:
                try:
                    resp.on_sent(self.body_sent, complete)
                except Exception:
                    log.exception("on_sent callback failed")

    # --- the connection loop -----------------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            while True:
                got = await self._read_request()
                if got is None:
                    return
                if isinstance(got, Response):
                    # h11 lets a server answer a broken request if it has not started a response yet.
                    if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        got.headers.append(("connection", "close"))
                        await self._send_response(None, got)
                        await self._linger()
                    return
                req = got
                async with req.resources:
                    resp = await self._call_handler(req)
                    if self.h11.their_state is not h11.DONE:
                        resp.headers.append(("connection", "close"))
                    await self._send_response(req.method, resp)
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                else:
                    return
        except (_ClientGone, _BodyAborted) as e:
            level = logging.WARNING if isinstance(e, _BodyAborted) else logging.DEBUG
            log.log(level, "closing connection: %s", e)
        except h11.LocalProtocolError as e:
            log.warning("closing connection after protocol error: %s", e)
        finally:
            await self._close()

    async def _call_handler(self, req: Request) -> Response:
        try:
            return await self.handler(req)
        except OciError as e:
            return oci_error_response(e)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                log.exception("handler failed for %s %s", req.method, req.target)
                return oci_error_response(OciError("UNKNOWN", "internal error"))
            # Opening a blob (or a manifest) found no file descriptor left: the node is busy, not broken, and
            # the client may retry (503, as for an unreachable upstream); it got 500 "internal error" and the
            # log a traceback per request (found in review: RLIMIT_NOFILE 64, 150 GETs at once).
            _out_of_files.warning("too many open files (%s): answering 503 to %s %s; raise the open-files "
                                  "limit (LimitNOFILE=, the container runtime's)", errno.errorcode[e.errno],
                                  req.method, req.target)
            return oci_error_response(OciError("UNAVAILABLE", "the node has too many open files; retry",
                                               headers={"Retry-After": "1"}))
        except Exception:
            log.exception("handler failed for %s %s", req.method, req.target)
            return oci_error_response(OciError("UNKNOWN", "internal error"))

    async def _linger(self) -> None:
        """After an error response to a request we did not read whole: stop sending, drain a little.

        Closing a socket with unread input makes the kernel send RST, which can destroy our error response
        before the client reads it; draining briefly lets a client that is still sending see the 431/413.
        """
        with trio.move_on_after(LINGER_SECONDS), contextlib.suppress(trio.BrokenResourceError,
                                                                   trio.ClosedResourceError):
            await self.stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES:
                chunk = await self.stream.receive_some(_READ_SIZE)
                if not chunk:
                    break
                drained += len(chunk)

    async def _close(self) -> None:
        # Abortive enough: a response cut short must reach the client as a truncated body, not a complete one.
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.stream.aclose()


def _reason(status: int) -> bytes:
    # Optional in HTTP/1.1, but some clients print it and humans reading curl -v like it.
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _make_request(event: h11.Request) -> Request | Response:
    """Decode the target once; a target that is not valid text is 400 before any handler sees it."""
    try:
        target = event.target.decode("ascii")
        method = event.method.decode("ascii")  # case-sensitive (RFC 9110 §9.1): "head" is not HEAD
        scheme, sep, rest = target.partition("://")
        if sep and scheme.lower() in ("http", "https") and "/" not in scheme:
            # absolute-form (RFC 9112 §3.2.2: a server MUST accept it): the path is what follows the authority
            i = min((j for j in (rest.find("/"), rest.find("?")) if j >= 0), default=len(rest))
            target = rest[i:] if rest[i:i + 1] == "/" else "/" + rest[i:]
        raw_path, _, raw_query = target.partition("?")
        path = urllib.parse.unquote_to_bytes(raw_path).decode("utf-8")
        query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        return oci_error_response(OciError("NAME_INVALID", "request target is not valid", status=400))
    if "\x00" in path or not path.startswith("/"):
        return oci_error_response(OciError("NAME_INVALID", "request target is not valid", status=400))
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
    return Request(method=method, target=target, path=path, query=query, headers=headers)


async def serve_http(
    listen: str,
    handler: Handler,
    settings: Settings,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    before_body: BeforeBody | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on `listen` ("HOST:PORT", port 0 = any) until cancelled.

    `task_status.started((host, port))` reports the address actually bound, once listening. Startup errors
    (address in use, bad host) propagate as OSError before started() is called.
    """
    host, port = parse_hostport(listen)
    big_sends = _BigSends()  # of this listener
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]

    async def on_connection(stream: trio.SocketStream) -> None:
        try:
            await _Conn(stream, handler, settings, max_body_bytes, before_body, big_sends).serve()
        except Exception:
            # A bug in one connection must cost that connection only, never the listener and its siblings.
            log.exception("connection handler crashed")

    async with trio.open_nursery() as nursery:
        # serve_listeners owns one task per connection inside this nursery; cancelling us closes them all.
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started((str(bound[0]), int(bound[1])))

