"""One peer connection over loopback, in process: pieces with sendfile, refusals, a peer that dies or goes silent
fails its waiters at once (no 30-second stall), a malformed frame closes only its own connection."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from p2pcache.swarm import peer as peer_mod
from p2pcache.swarm.handshake import Handshake, HandshakeError, PeerInfo
from p2pcache.swarm.peer import PeerConnection, PeerGone, PieceRejected, handshake, open_peer_socket
from p2pcache.swarm.wire import FrameDecoder, ProtocolError, encode

D = "sha256:" + "cd" * 32
PIECE = 1 << 20


class Host:
    """Serves piece i of D as bytes [i*PIECE, (i+1)*PIECE) of a file; refuses indices >= `held`."""

    def __init__(self, path, held: int = 4) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.held = held
        self.closed = []

    def piece_source(self, digest, index):
        if digest != D or index >= self.held:
            return None
        return os.dup(self.fd), index * PIECE, PIECE

    def on_message(self, conn, msg):
        if msg.kind == "ping":
            return [("pong", {"id": msg["id"]}, b"")]
        return []

    def on_closed(self, conn):
        self.closed.append(conn)

    def upload_request(self, conn, digest, index):
        conn.start_upload(digest, index)
        return True

    def upload_done(self, conn, digest, index):
        pass


async def pair(nursery, host, *, server_secret=b"s", client_secret=b"s", silent_server=False, raw_client_rcvbuf=None):
    """A server PeerConnection (in `server_side["conn"]`) and a client: a PeerConnection, or with
    `raw_client_rcvbuf` the bare handshaken socket with that receive buffer (a peer that reads when it likes)."""
    lsock = trio.socket.socket()
    await lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]
    server_side: dict = {}

    async def serve():
        s, _ = await lsock.accept()
        dec = FrameDecoder()
        try:
            p = await handshake(s, Handshake("server", server_secret, PeerInfo("srv", "127.0.0.1:1", None)), dec)
        except (HandshakeError, ProtocolError, PeerGone):
            s.close()
            return
        if silent_server:
            server_side["sock"] = s
            await trio.sleep_forever()
        c = server_side["conn"] = PeerConnection(s, p, host, dec, outgoing=False)
        await c.run()

    nursery.start_soon(serve)
    if raw_client_rcvbuf is not None:
        s = trio.socket.socket()
        s.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, raw_client_rcvbuf)
        await s.connect(("127.0.0.1", port))
        await handshake(s, Handshake("client", client_secret, PeerInfo("cli", "127.0.0.1:2", None)), FrameDecoder())
        return s, server_side, lsock
    s = await open_peer_socket(f"127.0.0.1:{port}")
    dec = FrameDecoder()
    p = await handshake(s, Handshake("client", client_secret, PeerInfo("cli", "127.0.0.1:2", None)), dec)
    cli = PeerConnection(s, p, host, dec, outgoing=True)
    nursery.start_soon(cli.run)
    return cli, server_side, lsock


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(4 * PIECE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


async def test_pieces_answers_and_refusals(blob):
    path, data = blob
    host = Host(path)
    async with trio.open_nursery() as nursery:
        cli, _, lsock = await pair(nursery, host)
        got = {}

        async def get(i):
            msg = await cli.request_piece(D, i)
            assert msg.sha256 == hashlib.sha256(msg.payload).digest()
            got[i] = bytes(msg.payload)

        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(get, i)
        assert b"".join(got[i] for i in range(4)) == data
        with pytest.raises(PieceRejected):
            await cli.request_piece(D, 9)
        assert (await cli.call("ping"))["id"] > 0
        nursery.cancel_scope.cancel()
    lsock.close()


async def test_dead_peer_fails_waiters_at_once(blob):
    path, _ = blob
    host = Host(path)
    async with trio.open_nursery() as nursery:
        cli, server_side, lsock = await pair(nursery, host, silent_server=True)
        with trio.fail_after(2):
            async with trio.open_nursery() as n:
                async def req():
                    with pytest.raises(PeerGone):
                        await cli.request_piece(D, 0)
                n.start_soon(req)
                await trio.sleep(0.1)
                server_side["sock"].close()  # the peer process dies: its socket closes
        nursery.cancel_scope.cancel()
    lsock.close()


async def test_silent_peer_is_dropped_after_the_stall_timeout(blob, monkeypatch):
    monkeypatch.setattr(peer_mod, "STALL_TIMEOUT", 0.5)
    path, _ = blob
    host = Host(path)
    async with trio.open_nursery() as nursery:
        cli, _, lsock = await pair(nursery, host, silent_server=True)
        with trio.fail_after(3), pytest.raises(PeerGone):
            await cli.request_piece(D, 0)
        nursery.cancel_scope.cancel()
    lsock.close()


async def test_wrong_secret_is_refused(blob):
    path, _ = blob
    async with trio.open_nursery() as nursery:
        with pytest.raises(HandshakeError):
            await pair(nursery, Host(path), server_secret=b"one", client_secret=b"two")
        nursery.cancel_scope.cancel()


async def test_malformed_frame_closes_only_that_connection(blob):
    path, data = blob
    host = Host(path)
    async with trio.open_nursery() as nursery:
        cli, server_side, lsock = await pair(nursery, host)
        await trio.sleep(0.05)
        srv = server_side["conn"]
        # a second, healthy connection to the same server process would be unaffected; here we check that the
        # server's side of this one closes cleanly (no exception escapes into the nursery) on garbage
        await cli.sock.send(b"\x00\x00\x00\x03\x00\x00\x00\x00\xc1\xc1\xc1")
        with trio.fail_after(2):
            while not srv.closed:
                await trio.sleep(0.01)
        assert srv in host.closed
        nursery.cancel_scope.cancel()
    lsock.close()


async def test_frames_either_way_mark_a_connection_active_and_requests_keep_it_busy(blob):
    # What SwarmService's idle closing looks at (service.idle_connections): the time of the last frame sent or
    # received, and whether anything is outstanding.
    path, _ = blob
    host = Host(path, held=1)
    async with trio.open_nursery() as nursery:
        cli, server_side, lsock = await pair(nursery, host)
        while "conn" not in server_side:
            await trio.sleep(0.01)
        srv = server_side["conn"]
        assert not cli.busy() and not srv.busy()
        await trio.sleep(0.05)
        before = trio.current_time()
        assert cli.last_active < before and srv.last_active < before
        assert (await cli.call("ping"))["id"] > 0
        assert cli.last_active >= before and srv.last_active >= before  # sent and answered; received and answered
        assert not cli.busy()
        rejected = []

        async def ask():
            try:
                await cli.request_piece(D, 5)
            except PieceRejected as e:
                rejected.append(e)

        seen_busy = False
        async with trio.open_nursery() as n:
            n.start_soon(ask)
            while not rejected:  # a request is outstanding until its answer ("not held") comes
                seen_busy = seen_busy or cli.busy()
                await trio.sleep(0)
        assert seen_busy and rejected and not cli.busy()
        nursery.cancel_scope.cancel()
    lsock.close()


async def test_a_peer_that_never_reads_loses_its_uploads_after_the_send_stall_timeout(tmp_path, monkeypatch):
    """It asked for pieces and stopped reading: without a deadline on send progress it held the node's upload
    slots for as long as it liked."""
    monkeypatch.setattr(peer_mod, "SEND_STALL_TIMEOUT", 0.5)
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(32 * PIECE)  # more than any socket buffer takes
    host = Host(path, held=32)
    async with trio.open_nursery() as nursery:
        s, server_side, lsock = await pair(nursery, host, raw_client_rcvbuf=4096)
        for i in range(32):
            await s.send(encode("request", digest=D, index=i))
        with trio.fail_after(5):  # then never reads
            while "conn" not in server_side or not server_side["conn"].closed:
                await trio.sleep(0.05)
        assert server_side["conn"] in host.closed
        s.close()
        nursery.cancel_scope.cancel()
    lsock.close()


async def test_a_peer_that_stops_inside_a_frame_is_dropped_after_the_stall_timeout(blob, monkeypatch):
    """Half a frame, then silence: the receiver was waiting on nothing of its own, so no deadline ran."""
    monkeypatch.setattr(peer_mod, "STALL_TIMEOUT", 0.5)
    path, _ = blob
    host = Host(path)
    async with trio.open_nursery() as nursery:
        cli, server_side, lsock = await pair(nursery, host)
        await trio.sleep(0.05)
        srv = server_side["conn"]
        frame = encode("piece", b"x" * 1000, digest=D, index=0)
        await cli.sock.send(frame[:300])  # a head and some of an unasked-for payload
        with trio.fail_after(3):
            while not srv.closed:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    lsock.close()


class Answers(Host):
    """Answers every message with what `answer(msg)` makes of it: (kind, fields[, payload]), or None for none."""

    def __init__(self, path, answer) -> None:
        super().__init__(path)
        self.answer = answer

    def on_message(self, conn, msg):
        out = self.answer(msg)
        return [] if out is None else [(out[0], out[1], out[2] if len(out) > 2 else b"")]


async def test_an_answer_of_the_wrong_kind_or_digest_fails_the_call_like_a_dead_peer(blob):
    """A member answered every call with a "pong" of the right id: matched by id only, it reached callers that
    read fields it has not (KeyError 'size' in the metainfo reader, 'claim' in the announce loop), and every pull
    through the node failed (found in review). Such an answer fails the call at once, as PeerGone."""
    path, _ = blob
    other = "sha256:" + "ef" * 32

    def answer(msg):
        if msg.kind == "metainfo-req":
            return "pong", {"id": msg["id"]}
        if msg.kind == "announce":  # the right kind, about another digest
            return "holders", {"id": msg["id"], "digest": other, "holders": [], "claim": None}
        if msg.kind == "ping":
            return "pong", {"id": msg["id"]}
        return None

    async with trio.open_nursery() as nursery:
        cli, _, lsock = await pair(nursery, Answers(path, answer))
        with trio.fail_after(1):  # not the RPC timeout (3 s): the wrong answer is the failure
            with pytest.raises(PeerGone, match="'pong', not 'metainfo'"):
                await cli.call("metainfo-req", digest=D)
            with pytest.raises(PeerGone, match="about sha256:efefef"):
                await cli.call("announce", digest=D, pieces=0, complete=False)
            assert (await cli.call("ping")).kind == "pong"  # the connection still serves what it answers right
        assert not cli.closed and not cli._calls and not cli.busy()
        nursery.cancel_scope.cancel()
    lsock.close()


async def test_a_peer_that_lets_answers_pile_up_is_dropped_at_a_byte_bound(blob):
    """Only frames were counted (4096): a member that asked 1000 times for a 512 KB manifest and read slowly had
    ~500 MB of answers queued for it (found in review). Past MAX_CONTROL_BYTES queued, the connection closes."""
    path, _ = blob
    body = b"m" * (512 << 10)

    def answer(msg):
        if msg.kind == "manifest-req":
            return "manifest", {"id": msg["id"], "digest": msg["digest"], "media_type": "x/y"}, body
        return None

    host = Answers(path, answer)
    async with trio.open_nursery() as nursery:
        s, server_side, lsock = await pair(nursery, host, raw_client_rcvbuf=4096)
        await s.send(b"".join(encode("manifest-req", id=i + 1, digest=D) for i in range(100)))  # then never reads
        with trio.fail_after(2):  # not the send-stall timeout (10 s): the queue's bound
            while "conn" not in server_side or not server_side["conn"].closed:
                await trio.sleep(0.02)
        srv = server_side["conn"]
        assert srv in host.closed and len(srv._control) < 40  # 16 MiB of 512 KB answers, not 100 of them
        s.close()
        nursery.cancel_scope.cancel()
    lsock.close()
