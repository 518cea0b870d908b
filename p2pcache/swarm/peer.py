"""One connection to one peer, over a raw trio socket: handshake, piece requests out, piece serving in, RPCs.

This is a driver: the protocol's bytes are `wire.py`'s, the handshake's logic `handshake.py`'s, and what a message
*means* (which pieces we have, what the tracker answers) is the `PeerHost`'s (the SwarmService). This module moves
bytes and enforces the per-connection limits. It never decides which piece to ask for, never writes the store and
never trusts a piece: the caller of `request_piece` checks the hash before using the bytes.

Theory of operation
-------------------
Each connection runs two tasks in its own nursery: a reader and a writer. The reader never awaits a send (two
peers both blocked sending 16 MiB pieces to each other while neither reads would deadlock); anything it wants to
say (answers, bitfields, rejects) is queued for the writer. The writer sends queued control frames first, then
serves queued piece requests: the piece's bytes go from the store's file to the socket with `os.sendfile` (no copy
through Python), paced by the node's upload token bucket. Received piece payloads are `recv_into` one buffer per
piece, which is handed to the waiting `request_piece` caller.

Limits: at most `MAX_REQUESTS_IN` piece requests queued from one peer, and uploads only when the host's node-wide
upload slots (the scheduler module's `UploadSlots`) say so (refused requests are rejected "busy"); at most
`MAX_REQUESTS_OUT` of ours in flight on one connection (callers wait for a slot), at most `MAX_CONTROL_QUEUE`
frames and `MAX_CONTROL_BYTES` bytes queued for a peer that does not read (then it is dropped). Frame sizes are
bounded by the decoder. A call takes only an answer of the kind its question expects (`ANSWER_OF`), about the
same digest: any other answer with its id fails the call at once (`WrongAnswer`, a PeerGone), as a dead peer's
would.

Timeouts are cancel scopes: the handshake must finish within `HANDSHAKE_TIMEOUT`; while we wait for anything from
the peer (a piece, an answer), a stall scope around the reader is pushed back each time bytes arrive and fires
after `STALL_TIMEOUT` of silence, closing the connection and failing every waiter at once. A dead peer therefore
costs `CONNECT_TIMEOUT` (refused connections fail at once) or `STALL_TIMEOUT`, never a 30-second TCP timeout.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import socket as pysocket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from p2pcache.hostport import parse_hostport
from p2pcache.swarm.handshake import Handshake, HandshakeError, PeerInfo
from p2pcache.swarm.wire import NEED_DATA, FrameDecoder, Message, ProtocolError, encode, encode_head

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0  # loopback/LAN connects take milliseconds; a black-holed host must not stall a download
HANDSHAKE_TIMEOUT = 5.0  # three small frames; anything slower is broken or hostile
STALL_TIMEOUT = 5.0  # silence while we wait on the peer: it is dead or wedged; its pieces are re-asked elsewhere
# A peer that takes no byte of what we send for this long is dropped: it held one of the node's few upload slots
# (and its queue) for as long as it liked (found in review: 4 slots held by one peer that never read, for minutes).
SEND_STALL_TIMEOUT = 10.0
RPC_TIMEOUT = 3.0  # tracker answers are in-memory lookups; slower means the owner is in trouble
RPC_BUSY_MAX = 30.0  # ... unless a piece on the connection holds the call or its answer back (`call`), this long
MAX_REQUESTS_IN = 32  # queued piece requests one peer may have with us; bounds memory and upload fairness
MAX_REQUESTS_OUT = 8  # our piece requests in flight per connection: enough to fill a LAN pipe with 1-16 MiB pieces
MAX_CONTROL_QUEUE = 4096  # frames queued for a peer that stopped reading: beyond this it is dropped
# ... and bytes: frames carry payloads (a manifest answer) and headers up to 1 MiB (a metainfo answer). Counting
# frames only, a member that asked for one 512 KB manifest 1000 times and read slowly had ~500 MB queued for it
# (found in review). Requests whose answer is large are refused before this (`SwarmService.on_message`).
MAX_CONTROL_BYTES = 16 << 20
RECV_CHUNK = 1 << 20  # socket reads: 1 MiB keeps syscalls few (trio reading a socket ~3 GB/s here)
RECV_HEAD = 64 << 10  # reads between payloads: many control frames at once, little of a piece's payload
SEND_CHUNK = 1 << 20  # sendfile slices: the unit the upload bucket paces
# Digests one peer may want "have"s for (`want_haves`), the oldest forgotten beyond. A peer asks for one per blob
# it downloads (and finds us a holder of), so this is far more than it pulls at once; without a bound a member
# that sent "interested" for a million made-up digests took the node from 40 to 195 MiB (found in review).
MAX_INTERESTED = 256

# How a connection ends without it being anybody's bug.
_CLOSED = (OSError, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError)

# The answer each RPC expects. The waiter is found by the "id" the question carried, but only an answer of this
# kind (whose fields the decoder checked are all there) and, when both carry one, of the question's digest is taken:
# a member that answered every call with a "pong" of the right id made the callers fail on missing fields (a
# KeyError ended the download's announce loop), and every pull through the node failed (found in review).
ANSWER_OF = {"announce": "holders", "claim": "claim-answer", "metainfo-req": "metainfo", "tag-req": "tag",
             "manifest-req": "manifest", "ping": "pong"}
ANSWER_KINDS = frozenset(ANSWER_OF.values())


class PeerGone(Exception):
    """The connection closed (or stalled) before the answer came."""


_CLOSED = (*_CLOSED, PeerGone)


class CallTimedOut(PeerGone):
    """An RPC got no answer within RPC_TIMEOUT with nothing else moving on its connection: the peer is silent
    (stopped, overloaded, or cut off by a link that drops everything). A call that ran out of RPC_BUSY_MAX while
    pieces moved raises a plain PeerGone: that peer is slow, and alive."""


class WrongAnswer(PeerGone):
    """The peer answered a call with a message of another kind, or about another digest: that call failed, as a
    timeout would have (the connection stays: its other traffic is judged on its own)."""


class PieceRejected(Exception):
    """The peer does not have (or will not send) the piece now; `reason` is its word for why ("busy", "not
    held")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerHost(Protocol):
    """What a connection asks of the node (the SwarmService implements it)."""

    def piece_source(self, digest: str, index: int) -> tuple[int, int, int] | None:
        """(a dup'ed fd we close, offset, length) of a verified piece we hold, or None."""

    def on_message(self, conn: PeerConnection, msg: Message) -> list[tuple[str, dict[str, Any], bytes]]:
        """Handle anything that is not a piece transfer or an answer; returns frames to send back."""

    def on_closed(self, conn: PeerConnection) -> None: ...

    def upload_request(self, conn: PeerConnection, digest: str, index: int) -> bool:
        """The peer asks for a piece: False to refuse ("busy"); when its turn comes the host calls
        `conn.start_upload(digest, index)` (node-wide upload slots)."""

    def upload_done(self, conn: PeerConnection, digest: str, index: int) -> None:
        """An upload finished, failed or was cancelled: its slot is free."""


Throttle = Callable[[int], Awaitable[None]]


class _Waiter:
    __slots__ = ("event", "value", "error", "answer", "digest")

    def __init__(self, answer: str | None = None, digest: str | None = None) -> None:
        self.event = trio.Event()
        self.value: Message | None = None
        self.error: Exception | None = None
        self.answer = answer  # a call's expected answer kind (None for a piece request)
        self.digest = digest  # the digest the call asked about, if any

    def set(self, value: Message | None = None, error: Exception | None = None) -> None:
        if not self.event.is_set():
            self.value, self.error = value, error
            self.event.set()


def _tune(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)


async def open_peer_socket(addr: str) -> trio.socket.SocketType:
    """Connect to HOST:PORT within CONNECT_TIMEOUT (raises OSError or trio.TooSlowError).

    An address that cannot be dialled at all is an OSError too (EINVAL), not the ValueError of its parser or
    of the IDNA codec: callers treat it as an unreachable peer. Letting it through failed whole downloads."""
    try:
        host, port = parse_hostport(addr)
        infos = await trio.socket.getaddrinfo(host, port, type=pysocket.SOCK_STREAM)
    except ValueError as e:  # also UnicodeError: a DNS label over 63 characters
        raise OSError(errno.EINVAL, f"bad peer address {addr[:80]!r}: {e}") from None
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await sock.connect(sockaddr)
        _tune(sock)
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_all(sock: trio.socket.SocketType, data: bytes | memoryview, stall: float = math.inf) -> None:
    """Send all of `data`; PeerGone when the peer takes no byte for `stall` seconds."""
    view = memoryview(data)
    while view:
        with trio.move_on_after(stall) as cs:
            n = await sock.send(view)
        if cs.cancelled_caught:
            raise _send_stalled(stall)
        view = view[n:]


def _send_stalled(stall: float) -> PeerGone:
    return PeerGone(f"the peer took no byte for {stall:g} s")


async def _read_message(sock: trio.socket.SocketType, dec: FrameDecoder) -> Message:
    while True:
        ev = dec.next_event()
        if ev is not NEED_DATA:
            assert isinstance(ev, Message)
            return ev
        data = await sock.recv(65536)
        if not data:
            dec.eof()
            raise PeerGone("closed during handshake")
        dec.feed(data)


async def handshake(sock: trio.socket.SocketType, hs: Handshake, dec: FrameDecoder) -> PeerInfo:
    """Run one side of the handshake on a connected socket. Raises HandshakeError, ProtocolError, PeerGone,
    OSError or trio.TooSlowError; on a refusal we tell the peer why (best effort) before the caller closes."""
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        if hs.role == "client":
            kind, fields = hs.client_hello()
            await _send_all(sock, encode(kind, **fields))
        while not hs.done:
            msg = await _read_message(sock, dec)
            if msg.kind == "refused":
                raise HandshakeError(f"refused by peer: {msg['reason']}")
            try:
                out = hs.receive(msg)
            except HandshakeError as e:
                with trio.move_on_after(0.5):
                    await _send_all(sock, encode("refused", reason=str(e)[:200]))
                raise
            for kind, fields in out:
                await _send_all(sock, encode(kind, **fields))
    assert hs.peer is not None
    return hs.peer


class PeerConnection:
    """A handshaken connection. `run()` serves it until it closes; other tasks call `request_piece`/`call`."""

    _ids = itertools.count(1)

    def __init__(self, sock: trio.socket.SocketType, peer: PeerInfo, host: PeerHost, dec: FrameDecoder, *,
                 outgoing: bool, throttle_tx: Throttle | None = None, throttle_rx: Throttle | None = None,
                 on_bytes: Callable[[str, int], None] | None = None, send_chunk: int = SEND_CHUNK,
                 recv_chunk: int = RECV_CHUNK) -> None:
        self.sock = sock
        _tune(sock)  # accepted sockets too: without TCP_NODELAY a piece's last segment waits for a delayed ACK
        self.peer = peer
        self.host = host
        self.dec = dec
        dec.accept_payload = self._wants_payload
        self.outgoing = outgoing
        self.throttle_tx = throttle_tx
        self.throttle_rx = throttle_rx
        # Under a limit, the bytes one throttle call covers (ratelimit.paced_chunk): a whole 1 MiB behind the
        # other uploads' or connections' own at 300 kB/s kept a peer silent past STALL_TIMEOUT (found in review).
        self.send_chunk = send_chunk
        self.recv_chunk = recv_chunk
        self.on_bytes = on_bytes  # ("in"|"out", n) piece bytes, for metrics and scoring
        self.closed = False
        self._control: deque[bytes] = deque()
        self._control_bytes = 0  # of the frames in _control and the one being sent
        self._uploads: deque[tuple[str, int]] = deque()  # requests given a slot, in order
        self._requested: set[tuple[str, int]] = set()  # the peer's requests not yet answered (or cancelled)
        self._sending: tuple[str, int] | None = None
        self._wake = trio.Event()
        self._pieces: dict[tuple[str, int], _Waiter] = {}
        self._calls: dict[int, _Waiter] = {}
        self._slots = trio.Semaphore(MAX_REQUESTS_OUT)
        self._waiting = 0  # requests + calls outstanding: while > 0, silence is a stall
        self._stall: trio.CancelScope | None = None
        self._scope: trio.CancelScope | None = None
        self.interested: dict[str, None] = {}  # digests this peer wants "have"s for, oldest first (want_haves)
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_active = trio.current_time()  # the last frame either way (SwarmService closes idle ones)

    def __repr__(self) -> str:
        return f"PeerConnection({self.peer.node}@{self.peer.addr}, {'out' if self.outgoing else 'in'})"

    # -- life --------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until either side ends it. Never raises (but Cancelled): a failure of this
        connection is this connection's business only."""
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._writer, nursery.cancel_scope)
                    nursery.start_soon(self._guard, self._reader, nursery.cancel_scope)
        finally:
            self._fail_all(PeerGone(f"connection to {self.peer.node} closed"))
            self.closed = True
            for key in list(self._requested):
                self.host.upload_done(self, *key)
            self._requested.clear()
            self._uploads.clear()
            self.sock.close()
            self.host.on_closed(self)

    async def _guard(self, fn: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Run the reader or the writer; whichever ends (or fails) first ends the connection."""
        try:
            await fn()
        except _CLOSED as e:
            log.info("peer %s: connection closed: %s", self.peer.node, e)
        except Exception:
            log.exception("peer %s: connection failed", self.peer.node)
        finally:
            scope.cancel()

    def close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        else:
            self.closed = True
            self.sock.close()

    def start_upload(self, digest: str, index: int) -> None:
        """The host gave one of our peer's requests an upload slot: send it next."""
        if (digest, index) in self._requested and not self.closed:
            self._uploads.append((digest, index))
            self._wake.set()
        else:
            self.host.upload_done(self, digest, index)

    def want_haves(self, digest: str) -> None:
        """The peer wants to hear of our new pieces of `digest`: remembered among its latest MAX_INTERESTED."""
        self.interested.pop(digest, None)
        self.interested[digest] = None
        if len(self.interested) > MAX_INTERESTED:
            del self.interested[next(iter(self.interested))]

    def _fail_all(self, err: Exception) -> None:
        for w in list(self._pieces.values()) + list(self._calls.values()):
            w.set(error=err)
        self._pieces.clear()
        self._calls.clear()

    # -- sending -----------------------------------------------------------------------------------------------
    def send(self, kind: str, payload: bytes = b"", **fields: Any) -> None:
        """Queue a frame (never blocks). A peer that lets MAX_CONTROL_QUEUE frames or MAX_CONTROL_BYTES bytes
        pile up is dropped (one frame alone may be larger: it is queued)."""
        if self.closed:
            raise PeerGone("connection closed")
        frame = encode(kind, payload, **fields)
        if len(self._control) >= MAX_CONTROL_QUEUE or (
                self._control_bytes and self._control_bytes + len(frame) > MAX_CONTROL_BYTES):
            self.close()
            raise PeerGone("peer is not reading")
        self._control.append(frame)
        self._control_bytes += len(frame)
        self.last_active = trio.current_time()
        self._wake.set()

    def queued_bytes(self) -> int:
        """Bytes of frames queued for the peer and not sent yet (pieces being uploaded not included)."""
        return self._control_bytes

    async def _writer(self) -> None:
        while True:
            if self._control:
                frame = self._control.popleft()
                try:
                    await _send_all(self.sock, frame, SEND_STALL_TIMEOUT)
                finally:
                    self._control_bytes -= len(frame)
            elif self._uploads:
                key = self._sending = self._uploads.popleft()
                try:
                    await self._serve_piece(*key)
                finally:
                    self._sending = None
                    self._requested.discard(key)
                    self.last_active = trio.current_time()  # (a piece's bytes are not frames sent by send())
                    self.host.upload_done(self, *key)
            else:
                await self._wake.wait()
                self._wake = trio.Event()

    async def _serve_piece(self, digest: str, index: int) -> None:
        src = self.host.piece_source(digest, index)
        if src is None:
            await _send_all(self.sock, encode("reject", digest=digest, index=index, reason="not held"),
                            SEND_STALL_TIMEOUT)
            return
        fd, offset, length = src
        try:
            await _send_all(self.sock, encode_head("piece", length, digest=digest, index=index), SEND_STALL_TIMEOUT)
            sent = 0
            while sent < length:
                n = min(self.send_chunk, length - sent)
                if self.throttle_tx is not None:
                    await self.throttle_tx(n)
                await self._sendfile(fd, offset + sent, n)
                sent += n
            self.bytes_out += length
            if self.on_bytes is not None:
                self.on_bytes("out", length)
        finally:
            os.close(fd)

    async def _sendfile(self, fd: int, offset: int, count: int) -> None:
        """Zero-copy file -> socket on trio's non-blocking socket."""
        out = self.sock.fileno()
        await trio.lowlevel.checkpoint()
        while count > 0:
            try:
                n = os.sendfile(out, fd, offset, count)
            except BlockingIOError:
                with trio.move_on_after(SEND_STALL_TIMEOUT) as cs:
                    await trio.lowlevel.wait_writable(self.sock)
                if cs.cancelled_caught:
                    raise _send_stalled(SEND_STALL_TIMEOUT) from None
                continue
            if n == 0:  # the file is shorter than the piece: we cannot keep the frame's promise
                raise OSError(errno.EIO, "piece file truncated")
            offset += n
            count -= n

    # -- receiving ---------------------------------------------------------------------------------------------
    def _wants_payload(self, kind: str, fields: dict[str, Any]) -> bool:
        """The decoder asks before it buffers a payload: only a piece we asked for, or the manifest answering
        one of our calls. Any other is dropped as it arrives (a piece cancelled meanwhile: dropped anyway)."""
        if kind == "piece":
            return (fields["digest"], fields["index"]) in self._pieces
        if kind == "manifest":
            w = self._calls.get(fields["id"])
            return w is not None and w.answer == kind
        return False

    def _stalls(self) -> bool:
        """Silence is a stall while we wait on the peer, or while it is inside a frame (a frame sent in part)."""
        return bool(self._waiting) or self.dec.mid_frame()

    def _arm(self) -> None:
        if self._stall is not None:
            self._stall.deadline = trio.current_time() + STALL_TIMEOUT if self._stalls() else math.inf

    async def _reader(self) -> None:
        buf = bytearray(RECV_CHUNK)
        view = memoryview(buf)
        with trio.CancelScope() as self._stall:
            self._arm()
            # deliver anything that arrived with the handshake
            for msg in self.dec.events():
                self._dispatch(msg)
            while True:
                space = self.dec.payload_space()
                if space is not None:
                    n = await self.sock.recv_into(space[:self.recv_chunk])
                    if n:
                        self.dec.payload_written(n)
                else:
                    # Between payloads read at most RECV_HEAD: the rest of a piece then goes straight into its
                    # buffer (payload_space) instead of through the decoder's header buffer (three more copies).
                    n = await self.sock.recv_into(view[:RECV_HEAD])
                    if n:
                        self.dec.feed(view[:n])
                if not n:
                    self.dec.eof()
                    return
                self.bytes_in += n
                if self._stalls():
                    # push the stall deadline back, but not on every read (moving a deadline has a cost)
                    deadline = trio.current_time() + STALL_TIMEOUT
                    if deadline - self._stall.deadline > STALL_TIMEOUT / 10:
                        self._stall.deadline = deadline
                if self.throttle_rx is not None and space is not None:
                    # Our own limit's wait is no silence of the peer's: it waited behind every connection's reads
                    # inside the stall scope, and a node under 100 kB/s dropped its own peers (found in review).
                    armed = self._stall.deadline != math.inf
                    self._stall.deadline = math.inf
                    await self.throttle_rx(n)
                    if armed:
                        self._stall.deadline = trio.current_time() + STALL_TIMEOUT
                for msg in self.dec.events():
                    self._dispatch(msg)
                if self._stalls() != (self._stall.deadline != math.inf):
                    self._arm()  # a frame began (the rest must follow), or the last one ended
        if self._stall.cancelled_caught:
            raise PeerGone(f"{self.peer.node} stalled for {STALL_TIMEOUT}s")

    def busy(self) -> bool:
        """Whether anything is outstanding on this connection: our requests or calls, or the peer's requests."""
        return bool(self._waiting or self._requested or self._uploads or self._sending)

    def _dispatch(self, msg: Message) -> None:
        self.last_active = trio.current_time()
        k = msg.kind
        if k == "piece" or k == "reject":
            w = self._pieces.pop((msg["digest"], msg["index"]), None)
            if w is not None:
                if k == "piece":
                    if self.on_bytes is not None:
                        self.on_bytes("in", len(msg.payload))
                    w.set(msg)
                else:
                    w.set(error=PieceRejected(msg["reason"]))
            return  # a piece we cancelled (or never asked for) is dropped
        if k in ANSWER_KINDS:
            w = self._calls.pop(msg["id"], None)
            if w is not None:
                wrong = _wrong_answer(w, msg)
                if wrong is None:
                    w.set(msg)
                else:
                    log.info("peer %s: %s", self.peer.node, wrong)
                    w.set(error=WrongAnswer(f"{self.peer.node} {wrong}"))
            return
        if k == "request":
            key = (msg["digest"], msg["index"])
            if key in self._requested:
                return  # a duplicate request: the first one is answered
            if len(self._requested) >= MAX_REQUESTS_IN:
                self.send("reject", digest=key[0], index=key[1], reason="busy")
                return
            self._requested.add(key)  # before asking: the host may start the upload at once
            if not self.host.upload_request(self, *key):
                self._requested.discard(key)
                self.send("reject", digest=key[0], index=key[1], reason="busy")
            return
        if k == "cancel":
            key = (msg["digest"], msg["index"])
            if key in self._requested and key != self._sending:
                self._requested.discard(key)
                try:
                    self._uploads.remove(key)
                except ValueError:
                    pass
                self.host.upload_done(self, *key)
            return
        if k in ("hello", "hello-ack", "hello-proof", "refused"):
            raise ProtocolError(f"{k} after the handshake")
        for kind, fields, payload in self.host.on_message(self, msg):
            self.send(kind, payload, **fields)

    # -- our requests ------------------------------------------------------------------------------------------
    async def request_piece(self, digest: str, index: int) -> Message:
        """The peer's "piece" message for `index`: its payload (unverified!) and the payload's SHA-256, computed as
        it arrived. Raises PieceRejected, PeerGone."""
        key = (digest, index)
        async with self._slots:
            if self.closed:
                raise PeerGone("connection closed")
            if key in self._pieces:
                raise PieceRejected("already requested on this connection")
            w = self._pieces[key] = _Waiter()
            self._waiting += 1
            self._arm()
            try:
                self.send("request", digest=digest, index=index)
                await w.event.wait()
            finally:
                self._waiting -= 1
                self._arm()
                if not w.event.is_set():  # cancelled by our caller: tell the peer not to bother
                    self._pieces.pop(key, None)
                    if not self.closed:
                        try:
                            self.send("cancel", digest=digest, index=index)
                        except PeerGone:
                            pass
        if w.error is not None:
            raise w.error
        assert w.value is not None
        return w.value

    async def call(self, kind: str, timeout: float = RPC_TIMEOUT, **fields: Any) -> Message:
        """Send an RPC and wait for its answer, a message of kind `ANSWER_OF[kind]` (about the same digest, if the
        question names one), so the caller may read every field of that kind. Raises PeerGone (closed, stalled,
        timed out, or WrongAnswer)."""
        rid = next(self._ids)
        w = self._calls[rid] = _Waiter(ANSWER_OF[kind], fields.get("digest"))
        self._waiting += 1
        self._arm()
        try:
            self.send(kind, id=rid, **fields)
            start = trio.current_time()
            while True:
                with trio.move_on_after(timeout):
                    await w.event.wait()
                # Frames are not interleaved: under a low limit a call or its answer waits behind a whole piece on
                # this connection, one way or the other (found in review: tracker calls timed out under 64 kB/s).
                # A piece moving is a live peer (silence inside it is a stall, caught by the reader): wait on.
                if (w.event.is_set() or not (self._sending or self.dec.mid_frame())
                        or trio.current_time() - start >= RPC_BUSY_MAX):
                    break
        finally:
            self._waiting -= 1
            self._arm()
            self._calls.pop(rid, None)
        if not w.event.is_set():
            if self._sending or self.dec.mid_frame():  # RPC_BUSY_MAX behind pieces: slow, not silent
                raise PeerGone(f"{kind} to {self.peer.node} timed out behind pieces")
            raise CallTimedOut(f"{kind} to {self.peer.node} timed out")
        if w.error is not None:
            raise w.error
        assert w.value is not None
        return w.value


def _wrong_answer(w: _Waiter, msg: Message) -> str | None:
    """Why `msg` does not answer the call `w` waits on (None: it does)."""
    if msg.kind != w.answer:
        return f"answered a call with {msg.kind!r}, not {w.answer!r}"
    if w.digest is not None and msg.fields.get("digest", w.digest) != w.digest:
        return f"answered a call about {w.digest[:19]} with one about {msg['digest'][:19]}"
    return None
