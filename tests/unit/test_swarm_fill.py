"""The swarm's download driver (`_Fill`) in process: what a failed fill leaves behind, and peers that close
before the scheduler exists (both found in review)."""

from __future__ import annotations

import hashlib

import pytest
import trio

from p2pcache.config import Settings
from p2pcache.fetch import Download, FetchFailed
from p2pcache.node import build_node
from p2pcache.swarm.service import SwarmService, _Fill, renewal_round


def service(tmp_path) -> tuple[SwarmService, object]:
    settings = Settings(data=tmp_path / "data", peer_listen="127.0.0.1:0")
    node = build_node(settings)
    svc = SwarmService(settings, node.store, node.fetcher, node.upstream, node.metrics)

    async def announce(digest, complete, pieces=0):
        return [], None

    async def claim(digest, release=False):
        return None

    svc._announce = announce  # type: ignore[method-assign]
    svc._claim = claim  # type: ignore[method-assign]
    svc._owners = lambda digest: []  # type: ignore[method-assign]
    return svc, node


async def test_a_failed_fill_is_no_longer_announced(tmp_path) -> None:
    """A pull of a digest the upstream does not have: the fill announced itself as a holder in progress, and
    renewal_round renewed that at the trackers for ever."""
    svc, node = service(tmp_path)

    class NoSuchBlob:
        async def head_blob(self, repo, digest):
            raise FetchFailed("404 BLOB_UNKNOWN")

    svc.upstream = NoSuchBlob()  # type: ignore[assignment]
    for k in range(20):
        digest = "sha256:" + hashlib.sha256(b"%d" % k).hexdigest()
        with pytest.raises(FetchFailed):
            await svc.fill(Download(node.fetcher, None, digest), None)  # type: ignore[arg-type]
    assert svc._announced == {}
    assert renewal_round(svc._announced, lambda d: False, set(svc._fills), set()) == ([], [])


class _Peer:
    node = "D"
    zone = None


class _Conn:
    peer = _Peer()
    closed = False

    def send(self, *a, **k) -> None:
        pass


class _Msg:
    def __init__(self, kind: str, **fields) -> None:
        self.kind, self.fields = kind, fields

    def __getitem__(self, k):
        return self.fields[k]


async def test_a_bitfield_from_a_connection_closed_before_the_scheduler_existed_is_not_replayed(tmp_path) -> None:
    """Replayed, its dead peer stayed a source of every piece: the claim was never asked again and the download
    waited for the stall timeout (60 s) instead of a few seconds."""
    svc, node = service(tmp_path)
    fill = _Fill(svc, Download(node.fetcher, None, "sha256:" + "ab" * 32), None)  # type: ignore[arg-type]
    conn = _Conn()
    fill.consider(conn)  # type: ignore[arg-type]
    fill.peer_message(conn, _Msg("bitfield", digest=fill.digest, bits=b"\xff"))  # type: ignore[arg-type]
    assert len(fill._early) == 1  # kept until the scheduler exists
    conn.closed = True
    fill.peer_closed(conn)  # type: ignore[arg-type]
    assert fill._early == {} and "D" not in fill.peers
    fill.peer_message(conn, _Msg("bitfield", digest=fill.digest, bits=b"\xff"))  # type: ignore[arg-type]
    assert fill._early == {}  # a message of a closed connection is not taken either


async def test_what_a_peer_says_before_the_scheduler_exists_costs_at_most_2_kib(tmp_path) -> None:
    """Every early bitfield was kept: a member that sent 256 KiB ones as fast as it could, while the node was
    still learning the blob's layout, took it from 39 MiB to 1.5 GB (found in review). Now a connection's latest
    bitfield is kept, with the "have"s since ORed in, cut at the longest layout's."""
    svc, node = service(tmp_path)
    fill = _Fill(svc, Download(node.fetcher, None, "sha256:" + "ab" * 32), None)  # type: ignore[arg-type]
    flood, honest = _Conn(), _Conn()
    for _ in range(1000):
        fill.peer_message(flood, _Msg("bitfield", digest=fill.digest, bits=b"\xff" * (1 << 18)))  # type: ignore
        fill.peer_message(flood, _Msg("have", digest=fill.digest, index=1 << 40))  # type: ignore[arg-type]
    fill.peer_message(honest, _Msg("have", digest=fill.digest, index=0))  # type: ignore[arg-type]
    fill.peer_message(honest, _Msg("bitfield", digest=fill.digest, bits=b""))  # type: ignore[arg-type]
    fill.peer_message(honest, _Msg("have", digest=fill.digest, index=9))  # type: ignore[arg-type]
    assert set(fill._early) == {flood, honest}
    assert len(fill._early[flood]) == 2048  # MAX_META_PIECES bits
    assert bytes(fill._early[honest]) == b"\x00\x40"  # piece 9 (a "have" before any bitfield is no news)


class _DeadlineOnly:
    """A scheduler stand-in: only a next deadline, and a log of the ticks the driver called."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.ticks: list[float] = []

    def next_deadline(self) -> float | None:
        return self.deadline

    def tick(self, now: float) -> list:
        self.ticks.append(now)
        self.deadline = None
        return []


async def test_a_deadline_moved_earlier_without_decisions_wakes_the_tick_loop(tmp_path, autojump_clock) -> None:
    """A piece arrives, nothing is left in flight, and the peer with more pieces is in its 20 ms "busy"
    back-off: the scheduler answers no decisions, only an earlier deadline. The tick loop slept on to its own
    wake-up (up to 0.5 s) instead of retrying after 20 ms (found by the simulator's monotonicity search)."""
    svc, node = service(tmp_path)
    fill = _Fill(svc, Download(node.fetcher, None, "sha256:" + "ab" * 32), None)  # type: ignore[arg-type]
    sched = _DeadlineOnly()
    fill.sched = sched  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fill._tick_loop)
        await trio.sleep(0.1)  # nothing pending: the loop sleeps its longest
        t0 = trio.current_time()
        sched.deadline = t0 + 0.02
        fill._apply([])  # what every scheduler call ends in
        while not sched.ticks:
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert sched.ticks[0] - t0 == pytest.approx(0.02, abs=1e-3)


async def test_metainfo_about_another_digest_is_not_taken(tmp_path) -> None:
    """The layout and hashes of another blob: taken, every piece of ours would fail its check against them."""
    svc, node = service(tmp_path)
    fill = _Fill(svc, Download(node.fetcher, None, "sha256:" + "ab" * 32), None)  # type: ignore[arg-type]
    fields = {"digest": "sha256:" + "cd" * 32, "size": 1 << 20, "piece_size": 1 << 19, "hashes": [None, None]}
    assert fill._accept_meta(fields, "D") is None
    assert fill._accept_meta({**fields, "digest": fill.digest}, "D") == (1 << 20, 1 << 19, [None, None])


async def test_the_digests_a_peer_wants_news_of_are_bounded(tmp_path) -> None:
    """A member sent "interested" for a million made-up digests: the connection kept every one (40 -> 195 MiB,
    found in review). Now the latest MAX_INTERESTED, which are what "have"s go out for."""
    from p2pcache.swarm.handshake import PeerInfo
    from p2pcache.swarm.peer import MAX_INTERESTED, PeerConnection
    from p2pcache.swarm.wire import FrameDecoder, Message

    svc, node = service(tmp_path)
    sock = trio.socket.socket()
    conn = PeerConnection(sock, PeerInfo("D", "127.0.0.1:1", None), svc, FrameDecoder(), outgoing=False)
    svc.conns["D"] = [conn]
    digests = [f"sha256:{i:064x}" for i in range(10_000)]
    for d in digests:
        answer = svc.on_message(conn, Message("interested", {"digest": d}))
        assert answer == [("bitfield", {"digest": d, "bits": b""}, b"")]  # each is still answered
    assert list(conn.interested) == digests[-MAX_INTERESTED:]
    svc.have_piece(digests[-1], 0)
    svc.have_piece(digests[0], 0)  # forgotten: no "have"
    assert len(conn._control) == 1
    sock.close()


class _FillDone:
    complete = True
    release_claim = False
    meta_source = None


class _VerifiedDownload:
    """A download whose bytes passed the digest check and whose commit then failed (or landed)."""

    def __init__(self, digest: str, committed: bool) -> None:
        self.digest, self.size, self.n_pieces, self.committed = digest, 10, 1, committed
        self.done = trio.Event()
        self.done.set()

    async def readable(self, offset: int) -> int:
        return self.size


@pytest.mark.parametrize("committed", [False, True])
async def test_a_verified_blob_whose_commit_failed_is_withdrawn_at_once(tmp_path, committed: bool) -> None:
    """It stayed announced complete (peers sent here for it, and refused) until the next renewal round, 10 s."""
    svc, node = service(tmp_path)
    data = b"y" * 10
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if committed:
        node.store.put_bytes(digest, data)
    withdrawn: list[str] = []

    async def withdraw(d: str) -> None:
        withdrawn.append(d)

    svc._withdraw = withdraw  # type: ignore[method-assign]
    svc._announced[digest] = True
    await svc._after_fill(_VerifiedDownload(digest, committed), _FillDone())  # type: ignore[arg-type]
    assert withdrawn == ([] if committed else [digest])


async def test_an_owner_that_lets_a_call_time_out_is_not_asked_again_until_heard_from(tmp_path) -> None:
    """Each tracker call of a pull (announce, claim) waited RPC_TIMEOUT (3 s) on a silent owner, one after the
    other, until the membership's own timeout marked it suspect. Now the first timeout does."""
    from p2pcache.swarm.peer import CallTimedOut

    settings = Settings(data=tmp_path / "data", peer_listen="127.0.0.1:0")
    node = build_node(settings)
    svc = SwarmService(settings, node.store, node.fetcher, node.upstream, node.metrics)
    calls: list[str] = []

    class Silent:
        async def call(self, kind, **fields):
            calls.append(kind)
            raise CallTimedOut(f"{kind} to B timed out")

    async def connect_node(owner: str) -> Silent:
        return Silent()

    svc.connect_node = connect_node  # type: ignore[method-assign,assignment]
    svc.membership.heard("B", "127.0.0.1:9", None, trio.current_time())
    digest = "sha256:" + "ef" * 32
    assert "B" in svc._owners(digest)  # two owners of two members: both
    await svc._announce(digest, False)
    assert await svc._claim(digest) is not None  # granted by ourselves, the owner that answers
    await svc._announce(digest, True, 1)
    assert calls == ["announce"]
    assert "B" not in svc._owners(digest)
    svc.membership.heard("B", "127.0.0.1:9", None, trio.current_time())  # it speaks again: asked again
    await svc._announce(digest, True, 1)
    assert calls == ["announce", "announce"]


async def test_a_failed_commit_does_not_withdraw_a_download_of_the_digest_begun_since(tmp_path) -> None:
    """The first download's bookkeeping waited on a silent owner while a second download of the same digest
    filled and announced it complete; the first then withdrew it, and the second's stored blob was never
    announced again (found in review)."""
    svc, node = service(tmp_path)
    data = b"x" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    slow_owner = trio.Event()
    sent: list[str] = []

    async def announce(d, complete, pieces=0):
        sent.append("announce")
        if complete and not slow_owner.is_set():
            await slow_owner.wait()
        return [], None

    async def withdraw(d: str) -> None:
        svc._announced.pop(d, None)
        sent.append("withdraw")

    svc._announce = announce  # type: ignore[method-assign]
    svc._withdraw = withdraw  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc._after_fill, _VerifiedDownload(digest, committed=False), _FillDone())
        await trio.sleep(0.01)  # in its complete announce
        node.fetcher._downloads[digest] = object()  # the second download, its commit in flight
        svc._announced[digest] = True
        slow_owner.set()
    assert "withdraw" not in sent
    node.store.put_bytes(digest, data)  # the second one's commit lands
    del node.fetcher._downloads[digest]
    assert renewal_round(svc._announced, lambda d: node.store.stat(d, touch=False) is not None, set(),
                         set()) == ([(digest, True)], [])


async def test_an_owner_slow_behind_a_piece_is_not_taken_for_silent(tmp_path, monkeypatch) -> None:
    """A call that ran out of RPC_BUSY_MAX while a piece from the owner was still arriving marked the owner
    suspect, and nothing on that connection revived it (found in review)."""
    from p2pcache.discovery.membership import State
    from p2pcache.swarm import peer as peer_mod
    from p2pcache.swarm.peer import CallTimedOut, PeerGone
    from tests.unit.test_peer_throttle import DIGEST, _pair

    monkeypatch.setattr(peer_mod, "RPC_BUSY_MAX", 1.0)  # 30 s in the node

    async def slow_limit(n: int) -> None:
        await trio.sleep(0.6)  # our own download limit: the piece takes ~5 s, past the call's 3 s

    settings = Settings(data=tmp_path / "data", peer_listen="127.0.0.1:0")
    node = build_node(settings)
    svc = SwarmService(settings, node.store, node.fetcher, node.upstream, node.metrics)
    async with trio.open_nursery() as nursery:
        cli = await _pair(tmp_path, nursery, throttle_rx=slow_limit, recv_chunk=32 << 10)
        svc.membership.heard("srv", "a:1", None, trio.current_time())

        async def connect_node(owner: str):  # type: ignore[no-untyped-def]
            return cli

        svc.connect_node = connect_node  # type: ignore[method-assign]
        got: list[int] = []

        async def piece() -> None:
            got.append(len((await cli.request_piece(DIGEST, 0)).payload))

        nursery.start_soon(piece)
        while not cli.dec.mid_frame():
            await trio.sleep(0.01)
        with pytest.raises(PeerGone) as e:
            await svc._tracker_call("srv", "claim", digest="sha256:" + "ab" * 32, release=False)
        assert not isinstance(e.value, CallTimedOut)
        assert svc.membership.get("srv").state is State.ALIVE  # type: ignore[union-attr]
        with trio.fail_after(10):
            while not got:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
