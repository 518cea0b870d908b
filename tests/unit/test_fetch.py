"""Single-flight downloads: many clients, one upstream fetch, bytes as they arrive, never a wrong complete blob.

The store is the real one (on tmp_path); the upstream is an in-process fake that follows the Upstream contract
and can pause, break, truncate or lie, so each test says what a client of the node would see.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2pcache.config import Settings
from p2pcache.fetch import BlobHandle, Download, Fetcher, FetchFailed
from p2pcache.metrics import Metrics
from p2pcache.oci.errors import OciError, UpstreamUnavailable
from p2pcache.oci.reference import Repo
from p2pcache.store.blobs import BlobStore
from p2pcache.swarm.chain import piece_hash
from p2pcache.swarm.metainfo import prev_link

PIECE = 64 << 10
CHUNK = 16 << 10
REPO = Repo("docker.io", "library/alpine")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(n: int, seed: int = 1) -> bytes:
    return hashlib.sha256(bytes([seed])).digest() * (n // 32) + b"x" * (n % 32)


class FakeResponse:
    def __init__(self, up: FakeUpstream, data: bytes, offset: int, cut: int | None, how: str) -> None:
        self.size = len(data)
        self.offset = offset
        self._up, self._data, self._cut, self._how = up, data, cut, how

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pos = self.offset
        sent = 0
        while pos < self.size:
            if self._up.pause_at is not None and pos >= self._up.pause_at:
                await self._up.release.wait()
            if self._cut is not None and sent >= self._cut:
                if self._how == "raise":
                    raise UpstreamUnavailable("connection reset mid-body")
                return  # the body just ends early
            n = min(next(self._up.chunk_sizes), self.size - pos)
            if self._up.pause_at is not None and pos < self._up.pause_at:
                n = min(n, self._up.pause_at - pos)
            if self._cut is not None:
                n = min(n, self._cut - sent)
            await trio.sleep(0)
            yield self._data[pos:pos + n]
            pos += n
            sent += n


class FakeUpstream:
    """Serves `blobs`; records every open (digest, offset) and HEAD; can pause, cut, fail or lie."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.opens: list[tuple[str, int]] = []
        self.heads: list[str] = []
        self.lies: dict[str, bytes] = {}
        self.cuts: list[int] = []  # successive responses stop after this many bytes
        self.cut_how = "raise"
        self.error: BaseException | None = None
        self.pause_at: int | None = None
        self.release = trio.Event()
        self.announce: int | None = None  # a size to announce instead of the real one
        self.chunk_sizes = itertools.cycle([CHUNK])

    async def head_blob(self, repo: Repo, digest: str) -> int:
        self.heads.append(digest)
        if self.error is not None:
            raise self.error
        if digest not in self.blobs:
            raise OciError("BLOB_UNKNOWN")
        return len(self.blobs[digest])

    @asynccontextmanager
    async def open_blob(self, repo: Repo, digest: str, offset: int = 0) -> AsyncIterator[FakeResponse]:
        self.opens.append((digest, offset))
        await trio.sleep(0.001)  # the window before the upstream answered
        if self.error is not None:
            raise self.error
        if digest not in self.blobs:
            raise OciError("BLOB_UNKNOWN", "blob unknown to registry")
        data = self.lies.get(digest, self.blobs[digest])
        cut = self.cuts.pop(0) if self.cuts else None
        resp = FakeResponse(self, data, offset, cut, self.cut_how)
        if self.announce is not None:
            resp.size = self.announce
        yield resp


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data=tmp_path, piece_size=PIECE)


@asynccontextmanager
async def running(settings: Settings, up: FakeUpstream, store: BlobStore | None = None
                  ) -> AsyncIterator[Fetcher]:
    metrics = Metrics()
    store = store or BlobStore(settings.data, metrics=metrics)
    fetcher = Fetcher(settings, store, up, metrics)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        yield fetcher
        nursery.cancel_scope.cancel()


async def settled_size(fetcher: Fetcher, d: str) -> int | None:
    """The stored size once the download of `d` has ended: clients may finish reading (their bytes verified)
    a moment before the store's commit (fsync + rename) lands."""
    with trio.fail_after(5):
        while d in fetcher.downloads():
            await trio.sleep(0.005)
    return fetcher.store.stat(d)


async def read_all(handle: BlobHandle) -> bytes:
    out = bytearray()
    while len(out) < handle.size:
        end = await handle.readable(len(out))
        out += os.pread(handle.file.fileno(), end - len(out), len(out))
    return bytes(out)


async def fetch(fetcher: Fetcher, digest: str) -> bytes:
    async with fetcher.open_blob(REPO, digest) as h:
        return await read_all(h)


def paused_upstream(size: int, pause_at: int) -> tuple[bytes, str, FakeUpstream]:
    """A blob of `size` bytes, its digest, and an upstream that stops sending it at `pause_at` until released."""
    data = blob(size)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.pause_at = pause_at
    return data, d, up


def chain_of(data: bytes, piece: int = PIECE) -> list[bytes]:
    """The piece hashes a claim holder publishes for `data` (swarm/chain.py; checked against a reference
    SHA-256 in test_chain.py)."""
    n = max(1, -(-len(data) // piece))
    out: list[bytes | None] = []
    for i in range(n):
        out.append(piece_hash(i, n, prev_link(out, i), data[i * piece:(i + 1) * piece], i * piece))
    return out  # type: ignore[return-value]


async def give_piece(download: Download, data: bytes, i: int) -> None:
    """Piece `i` of `data` as a peer delivers it: checked against its link in the chain, then written."""
    piece = data[i * PIECE:(i + 1) * PIECE]
    chain = chain_of(data)
    link_from = prev_link(chain, i) if i < len(chain) - 1 else None  # type: ignore[arg-type]
    await download.write_piece(i, piece, chain[i], link_from)


async def readable_to(h: BlobHandle, end: int) -> None:
    """Wait until the handle may read at least up to `end`."""
    n = 0
    while n < end:
        n = await h.readable(n)


def sample(fetcher: Fetcher, name: str, **labels: str) -> float:
    return fetcher.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_eight_clients_on_a_cold_blob_cause_one_upstream_fetch(settings: Settings) -> None:
    data = blob(1 << 20)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    async with running(settings, up) as fetcher:
        results: list[bytes] = []

        async def client() -> None:
            results.append(await fetch(fetcher, d))

        async with trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(client)
        assert results == [data] * 8
        assert up.opens == [(d, 0)]
        assert await settled_size(fetcher, d) == len(data)
        assert sample(fetcher, "p2pcache_cache_misses_total", kind="blob") == 8
        # Now it is a hit served from the store, without asking upstream again.
        assert await fetch(fetcher, d) == data
        assert up.opens == [(d, 0)]
        assert sample(fetcher, "p2pcache_cache_hits_total", kind="blob") == 1
        assert sample(fetcher, "p2pcache_downloads_in_flight") == 0


async def test_clients_read_before_the_end_but_never_the_last_piece_before_verification(
        settings: Settings) -> None:
    data = blob(5 * PIECE + 1000)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.pause_at = len(data) - 10  # everything but the last 10 bytes has arrived
    last_piece = 5 * PIECE
    async with running(settings, up) as fetcher:
        async with fetcher.open_blob(REPO, d) as h:
            assert h.size == len(data)
            end = await h.readable(0)
            assert 0 < end <= last_piece
            while end < last_piece:
                end = await h.readable(end)
            assert end == last_piece
            assert os.pread(h.file.fileno(), end, 0) == data[:end]
            with trio.move_on_after(0.2) as scope:
                await h.readable(last_piece)
            assert scope.cancelled_caught, "the last piece must wait for the whole-blob hash"
            assert fetcher.store.stat(d) is None
            up.release.set()
            assert await h.readable(last_piece) == len(data)
            assert os.pread(h.file.fileno(), len(data), 0) == data
        assert await settled_size(fetcher, d) == len(data)



async def test_a_range_that_ends_early_gets_its_last_byte_only_after_verification(settings: Settings) -> None:
    """A Range of a blob still streaming from upstream: its bytes are on disk before anything could check them,
    so the body's last byte waits for the whole-blob SHA-256 (else a wrong blob makes a complete 206)."""
    data = blob(5 * PIECE + 1000)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.pause_at = len(data) - 10
    stop = PIECE + 100  # bytes [0, stop): far from the blob's last piece
    async with running(settings, up) as fetcher:
        async with fetcher.open_blob(REPO, d) as h:
            end = await h.readable(0, stop)
            while end < stop - 1:
                end = await h.readable(end, stop)
            assert end == stop - 1, "all but the body's last byte may go before verification"
            with trio.move_on_after(0.2) as scope:
                await h.readable(stop - 1, stop)
            assert scope.cancelled_caught, "the body's last byte must wait for the whole-blob hash"
            up.release.set()
            assert await h.readable(stop - 1, stop) == len(data)
        assert await settled_size(fetcher, d) == len(data)

async def test_a_lying_upstream_fails_every_client_and_stores_nothing(settings: Settings) -> None:
    data = blob(6 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.lies[d] = blob(len(data), seed=2)  # right length, wrong bytes
    async with running(settings, up) as fetcher:
        got: list[int] = []

        async def client() -> None:
            async with fetcher.open_blob(REPO, d) as h:
                n = 0
                with pytest.raises(FetchFailed):
                    while True:
                        n = await h.readable(n)
                got.append(n)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(client)
        assert len(got) == 4 and all(n < len(data) for n in got), "nobody may see the complete wrong blob"
        assert fetcher.downloads() == {}
        assert up.opens == [(d, 0)]
        assert sample(fetcher, "p2pcache_digest_mismatches_total", source="upstream") == 1
        assert fetcher.store.stat(d) is None
        assert os.listdir(fetcher.store.partial_dir) == []
        # The next request refetches; the registry still lies, so it fails too (one fetch per request, no loop).
        async with fetcher.open_blob(REPO, d) as h:
            with pytest.raises(FetchFailed):
                await read_all(h)
        assert up.opens == [(d, 0), (d, 0)]
        assert sample(fetcher, "p2pcache_digest_mismatches_total", source="upstream") == 2
        await trio.sleep(0.05)
        assert len(up.opens) == 2 and fetcher.store.stat(d) is None
        # An honest upstream later: the next request fetches anew and succeeds.
        del up.lies[d]
        assert await fetch(fetcher, d) == data
        assert await settled_size(fetcher, d) == len(data)


async def test_refetch_after_one_mismatch_serves_later_clients(settings: Settings) -> None:
    data = blob(3 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.lies[d] = blob(len(data), seed=3)
    async with running(settings, up) as fetcher:
        async with fetcher.open_blob(REPO, d) as h:
            del up.lies[d]  # the next fetch from upstream is honest
            with pytest.raises(FetchFailed):
                await read_all(h)
        assert await fetch(fetcher, d) == data
        assert up.opens == [(d, 0), (d, 0)]
        assert await settled_size(fetcher, d) == len(data)


@pytest.mark.parametrize("how", ["raise", "end"])
async def test_a_truncated_body_resumes_with_range(settings: Settings, how: str) -> None:
    data = blob(4 * PIECE + 123)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.cuts = [100_000, 50_000]
    up.cut_how = how
    async with running(settings, up) as fetcher:
        assert await fetch(fetcher, d) == data
    assert up.opens == [(d, 0), (d, 100_000), (d, 150_000)]


async def test_an_upstream_that_keeps_cutting_fails_instead_of_looping(settings: Settings) -> None:
    data = blob(4 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.cuts = [1000] + [0] * 50  # after the first bytes, nothing more ever comes
    async with running(settings, up) as fetcher:
        with trio.fail_after(10):
            async with fetcher.open_blob(REPO, d) as h:
                with pytest.raises(FetchFailed):
                    await read_all(h)
    assert 2 <= len(up.opens) <= 6


async def test_a_cancelled_client_does_not_cancel_the_download(settings: Settings) -> None:
    data = blob(4 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.pause_at = PIECE
    async with running(settings, up) as fetcher:
        with trio.move_on_after(0.05):
            async with fetcher.open_blob(REPO, d) as h:
                await read_all(h)  # gives up (the client disconnects) while the download is paused
        up.release.set()
        with trio.fail_after(5):
            while fetcher.store.stat(d) is None:
                await trio.sleep(0.01)
        assert await fetch(fetcher, d) == data
        assert up.opens == [(d, 0)]


async def test_the_download_limit_paces_a_plain_mirrors_upstream_downloads(tmp_path) -> None:
    """Found in review: `--download-limit` paced only the swarm; a plain mirror pulled 40 MB in 1.2 s under
    5MB/s. 2 MB under 4 MB/s take at least (2 - 0.4 - 0.2) / 4 = 0.35 s (the two buckets' bursts)."""
    data = blob(2_000_000)
    d = digest_of(data)
    paced = Settings(data=tmp_path, piece_size=PIECE, download_limit=4e6)
    async with running(paced, FakeUpstream({d: data})) as fetcher:
        t0 = trio.current_time()
        assert await fetch(fetcher, d) == data
        assert trio.current_time() - t0 >= 0.3


async def test_a_restarted_node_resumes_where_the_download_stopped(settings: Settings) -> None:
    data = blob(8 * PIECE + 7)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.pause_at = 3 * PIECE + 5000
    async with running(settings, up) as fetcher:
        async with fetcher.open_blob(REPO, d) as h:
            await readable_to(h, 3 * PIECE)
        # "node shutdown": leaving `running` cancels the Fetcher's nursery with the download paused.
    assert up.opens == [(d, 0)]

    up2 = FakeUpstream({d: data})
    async with running(settings, up2, BlobStore(settings.data)) as fetcher2:
        assert await fetch(fetcher2, d) == data
    assert up2.heads == [d]
    assert up2.opens == [(d, 3 * PIECE)], "the bytes already held must not be asked for again"


async def test_a_restart_after_every_piece_was_saved_but_before_the_commit_commits_without_a_get(
        settings: Settings) -> None:
    """Found in review (kill -9 between the last state save and the commit): a partial holding every piece of a
    blob whose size is not a multiple of the piece size resumed at the start of its last piece, the stream's
    hash disagreed with the whole-blob hash (already at the end) and every pull failed, after every restart."""
    data = blob(8 * PIECE + 7)
    d = digest_of(data)
    p = BlobStore(settings.data).partial(d, len(data), PIECE)
    p.write(0, data)
    for i in range(9):
        p.mark(i, None)
    p.save()
    p.close()  # the "crash": never committed

    up = FakeUpstream({d: data})
    async with running(settings, up, BlobStore(settings.data)) as fetcher:
        assert await fetch(fetcher, d) == data
    assert up.opens == [], "nothing is missing: no GET"
    assert BlobStore(settings.data).read_bytes(d) == data


async def test_a_slow_or_small_download_saves_its_state_by_time_too(settings: Settings, monkeypatch) -> None:
    """Without a save every SAVE_EVERY_SECONDS, a blob under SAVE_EVERY_BYTES had no state on disk until a clean
    stop: a kill -9 meant starting over. The state on disk must name the pieces held while the download runs."""
    import msgpack

    import p2pcache.fetch as fetch_mod

    monkeypatch.setattr(fetch_mod, "SAVE_EVERY_SECONDS", 0.0)
    data = blob(8 * PIECE + 7)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.pause_at = 3 * PIECE + 5000
    async with running(settings, up) as fetcher:
        async with fetcher.open_blob(REPO, d) as h:
            await readable_to(h, 3 * PIECE)
            state = fetcher.store.partial_dir / f"{d[7:]}.state"
            with trio.fail_after(5):
                while not state.exists() or not msgpack.unpackb(state.read_bytes())["bitfield"][0]:
                    await trio.sleep(0.01)
        up.release.set()


async def test_errors_before_the_first_byte_reach_every_waiting_client(settings: Settings) -> None:
    missing = digest_of(b"nope")
    up = FakeUpstream({})
    async with running(settings, up) as fetcher:
        errors: list[OciError] = []

        async def client() -> None:
            with pytest.raises(OciError) as e:
                async with fetcher.open_blob(REPO, missing):
                    pass
            errors.append(e.value)

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(client)
        assert [e.code for e in errors] == ["BLOB_UNKNOWN"] * 3
        assert up.opens == [(missing, 0)]

        up.error = UpstreamUnavailable("connection refused")
        with pytest.raises(OciError) as e:
            async with fetcher.open_blob(REPO, missing):
                pass
        assert e.value.code == "UNAVAILABLE" and e.value.status == 503
        assert len(up.opens) == 2, "a failed download is forgotten, so the next request tries again"
        with pytest.raises(OciError) as e:
            async with fetcher.open_blob(REPO, "sha256:../../etc/passwd"):
                pass
        assert e.value.code == "DIGEST_INVALID"


async def test_stat_blob_asks_upstream_only_when_nothing_local_knows(settings: Settings) -> None:
    data = blob(2 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    async with running(settings, up) as fetcher:
        assert await fetcher.stat_blob(REPO, d) == len(data)
        assert up.heads == [d]
        await fetch(fetcher, d)
        assert await fetcher.stat_blob(REPO, d) == len(data)
        assert up.heads == [d]
        with pytest.raises(OciError) as e:
            await fetcher.stat_blob(REPO, digest_of(b"other"))
        assert e.value.code == "BLOB_UNKNOWN"
        up.error = UpstreamUnavailable("down")
        with pytest.raises(OciError) as e:
            await fetcher.stat_blob(REPO, digest_of(b"other"))
        assert e.value.code == "UNAVAILABLE"


async def test_an_empty_blob(settings: Settings) -> None:
    d = digest_of(b"")
    up = FakeUpstream({d: b""})
    async with running(settings, up) as fetcher:
        async with fetcher.open_blob(REPO, d) as h:
            assert h.size == 0
            assert await h.readable(0) == 0
        assert await settled_size(fetcher, d) == 0


async def test_an_upstream_that_calls_a_blob_empty_gets_no_client_a_complete_empty_body(settings: Settings) -> None:
    """An empty body is complete once its headers are out, so the handle waits for the digest check first."""
    data = blob(1000)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.lies[d] = b""
    async with running(settings, up) as fetcher:
        with pytest.raises(OciError) as e:
            async with fetcher.open_blob(REPO, d):
                pass
        assert e.value.code == "UNAVAILABLE"
        assert fetcher.store.stat(d) is None


async def test_node_shutdown_cancels_downloads_and_leaves_nothing_running(settings: Settings) -> None:
    data = blob(4 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.pause_at = PIECE
    metrics = Metrics()
    fetcher = Fetcher(settings, BlobStore(settings.data), up, metrics)  # type: ignore[arg-type]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            async with fetcher.open_blob(REPO, d) as h:
                await h.readable(0)
                nursery.cancel_scope.cancel()
    assert fetcher.downloads() == {}
    assert metrics.registry.get_sample_value("p2pcache_downloads_in_flight") == 0


class PieceSwarm:
    """A stand-in for issue 3's swarm: delivers verified pieces in a scrambled order."""

    def __init__(self, data: bytes, order: list[int]) -> None:
        self.data, self.order = data, order
        self.fills = 0

    async def fill(self, download: Download, repo: Repo) -> None:
        self.fills += 1
        await download.start(len(self.data), PIECE)
        for i in self.order:
            await give_piece(download, self.data, i)
            await trio.sleep(0)


async def test_the_swarm_seam_fills_pieces_out_of_order(settings: Settings) -> None:
    data = blob(5 * PIECE + 99)
    d = digest_of(data)
    up = FakeUpstream({})
    async with running(settings, up) as fetcher:
        fetcher.swarm = PieceSwarm(data, [2, 0, 5, 1, 4, 3])
        published: list[int] = []
        async with fetcher.open_blob(REPO, d) as h:
            fetcher.downloads()[d].add_piece_listener(lambda i, h: published.append(i))
            assert await read_all(h) == data
        assert await settled_size(fetcher, d) == len(data)
        assert up.opens == []


class UnlinkedSwarm(PieceSwarm):
    """Right pieces, but one reported as checked from a chaining value that is not its predecessor's link."""

    async def fill(self, download: Download, repo: Repo) -> None:
        await download.start(len(self.data), PIECE)
        chain = chain_of(self.data)
        for i in self.order:
            piece = self.data[i * PIECE:(i + 1) * PIECE]
            link_from = chain[i - 1] if 0 < i < len(chain) - 1 else None
            if i == 2:
                link_from = b"\1" * 32
            await download.write_piece(i, piece, chain[i], link_from)


@pytest.mark.parametrize("swarm_type,size,order,whole_pass", [
    (PieceSwarm, 7 * PIECE + 99, [6, 2, 0, 7, 5, 1, 4, 3], False),  # out of order, one chain: proved by it
    (UnlinkedSwarm, 4 * PIECE + 1, [0, 1, 2, 3, 4], True),  # one piece's link does not follow: hashed whole
])
async def test_the_chain_proves_the_digest_else_the_whole_blob_is_hashed(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, swarm_type: type[PieceSwarm], size: int,
        order: list[int], whole_pass: bool) -> None:
    data = blob(size)
    d = digest_of(data)
    passes: list[tuple[int, int]] = []  # (start, end) of every whole-blob hash the Download runs from disk
    real = Download._hash_from_disk
    monkeypatch.setattr(Download, "_hash_from_disk",
                        lambda self, start, end: (passes.append((start, end)), real(self, start, end))[1])
    async with running(settings, FakeUpstream({})) as fetcher:
        fetcher.swarm = swarm_type(data, order)
        assert await fetch(fetcher, d) == data
        assert passes == ([(0, len(data))] if whole_pass else [])
        assert await settled_size(fetcher, d) == len(data)


async def test_a_lying_swarm_is_refetched_from_upstream(settings: Settings) -> None:
    data = blob(3 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    async with running(settings, up) as fetcher:
        fetcher.swarm = PieceSwarm(blob(3 * PIECE, seed=9), [0, 1, 2])
        async with fetcher.open_blob(REPO, d) as h:
            with pytest.raises(FetchFailed):
                await read_all(h)
        assert fetcher.swarm.fills == 1
        # The next request does not trust the swarm that lied: it goes straight to upstream.
        assert await fetch(fetcher, d) == data
        assert up.opens == [(d, 0)]
        assert fetcher.swarm.fills == 1
        assert sample(fetcher, "p2pcache_digest_mismatches_total", source="swarm") == 1


class ClaimSwarm:
    """Holds pieces 0-1 from 'peers', then streams the rest from upstream (it holds the claim)."""

    def __init__(self, data: bytes, up: FakeUpstream) -> None:
        self.data, self.up = data, up

    async def fill(self, download: Download, repo: Repo) -> None:
        await download.start(len(self.data), PIECE)
        for i in (0, 1):
            await give_piece(download, self.data, i)
        await download.fetch_from_upstream(self.up, repo)  # type: ignore[arg-type]


async def test_the_swarm_can_stream_the_missing_part_from_upstream(settings: Settings) -> None:
    data = blob(4 * PIECE + 5)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    async with running(settings, up) as fetcher:
        fetcher.swarm = ClaimSwarm(data, up)
        assert await fetch(fetcher, d) == data
        assert up.opens == [(d, 2 * PIECE)]


class RangedUpstream(FakeUpstream):
    """A FakeUpstream that honours a Range end (and records each (offset, end) asked for)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        super().__init__(blobs)
        self.ranges: list[tuple[int, int | None]] = []

    @asynccontextmanager
    async def open_blob(self, repo: Repo, digest: str, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[FakeResponse]:
        self.ranges.append((offset, end))
        async with super().open_blob(repo, digest, offset) as resp:
            if end is not None:  # the registry stops at the end: no byte beyond it is sent
                resp._cut, resp._how = end - offset, "return"
            yield resp


class TakeoverSwarm:
    """A takeover claim holder: piece 0 came from peers; it fetches pieces 3-4 (nobody has them) with a Range
    end, then streams from its prefix but stops once piece 1 is in, then fetches the rest."""

    def __init__(self, data: bytes, up: RangedUpstream) -> None:
        self.data, self.up = data, up
        self.marked: list[int] = []

    async def fill(self, download: Download, repo: Repo) -> None:
        await download.start(len(self.data), PIECE)
        download.link_hints = chain_of(self.data)  # the claim holder before it published them
        download.add_piece_listener(lambda i, h: self.marked.append(i))
        await give_piece(download, self.data, 0)
        await download.fetch_from_upstream(self.up, repo, start=3 * PIECE, end=5 * PIECE)  # type: ignore[arg-type]
        assert self.marked == [0, 3, 4] and download.readable_end() == PIECE  # 3-4 are not a prefix yet
        await download.fetch_from_upstream(self.up, repo, start=PIECE,  # type: ignore[arg-type]
                                           stop=lambda: download.have(1))
        assert download.have(1) and not download.have(5)
        await download.fetch_from_upstream(self.up, repo)  # type: ignore[arg-type]


async def test_a_takeover_fetches_ranges_past_its_prefix_and_stops_when_told(settings: Settings) -> None:
    data = blob(6 * PIECE + 5)
    d = digest_of(data)
    up = RangedUpstream({d: data})
    async with running(settings, up) as fetcher:
        fetcher.swarm = swarm = TakeoverSwarm(data, up)
        assert await fetch(fetcher, d) == data
    assert up.ranges[:2] == [(3 * PIECE, 5 * PIECE), (PIECE, None)]
    assert sorted(set(swarm.marked)) == list(range(7))


async def test_an_absurd_announced_size_is_a_clear_error_not_a_crash(settings: Settings) -> None:
    data = blob(PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.announce = 1 << 62
    async with running(settings, up) as fetcher:
        with pytest.raises(OciError) as e:
            async with fetcher.open_blob(REPO, d):
                pass
        assert e.value.code == "UNAVAILABLE"
        up.announce = None
        assert await fetch(fetcher, d) == data


class ListeningSwarm:
    """Holds the claim: streams everything from upstream and records the piece hashes it would publish."""

    def __init__(self, up: FakeUpstream) -> None:
        self.up = up
        self.published: dict[int, bytes] = {}

    async def fill(self, download: Download, repo: Repo) -> None:
        download.add_piece_listener(lambda i, h: self.published.__setitem__(i, h))
        await download.fetch_from_upstream(self.up, repo)  # type: ignore[arg-type]


async def test_piece_hashes_are_right_whatever_the_chunk_boundaries(settings: Settings) -> None:
    data = blob(6 * PIECE + 777)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    up.chunk_sizes = itertools.cycle([1, 7, PIECE - 1, PIECE + 3, 3 * PIECE, 5000])
    up.cuts = [2 * PIECE + 11]  # and a resume in the middle of a piece
    async with running(settings, up) as fetcher:
        swarm = ListeningSwarm(up)
        fetcher.swarm = swarm
        assert await fetch(fetcher, d) == data
    want = dict(enumerate(chain_of(data)))
    assert swarm.published == want
    assert up.opens == [(d, 0), (d, 2 * PIECE + 11)]


async def test_a_full_disk_fails_the_download_without_refetching(settings: Settings,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = blob(3 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})

    def no_space(fd: int, data: object, offset: int) -> int:
        raise OSError(28, "No space left on device")

    async with running(settings, up) as fetcher:
        monkeypatch.setattr("p2pcache.fetch._pwrite_all", no_space)
        async with fetcher.open_blob(REPO, d) as h:
            with pytest.raises(FetchFailed):
                await read_all(h)
        assert up.opens == [(d, 0)]
        assert fetcher.store.stat(d) is None


class WrappingSwarm(PieceSwarm):
    """Checks the blob itself (finish inside fill) and reports failure with an error of its own."""

    async def fill(self, download: Download, repo: Repo) -> None:
        await super().fill(download, repo)
        try:
            await download.finish()
        except FetchFailed as e:
            raise RuntimeError("swarm: the piece list lied") from e


async def test_a_mismatch_the_swarm_wrapped_still_sends_the_next_fetch_upstream(settings: Settings) -> None:
    data = blob(2 * PIECE)
    d = digest_of(data)
    up = FakeUpstream({d: data})
    async with running(settings, up) as fetcher:
        fetcher.swarm = swarm = WrappingSwarm(blob(2 * PIECE, seed=5), [1, 0])
        async with fetcher.open_blob(REPO, d) as h:
            with pytest.raises(FetchFailed):
                await read_all(h)
        assert await fetch(fetcher, d) == data
        assert swarm.fills == 1 and up.opens == [(d, 0)]


async def test_store_blob_returns_once_the_blob_is_committed(settings: Settings) -> None:
    data = blob(5 * PIECE + 3)
    d = digest_of(data)
    bad = blob(2 * PIECE)
    bad_d = digest_of(bad)
    up = FakeUpstream({d: data, bad_d: bad})
    up.lies[bad_d] = blob(len(bad), seed=9)
    async with running(settings, up) as fetcher:
        assert await fetcher.store_blob(REPO, d) == len(data)
        assert fetcher.store.stat(d) == len(data)  # at once: no download left to settle
        assert await fetcher.store_blob(REPO, d) == len(data)  # already stored: no second fetch
        assert up.opens == [(d, 0)]
        with pytest.raises(FetchFailed):
            await fetcher.store_blob(REPO, bad_d)
        assert fetcher.store.stat(bad_d) is None


async def test_a_mirror_only_node_marks_pieces_without_hashing_them(settings: Settings) -> None:
    """Without a swarm nothing checks per-piece hashes of upstream bytes (the whole digest covers them), so they
    are not computed; the pieces still count for readers and for a resume."""
    data, d, up = paused_upstream(8 * PIECE + 7, 3 * PIECE)
    async with running(settings, up) as fetcher:
        async with fetcher.open_blob(REPO, d) as h:
            await readable_to(h, 3 * PIECE)
            download = fetcher.downloads()[d]
            assert [download.have(i) for i in range(4)] == [True, True, True, False]
            assert download.piece_hashes()[:3] == [None, None, None]
            up.release.set()
            assert await read_all(h) == data


async def test_a_swarm_node_resuming_a_mirror_partial_hashes_its_pieces_first(settings: Settings) -> None:
    data, d, up = paused_upstream(8 * PIECE + 7, 3 * PIECE)
    async with running(settings, up) as fetcher:
        async with fetcher.open_blob(REPO, d) as h:
            await readable_to(h, 3 * PIECE)

    up2 = FakeUpstream({d: data})
    up2.pause_at = 5 * PIECE
    async with running(settings, up2, BlobStore(settings.data)) as fetcher2:
        swarm = ListeningSwarm(up2)
        fetcher2.swarm = swarm
        async with fetcher2.open_blob(REPO, d) as h:
            await readable_to(h, 5 * PIECE)
            hashes = fetcher2.downloads()[d].piece_hashes()
            want = chain_of(data)[:5]
            assert hashes[:5] == want, "peers need hashes of the pieces held from the mirror-only run too"
            up2.release.set()
            assert await read_all(h) == data


class ChaosSwarm:
    """Peers deliver random pieces while upstream streams of random ranges run, stop and restart: the way a
    takeover claim holder's download is filled. Whatever the interleaving, the whole-blob hash must come out
    right (it is fed from two sides: the upstream stream in order, and the disk for pieces from peers)."""

    def __init__(self, data: bytes, up: RangedUpstream, seed: int) -> None:
        import random

        self.data, self.up, self.rng = data, up, random.Random(seed)

    async def fill(self, download: Download, repo: Repo) -> None:
        n = -(-len(self.data) // PIECE)
        await download.start(len(self.data), PIECE)
        rng = self.rng
        # The swarm knows some links (published so far): streams past the others start further back.
        download.link_hints = [h if rng.random() < 0.5 else None for h in chain_of(self.data)]

        async def peers() -> None:
            order = list(range(n))
            rng.shuffle(order)
            for i in order[: n // 2]:
                await trio.sleep(rng.random() * 0.002)
                await give_piece(download, self.data, i)

        async def upstream() -> None:
            while not all(download.have(i) for i in range(n)):
                first = rng.randrange(n)
                end = rng.choice([None, min(len(self.data), (first + rng.randint(1, 3)) * PIECE)])
                # Stop once this many pieces are held. Fixed per stream: a stop() that flips between calls makes
                # streams that stop before their first byte, and fetch_from_upstream rightly gives up on those.
                budget = rng.randint(1, 4) + rng.randint(0, n)
                await download.fetch_from_upstream(  # type: ignore[arg-type]
                    self.up, repo, start=first * PIECE, end=end,
                    stop=lambda budget=budget: sum(download.have(i) for i in range(n)) >= budget)
                await trio.sleep(rng.random() * 0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(peers)
            nursery.start_soon(upstream)


@pytest.mark.parametrize("seed", range(20))
async def test_the_whole_hash_survives_any_mix_of_peer_pieces_and_upstream_streams(settings: Settings,
                                                                                   seed: int) -> None:
    data = blob(12 * PIECE + 333, seed=seed)
    d = digest_of(data)
    up = RangedUpstream({d: data})
    up.chunk_sizes = itertools.cycle([PIECE // 3, PIECE, 7, 2 * PIECE + 5])
    async with running(settings, up) as fetcher:
        fetcher.swarm = ChaosSwarm(data, up, seed)
        assert await fetch(fetcher, d) == data


async def test_a_commit_that_fails_on_the_disk_is_a_failure_not_a_crash(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The store cannot take a verified blob (no inode left for blobs/<ab>/, a full disk): the client still
    gets every byte, and the log says what happened in one line. It said "download ... crashed", with a
    traceback (found in review)."""
    import errno

    data = blob(300_000)
    d = digest_of(data)

    def no_room(src: Path, hex_: str, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    store = BlobStore(settings.data, metrics=Metrics())
    monkeypatch.setattr(store, "_install", no_room)
    async with running(settings, FakeUpstream({d: data}), store) as fetcher:
        assert await fetch(fetcher, d) == data
        assert await settled_size(fetcher, d) is None
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text
    assert "was verified but cannot be stored" in caplog.text and "No space left" in caplog.text


async def stored_by_an_earlier_run(settings: Settings, data: bytes) -> tuple[str, Path]:
    """`data` in the store as a node before a restart left it: committed by another Fetcher; its file's path."""
    d = digest_of(data)
    async with running(settings, FakeUpstream({d: data})) as fetcher:
        assert await fetcher.store_blob(REPO, d) == len(data)
        return d, fetcher.store.path(d)


async def test_a_stored_blob_truncated_to_nothing_is_fetched_again_not_served_empty(settings: Settings) -> None:
    """An empty body is complete with its headers: a stored file cut to 0 bytes went out as a whole 200 before
    its check could fail it (found in review)."""
    data = blob(3 * PIECE)
    d, path = await stored_by_an_earlier_run(settings, data)
    os.truncate(path, 0)
    up = FakeUpstream({d: data})
    async with running(settings, up, BlobStore(settings.data)) as fetcher:
        assert await fetch(fetcher, d) == data
        assert up.opens == [(d, 0)]
        assert sample(fetcher, "p2pcache_digest_mismatches_total", source="store") == 1


async def test_preheat_of_a_damaged_stored_blob_fetches_it_again(settings: Settings) -> None:
    """Preheat said "cached" for a stored copy whose check then removed it (found in review)."""
    data = blob(3 * PIECE)
    d, path = await stored_by_an_earlier_run(settings, data)
    with open(path, "r+b") as f:
        f.write(b"rot")
    up = FakeUpstream({d: data})
    async with running(settings, up, BlobStore(settings.data)) as fetcher:
        assert await fetcher.store_blob(REPO, d) == len(data)
        assert up.opens == [(d, 0)]
        with open(fetcher.store.path(d), "rb") as f:
            assert f.read() == data


async def test_a_check_that_cannot_open_its_file_leaves_nothing_waiting(settings: Settings, monkeypatch) -> None:
    """The check was registered before its file was opened: with no descriptor left the open failed, the check
    never ended, and every later request of the blob hung at its last byte (found in review)."""
    import p2pcache.fetch as fetch_module

    data = blob(3 * PIECE)
    d, _ = await stored_by_an_earlier_run(settings, data)

    def no_descriptor(*args: object, **kw: object) -> None:
        raise OSError(24, "Too many open files")

    async with running(settings, FakeUpstream({}), BlobStore(settings.data)) as fetcher:
        monkeypatch.setattr(fetch_module, "open", no_descriptor, raising=False)
        with pytest.raises(OciError) as e:
            await fetch(fetcher, d)
        assert e.value.code == "UNAVAILABLE"
        monkeypatch.undo()
        with trio.fail_after(5):
            assert await fetch(fetcher, d) == data


async def test_unchecked_stored_blobs_are_hashed_a_few_at_a_time(settings: Settings, monkeypatch) -> None:
    """Each check holds a read buffer: 60 at once took a node from 36 to 965 MB (found in review)."""
    import threading

    import p2pcache.fetch as fetch_module

    blobs = [blob(2 * PIECE, seed=i) for i in range(12)]
    for b in blobs:
        await stored_by_an_earlier_run(settings, b)
    lock, busy, most = threading.Lock(), [0], [0]
    hash_some = fetch_module._hash_some

    def counted(*args):  # type: ignore[no-untyped-def]
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            import time
            time.sleep(0.01)
            return hash_some(*args)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(fetch_module, "_hash_some", counted)
    async with running(settings, FakeUpstream({}), BlobStore(settings.data)) as fetcher:
        got: dict[int, bytes] = {}

        async def one(i: int) -> None:
            got[i] = await fetch(fetcher, digest_of(blobs[i]))

        async with trio.open_nursery() as nursery:
            for i in range(len(blobs)):
                nursery.start_soon(one, i)
    assert [got[i] for i in range(len(blobs))] == blobs
    assert 1 < most[0] <= fetch_module.CHECK_PASSES


async def test_verify_reports_a_file_it_cannot_open_and_checks_the_others(settings: Settings, monkeypatch) -> None:
    """One stored file the node could not open (permissions, no descriptor left) ended the whole verify with a
    500 (found in review): it is reported as unreadable and kept, the others are hashed."""
    import builtins

    import p2pcache.fetch as fetch_module

    a, b = blob(2 * PIECE, seed=1), blob(2 * PIECE, seed=2)
    da, path_a = await stored_by_an_earlier_run(settings, a)
    db, _ = await stored_by_an_earlier_run(settings, b)
    real_open = builtins.open

    def guarded(file, *args, **kw):  # type: ignore[no-untyped-def]
        if str(file) == str(path_a):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kw)

    monkeypatch.setattr(fetch_module, "open", guarded, raising=False)
    async with running(settings, FakeUpstream({}), BlobStore(settings.data)) as fetcher:
        out = await fetcher.verify_stored()
        assert (out["checked"], out["already"], out["damaged"], out["unreadable"]) == (1, 0, [], [da])
        assert fetcher.store.stat(da) is not None and fetcher.store.stat(db) is not None


async def test_a_download_is_known_checked_before_its_commit_lists_it(settings: Settings, monkeypatch) -> None:
    """The store lists a blob once its commit (a worker thread) indexed it; the fetcher learned it had checked
    it only after the commit returned, and a verify in between hashed it again (found in review)."""
    data = blob(3 * PIECE)
    d = digest_of(data)
    seen: list[bool] = []
    async with running(settings, FakeUpstream({d: data})) as fetcher:
        commit = fetcher.store.commit

        def watched(partial, sha):  # type: ignore[no-untyped-def]
            seen.append(d in fetcher._checked)
            return commit(partial, sha)

        monkeypatch.setattr(fetcher.store, "commit", watched)
        assert await fetcher.store_blob(REPO, d) == len(data)
        assert seen == [True]
        assert (await fetcher.verify_stored())["already"] == 1


async def test_the_record_of_checked_blobs_forgets_blobs_the_store_no_longer_holds(settings: Settings,
                                                                                   monkeypatch) -> None:
    """One entry per blob the process ever committed or checked, for as long as it ran (a slow leak)."""
    import p2pcache.fetch as fetch_module

    monkeypatch.setattr(fetch_module, "CHECKED_SWEEP_MIN", 4, raising=False)
    blobs = [blob(PIECE // 2, seed=i) for i in range(12)]
    async with running(settings, FakeUpstream({digest_of(b): b for b in blobs})) as fetcher:
        for b in blobs:
            d = digest_of(b)
            assert await fetcher.store_blob(REPO, d) == len(b)
            assert d in fetcher._checked
            if b is not blobs[-1]:
                fetcher.store.delete(d)
        assert len(fetcher._checked) < 6
        kept = digest_of(blobs[-1])
        assert (await fetcher.verify_stored())["already"] == 1 and kept in fetcher._checked
