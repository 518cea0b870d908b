"""A PeerConnection under the node's own download limit: waiting for the limit is not the peer's silence."""

from __future__ import annotations

import os

import trio

from p2pcache.swarm import peer as peer_mod
from p2pcache.swarm.handshake import Handshake, PeerInfo
from p2pcache.swarm.peer import PeerConnection, handshake, open_peer_socket
from p2pcache.swarm.ratelimit import paced_chunk
from p2pcache.swarm.wire import FrameDecoder
from tests.peer_host import FileHost

PIECE = 256 << 10
DIGEST = "sha256:" + "0" * 64


async def _pair(tmp_path, nursery, **client_kw) -> PeerConnection:
    """A client PeerConnection to a server that serves one PIECE-byte file for any piece asked."""
    path = tmp_path / "piece"
    path.write_bytes(os.urandom(PIECE))
    host = FileHost(str(path), PIECE)
    lsock = trio.socket.socket()
    await lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    async def serve() -> None:
        s, _ = await lsock.accept()
        lsock.close()
        dec = FrameDecoder()
        p = await handshake(s, Handshake("server", b"k", PeerInfo("srv", "a:1", None)), dec)
        await PeerConnection(s, p, host, dec, outgoing=False).run()

    nursery.start_soon(serve)
    s = await open_peer_socket(f"127.0.0.1:{port}")
    dec = FrameDecoder()
    p = await handshake(s, Handshake("client", b"k", PeerInfo("cli", "b:1", None)), dec)
    cli = PeerConnection(s, p, host, dec, outgoing=True, **client_kw)
    nursery.start_soon(cli.run)
    return cli


async def test_waiting_for_our_own_download_limit_is_not_a_stall(tmp_path, monkeypatch) -> None:
    # found in review: the reader waited for its limit inside the stall scope; behind other connections' reads
    # under 100 kB/s that was longer than STALL_TIMEOUT, and the node dropped its own peers as stalled
    monkeypatch.setattr(peer_mod, "STALL_TIMEOUT", 0.3)
    waits = 0

    async def slow_limit(n: int) -> None:
        nonlocal waits
        waits += 1
        await trio.sleep(0.5)  # longer than the stall timeout, every read

    async with trio.open_nursery() as nursery:
        cli = await _pair(tmp_path, nursery, throttle_rx=slow_limit, recv_chunk=64 << 10)
        with trio.fail_after(20):
            msg = await cli.request_piece(DIGEST, 0)
        assert len(msg.payload) == PIECE and waits >= 3
        nursery.cancel_scope.cancel()


async def test_a_call_answered_behind_a_piece_under_a_limit_is_not_timed_out(tmp_path) -> None:
    # found in review: under a low limit a tracker call's answer waited behind a whole piece on the connection
    # (frames are not interleaved) and the call timed out after 3 s although the peer was sending all along
    async def slow_limit(n: int) -> None:
        await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        cli = await _pair(tmp_path, nursery, throttle_rx=slow_limit, recv_chunk=32 << 10)
        nursery.start_soon(cli.request_piece, DIGEST, 0)  # 8 reads of 32 KiB, 0.2 s each
        with trio.fail_after(5):
            while not cli.dec.mid_frame():
                await trio.sleep(0.01)
        t0 = trio.current_time()
        answer = await cli.call("ping", timeout=0.3)
        assert answer.kind == "pong" and trio.current_time() - t0 > 0.3  # it did wait behind the piece
        nursery.cancel_scope.cancel()


def test_throttle_calls_cover_an_eighth_of_a_second():
    assert paced_chunk(None, 1 << 20) == 1 << 20
    assert paced_chunk(300e3, 1 << 20) == 37500
    assert paced_chunk(10e3, 1 << 20) == 16384
    assert paced_chunk(1e9, 1 << 20) == 1 << 20
