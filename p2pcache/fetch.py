"""Single-flight blob downloads that many clients stream from while the bytes arrive.

What this module is for: a client asks for a blob; if the store holds it whole the client gets a handle over the
stored file, otherwise it joins the one `Download` for that digest (or starts it). A `Download` fills a
`PartialBlob` on disk (from upstream, or from the swarm once issue 3 plugs in), computes the whole-blob SHA-256
(and, in a swarm, the piece hashes: links of that SHA-256's chain, `swarm/chain.py`) as bytes arrive, and wakes
every attached client so it can send the bytes already on disk. Clients never wait for the whole blob (time to
first byte stays low).

What it must never do:
- never let a client read the blob's last piece before the whole-blob SHA-256 equals the digest: a client can
  never receive a complete wrong blob. The store's commit (fsync, then rename) comes after that check, so the
  store never holds a wrong or half-written blob either; durability (seconds on a slow disk) does not delay
  clients, whose bytes are already verified in the page cache;
- never run a download in a client's request task: downloads live in `Fetcher.run`'s nursery, so a client that
  disconnects cancels nothing that others wait on, and stopping the node cancels every download;
- never start two downloads of one digest in one node (single-flight, decided without an await in between);
- never buffer a blob in memory: chunks go through bounded queues to disk (memory stays flat in blob size);
- never hash on the event loop: hashing (~1.5 GB/s/core) is the CPU bottleneck, so both hashes run in worker
  threads (hashlib releases the GIL on large buffers) while the loop keeps receiving and serving;
- never hash twice: piece hashes of an upstream stream are computed only when the node shares with a swarm
  (peers verify pieces against them); a mirror-only node marks pieces without a hash, and the whole-blob digest
  vouches for every byte (a 1 GiB cold pull: 0.7 s less CPU). In a swarm the piece hashes are the chaining
  values of the blob's own SHA-256 at piece boundaries, so the pass that checks (or computes) them also proves
  the whole digest: no second pass over the blob (`_chained_digest`);
- never fsync while streaming: an early `fdatasync` of the data file every 64 MiB slowed the pwrites behind it
  (a cold 1 GiB pull: 0.25 GB/s with it, 0.36 without), so the data reaches the disk in the commit's fsync,
  after clients have their bytes.

Theory of operation
-------------------
A `Download` is one attempt to get one digest into the store. It learns the blob's size (from upstream's first
response, or from the swarm's metainfo via `Download.start`), asks the store for room and for a `PartialBlob` (which
may be resumed from an earlier run: its contiguous prefix is re-hashed from disk to rebuild the running whole-blob
hash, and upstream is asked with `Range` from there). A mirror-only node streams a body through
`pump.SocketPump`: one worker thread receives (and decrypts, over TLS) into reused buffers and pwrites them, a
second feeds the whole-blob hash, and the loop marks completed pieces and wakes clients (`_pump`). A swarm's
streams (and any body the pump cannot take) are read by a task on the loop and handed through a bounded queue
(`lane.ThreadLane`) to a writer thread (pwrite, and the whole-blob hash). In a swarm the writer computes the
chain's links at piece boundaries instead (the last piece: its own SHA-256), peers' pieces arrive checked against
the same chain, and `finish()` proves the digest from the last link and the last piece when the marked pieces
form one chain (else, say after a restart, it hashes the whole blob from disk).
A body that ends early or a dropped connection resumes with `Range` from the last written byte (bounded retries).
When every piece is held the whole hash is compared with the digest: equal -> `store.commit`, and the last piece
becomes readable; different -> the partial is discarded, `digest_mismatches` counted, every attached client's
`readable()` raises `FetchFailed` (the proxy aborts the response before its last byte), and the download is
forgotten: the next request refetches (from upstream only, if the bad bytes came through the swarm). Refetching on
request rather than at once means a registry that keeps lying costs one fetch per client request, never a loop, and
a refetch never races a client that arrives after the upstream was fixed.

Swarm seam (issue 3)
--------------------
When `Fetcher.swarm` is set, a download calls `await swarm.fill(download, repo)` instead of streaming upstream
itself, then `download.finish()` (whole-hash check + commit) if `fill` did not call it. The swarm uses:
- `await download.start(size, piece_size)`: size and piece size known (from metainfo); opens/resumes the partial
  and releases the clients waiting for the size. Idempotent; a different size raises `FetchFailed`.
- `await download.write_piece(index, data, sha256)`: a piece the swarm already verified against the metainfo:
  pwrite, mark (with the chaining value it was checked from), wake clients. Clients then read the
  contiguous verified prefix, still minus the last piece until `finish()` verified the whole blob.
- `await download.fetch_from_upstream(upstream, repo)`: while holding the cluster's claim: stream from upstream
  from the first byte not held contiguously to the end (pieces are hashed and marked as they stream in, and
  `add_piece_listener` callbacks fire so the swarm can publish them at once). Starts the download if needed.
- `await download.finish()`: whole-hash check and commit; raises `BlobDigestMismatch` (a `FetchFailed`) when the
  bytes are wrong, after discarding the partial, so the swarm can blame its sources.
- `download.add_piece_listener(cb)`: `cb(index, sha256)` after each piece is marked (publish "have").
- read-only state: `digest`, `size`, `piece_size`, `n_pieces`, `partial`, `have(index)`, `piece_hashes()`.
  Serving pieces to peers while downloading: `partial.read(offset, n)` for held pieces; once `committed` the
  partial is gone and the bytes are in the store (`store.open(digest)`).
A failed `fill` fails the download like any other error; a whole-blob mismatch of bytes that came through
`write_piece` makes the node's next download of that digest skip the swarm (`upstream_only`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import httpx
import trio

from p2pcache.lane import ThreadLane
from p2pcache.oci.errors import OciError, UpstreamUnavailable
from p2pcache.oci.reference import parse_digest
from p2pcache.paced import UPSTREAM_AHEAD, paced
from p2pcache.pump import BufferBudget, SocketPump
from p2pcache.store.blobs import DigestMismatch
from p2pcache.swarm.chain import ChainHasher, whole_digest
from p2pcache.swarm.metainfo import piece_count, piece_size_for, piece_span
from p2pcache.swarm.ratelimit import DownloadShare

if TYPE_CHECKING:
    from p2pcache.config import Settings
    from p2pcache.metrics import Metrics
    from p2pcache.oci.rawbody import SocketBody
    from p2pcache.oci.reference import Repo
    from p2pcache.oci.upstream import Upstream
    from p2pcache.store.blobs import BlobStore
    from p2pcache.store.partial import PartialBlob

log = logging.getLogger(__name__)

# Chunks queued between the upstream reader and the stream's writer thread (a ThreadLane): with ~1 MiB chunks this
# bounds a download's memory to a few MiB while letting the reader run ahead of the thread's pwrite and hashing.
LANE_DEPTH = 8
# Chunks the writer thread takes at once when it fell behind: fewer results to hand back to the loop.
BATCH_CHUNKS = 8
# Persist the partial's state (bitfield + piece hashes) after this many newly marked bytes, so a crash loses
# little (a clean stop saves anyway). Each save is an fsync: every 16 MiB cost a cold 1 GiB pull ~8%.
SAVE_EVERY_BYTES = 64 << 20
# ... and after this many seconds with anything newly marked: a blob under 64 MiB (or a slow download) had no
# state on disk at all, so a kill -9 meant starting over (found in review: a 50 MB blob at 10 MB/s, killed at 3.5 s).
SAVE_EVERY_SECONDS = 5.0
# Resume attempts after an upstream body ended early without making any progress in between.
MAX_IDLE_RESUMES = 3
# Hard cap on resume attempts per download, progress or not, so a flapping upstream cannot loop forever.
MAX_RESUMES = 20
# Reads when re-hashing a resumed prefix from disk.
REHASH_READ = 4 << 20
# Reads of the pass that checks a stored blob the node has not checked since it started (StoreCheck), and how
# many passes hash at once (the others wait their turn): CHECK_PASSES x CHECK_READ bytes of buffers at most.
CHECK_READ = 4 << 20
CHECK_PASSES = 4
# The record of checked blobs is swept of blobs the store no longer holds when it reaches this many entries
# (and then twice what the sweep left).
CHECKED_SWEEP_MIN = 1024

# Errors of the connection to upstream after the response started: worth a resume with Range.
_TRANSIENT: tuple[type[BaseException], ...] = (
    UpstreamUnavailable, httpx.TransportError, OSError, trio.BrokenResourceError,
)


class FetchFailed(Exception):
    """The download failed after the client got its size: its response must be aborted, not completed."""


class BlobDigestMismatch(FetchFailed):
    """The blob's bytes do not hash to its digest; nothing was stored."""


class BlobSwarm(Protocol):
    """What issue 3 provides: completes `download` from peers and/or (with the claim) upstream."""

    async def fill(self, download: Download, repo: Repo) -> None: ...


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _hash_some(f: BinaryIO, hasher: Any, buf: memoryview) -> bool:
    """Feed the next bytes of `f` (up to a buffer's worth) to `hasher` (a worker thread); False at the file's end."""
    n = f.readinto(buf)  # type: ignore[attr-defined]
    hasher.update(buf[:n])
    return n == len(buf)


# What the writer thread reports per batch: the stream's end after it, the pieces it completed (with their
# hashes and the chaining values they were computed from, or None when not hashing pieces), the bytes it fed
# the whole-blob hash, and the error that stopped it, if any.
_Written = tuple[int, list[tuple[int, bytes | None, bytes | None]], int, OSError | ValueError | None]


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one real error of a nursery's exception group (trio groups strictly), else the group itself."""
    real = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        inner = real[0]
        return _single(inner) if isinstance(inner, BaseExceptionGroup) else inner
    return group


def _client_error(exc: BaseException | None) -> OciError:
    """What a client waiting for a download's size sees when it failed before that."""
    if isinstance(exc, OciError):
        return exc
    if isinstance(exc, UpstreamUnavailable | httpx.TransportError):
        return OciError("UNAVAILABLE", "upstream registry unreachable")
    return OciError("UNAVAILABLE", "blob download failed")


class Download:
    """One attempt to get one digest into the store; owned by `Fetcher`'s nursery, never by a client.

    `upstream_only` makes the download skip the swarm: the refetch after the swarm's bytes failed the whole-blob
    check does not trust the peers that just lied.
    """

    def __init__(self, fetcher: Fetcher, repo: Repo, digest: str, *, upstream_only: bool = False) -> None:
        self.fetcher = fetcher
        self.repo = repo
        self.digest = digest
        self.upstream_only = upstream_only
        self.size: int | None = None
        self.piece_size: int | None = None
        self.n_pieces = 0
        self.partial: PartialBlob | None = None
        self.verified = False  # the whole-blob SHA-256 matched: every byte may be read
        self.done = trio.Event()  # set when the download has ended: committed to the store, or failed
        self.committed = False  # ... and the store holds it (fsynced and renamed into blobs/)
        self.error: BaseException | None = None
        self._sized = trio.Event()  # set when the size is known, or when the download failed before that
        self._progress = trio.Event()  # replaced on every change: a broadcast to waiting clients
        self._listeners: list[Callable[[int, bytes], None]] = []
        self._fd = -1
        # The contiguous prefix on disk: max of what the upstream stream wrote and the leading marked pieces.
        self._stream_end = 0
        self._pieces_end = 0
        # Running whole-blob hash over bytes [0, _whole_pos); one feeder at a time (_whole_lock).
        self._whole = hashlib.sha256()
        self._whole_pos = 0
        self._whole_lock = trio.Lock()
        self._streaming = False  # a solo stream runs: its writer thread feeds the whole-blob hash from memory
        # Piece hashes of a swarm's stream (swarm/chain.py): the chain over bytes [0, _piece_pos) (None when no
        # stream has started), the chaining value the piece in progress started from, and the last piece's
        # own SHA-256 while the stream is in it.
        self._chain: ChainHasher | None = None
        self._chain_start: bytes | None = None
        self._last_hasher = hashlib.sha256()
        self._piece_index = 0
        self._piece_pos = 0
        self._stream_hashes_pieces = True  # _write_batch computes piece hashes (decided per stream in _stream)
        # For each marked piece, the chaining value its hash was checked (or computed) from: b"" for piece 0.
        # finish() proves the whole digest from these when they form one chain (see _chained_digest).
        self._links_from: dict[int, bytes] = {}
        # The swarm's piece hash list (its metainfo), where a stream that starts past the held pieces finds the
        # chaining value to start from.
        self.link_hints: list[bytes | None] | None = None
        self._marked_since_save = 0
        self._save_due = False
        self._saving = False
        self._saved_at = time.monotonic()  # when a save was last due
        self._peer_pieces = 0  # pieces that came through write_piece (the swarm), for blame on a mismatch
        self._too_long = False  # upstream sent more bytes than the size it announced
        self._mismatch: BlobDigestMismatch | None = None  # what finish() found, if the bytes were wrong

    def __repr__(self) -> str:
        return f"<Download {self.digest[:19]} size={self.size} upstream_only={self.upstream_only}>"

    # ---- what clients (through BlobHandle) use ----

    async def wait_size(self) -> int:
        """The blob's size once known; an OciError (for the client) if the download failed before that."""
        await self._sized.wait()
        if self.size is None:
            raise _client_error(self.error)
        return self.size

    def readable_end(self) -> int:
        """End of the bytes clients may read now: the contiguous prefix, minus the last piece until verified."""
        assert self.size is not None
        if self.verified:
            return self.size
        last_start, _ = piece_span(self.n_pieces - 1, self.size, self.piece_size or 1)
        # With a swarm, bytes a stream wrote count once their piece is marked: until then a peer's copy of the
        # piece may still replace them, and a client must only ever read bytes the whole-blob hash will cover.
        end = max(self._stream_end, self._pieces_end) if self._solo() else self._pieces_end
        return min(end, last_start)

    async def readable(self, offset: int) -> int:
        """Wait until the readable end is > offset (or the blob is complete); FetchFailed if the download failed."""
        while True:
            if self.error is not None:
                raise FetchFailed(f"download of {self.digest} failed") from self.error
            if self.size is None:
                raise FetchFailed("download has no size yet")
            end = self.readable_end()
            if end > offset or self.verified:
                return end
            await self._progress.wait()

    def open_reader(self) -> BinaryIO:
        """A file object of its own (own offset) over the bytes on disk, for one client's handle."""
        if self.committed:
            f = self.fetcher.store.open(self.digest)
            if f is not None:
                return f
        if self.error is not None or self.partial is None:
            raise _client_error(self.error)
        fd = self.partial.file.fileno()
        try:
            # A new open file description of the same inode: survives the store's rename on commit, and has
            # its own file offset, unlike a dup().
            return open(f"/proc/self/fd/{fd}", "rb")
        except OSError:
            return os.fdopen(os.dup(fd), "rb")

    # ---- what the swarm (issue 3) uses; see the module docstring ----

    def add_piece_listener(self, cb: Callable[[int, bytes], None]) -> None:
        """`cb(index, sha256)` is called on the event loop after each piece is marked."""
        self._listeners.append(cb)

    def have(self, index: int) -> bool:
        return self.partial is not None and self.partial.have(index)

    def piece_hashes(self) -> list[bytes | None]:
        return self.partial.piece_hashes() if self.partial is not None else []

    async def start(self, size: int, piece_size: int | None = None) -> None:
        """Size known: make room, open or resume the partial, release clients waiting for the size."""
        if self.size is not None:
            if size != self.size:
                raise FetchFailed(f"{self.digest}: size {size} disagrees with {self.size}")
            return
        if not isinstance(size, int) or size < 0:
            raise FetchFailed(f"{self.digest}: invalid size {size!r}")
        settings = self.fetcher.settings
        piece_size = piece_size or piece_size_for(size, settings.piece_size)
        store = self.fetcher.store
        try:
            store.make_room(size, keep=self.digest)
            partial = store.partial(self.digest, size, piece_size)
        except (OSError, ValueError) as e:  # no space, an absurd size announced by upstream or metainfo
            raise FetchFailed(f"cannot hold {self.digest} ({size} bytes): {e}") from e
        self.partial = partial
        self.size = partial.size
        self.piece_size = partial.piece_size
        self.n_pieces = piece_count(self.size, self.piece_size)
        self._fd = partial.file.fileno()
        self._refresh_pieces_end()
        self._stream_end = 0
        self._sized.set()
        self._wake()
        if self._pieces_end:
            log.info("resuming %s at %d of %d bytes", self.digest, self._pieces_end, self.size)
            await self._advance_whole_hash()
        if partial.resumed and self._hash_pieces():
            # Pieces held from a run without the swarm have no hashes: peers need them to verify.
            await trio.to_thread.run_sync(partial.fill_missing_hashes)

    async def write_piece(self, index: int, data: bytes, sha256: bytes, link_from: bytes | None = None) -> None:
        """Store piece `index`, which the caller verified against `sha256` (its link in the blob's SHA-256 chain,
        checked from the chaining value `link_from`: None for piece 0 and the last piece); wake clients."""
        partial = self._require_started()
        assert self.size is not None and self.piece_size is not None
        if not 0 <= index < self.n_pieces:
            raise ValueError(f"piece {index} out of range 0..{self.n_pieces - 1}")
        start, length = piece_span(index, self.size, self.piece_size)
        if len(data) != length:
            raise ValueError(f"piece {index} has {len(data)} bytes, expected {length}")
        if partial.have(index):
            return
        # Written and marked in one step under the partial's write lock, so an upstream stream writing the same
        # piece cannot mix its bytes in (see _write_batch).
        if not await trio.to_thread.run_sync(partial.write_piece_once, index, data, sha256):
            return
        self._peer_pieces += 1
        self._links_from[index] = link_from or b""
        self._after_mark(index, sha256)
        self._wake()
        if self._save_due:
            await self._save_state()

    async def fetch_from_upstream(self, upstream: Upstream, repo: Repo, *, start: int | None = None,
                                  end: int | None = None, stop: Callable[[], bool] | None = None) -> None:
        """Stream the rest of the blob from upstream; resume with Range on a short body (bounded).

        For the swarm (the size is known): `start`, a piece boundary, begins the stream at the first piece from
        there not held yet, even past the contiguous prefix (a takeover claim holder fetching what no peer has:
        such a detached stream hashes and marks pieces; it starts no later than the first piece whose chaining
        value before it is known, held here or in `link_hints`); `end`
        (exclusive) is the Range end, so upstream sends nothing beyond; `stop()`, checked before each chunk,
        ends the stream cleanly at the end of the piece in progress (the bytes received are written and hashed;
        a stream always stops on a piece boundary, so any later stream can start where it stopped) and returns.
        """
        if self.size is None and self._resumable_on_disk():
            # An earlier run left part of this blob: learn the size with a HEAD so the first GET already asks
            # for just the missing range (a plain GET would start sending bytes we hold).
            try:
                await self.start(await upstream.head_blob(repo, self.digest))
            except _TRANSIENT:
                pass  # the GET below will tell
        idle = total = 0
        while True:
            offset = self._next_offset(start)
            limit = self.size if self.size is None or end is None else min(end, self.size)
            if limit is not None and offset >= limit:
                return
            if stop is not None and stop():
                return
            err: BaseException | None = None
            try:
                ranged = {} if limit is None or limit == self.size else {"end": limit}
                async with upstream.open_blob(repo, self.digest, offset, **ranged) as resp:
                    if self.size is None:
                        await self.start(resp.size)
                        if self._resume_offset() > offset:
                            # A partial from an earlier run: ask again for just the missing part.
                            continue
                    elif resp.size != self.size:
                        raise FetchFailed(f"upstream size of {self.digest} changed to {resp.size}")
                    if resp.offset != offset:
                        raise FetchFailed(f"upstream answered from offset {resp.offset}, asked {offset}")
                    detached = offset > self._resume_offset()
                    err = await self._stream(resp, offset, limit=limit, stop=stop, detached=detached)
            except OciError as e:
                if self.size is None:
                    raise
                raise FetchFailed(f"upstream refused the rest of {self.digest}: {e}") from e
            except _TRANSIENT as e:
                if self.size is None:
                    raise
                err = e
            assert self.size is not None
            pos = self._next_offset(start)
            if pos >= (self.size if end is None else min(end, self.size)) or (stop is not None and stop()):
                return
            total += 1
            idle = 0 if pos > offset else idle + 1
            if idle > MAX_IDLE_RESUMES or total > MAX_RESUMES:
                raise FetchFailed(f"upstream body of {self.digest} ended at {pos} of {self.size} bytes "
                                  f"after {total} attempts") from err
            log.warning("upstream body of %s ended at %d of %d (%r); resuming", self.digest, pos, self.size, err)
            if idle:
                await trio.sleep(min(0.05 * 2**idle, 1.0))

    async def finish(self) -> None:
        """Check the whole-blob hash and commit; BlobDigestMismatch (partial discarded) when it is wrong."""
        if self.committed:
            return
        if self._mismatch is not None:
            raise self._mismatch  # finish() already ran (from inside the swarm's fill) and found bad bytes
        partial = self._require_started()
        assert self.size is not None
        if self.size == 0 and not partial.have(0):
            self._mark(0, hashlib.sha256(b"").digest())
        if self._pieces_end < self.size and self._stream_end < self.size:
            raise FetchFailed(f"{self.digest} is incomplete ({max(self._pieces_end, self._stream_end)} "
                              f"of {self.size} bytes)")
        got = None if self._solo() else await self._chained_digest()
        if got is None:
            await self._advance_whole_hash()
            got = self._whole.hexdigest() if self._whole_pos == self.size else "(incomplete)"
        if self._too_long or "sha256:" + got != self.digest:
            self.fetcher.metrics.digest_mismatches.labels(source=self.source()).inc()
            partial.discard()
            partial.close()  # handles read through their own file objects
            self.partial = None
            self._mismatch = BlobDigestMismatch(f"bytes of {self.digest} hash to sha256:{got}; discarded")
            raise self._mismatch
        self.verified = True
        self._wake()
        # Before the commit, not after: the store lists the blob from the moment its commit (in a thread) indexes
        # it, and an admin verify that listed it then hashed it again (found in review). Rename keeps the inode.
        self.fetcher.checked(self.digest, os.fstat(partial.file.fileno()).st_ino)
        try:
            # commit fsyncs the blob (seconds for a large one on a slow disk): keep the loop serving meanwhile.
            await trio.to_thread.run_sync(self.fetcher.store.commit, partial, got)
        except DigestMismatch as e:
            self.fetcher.metrics.digest_mismatches.labels(source=self.source()).inc()
            partial.close()
            self.partial = None
            self._mismatch = BlobDigestMismatch(str(e))
            raise self._mismatch from e
        except OSError as e:
            # A full disk, or no inode left for blobs/<ab>/: the bytes were verified, and the clients reading
            # them keep their own file objects to the end; only the store misses the blob. A failure of the
            # download, not a crash: it was logged as one, with a traceback (found in review). `_close` keeps the
            # partial to resume from if its state can be saved.
            raise FetchFailed(f"{self.digest} was verified but cannot be stored "
                              f"(its clients still get every byte): {e}") from e
        self.committed = True
        self._wake()

    # ---- internals ----

    async def _run(self) -> None:
        swarm = self.fetcher.swarm
        if swarm is not None and not self.upstream_only:
            await swarm.fill(self, self.repo)
        else:
            await self.fetch_from_upstream(self.fetcher.upstream, self.repo)
        await self.finish()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None and not self.verified:
            # Once verified, clients may finish reading their own file objects even if the commit failed.
            self.error = exc
        self._sized.set()
        self._wake()

    def _close(self) -> None:
        """Save what we have for a later resume, and release the partial's file."""
        partial, self.partial = self.partial, None
        if partial is None:
            return
        if not self.committed:
            try:
                partial.save()
            except OSError as e:
                if partial.state_path.exists():
                    log.warning("cannot save partial state of %s: %s (an older state stays to resume from)",
                                self.digest, e)
                else:
                    # Without a state nothing can resume it (a restart deletes it), yet it held the disk: on a
                    # full disk without --max-disk every later pull failed until a restart (found in review).
                    log.warning("cannot save partial state of %s: %s; its partial download is removed",
                                self.digest, e)
                    partial.discard()
        # Every handle reads through a file object of its own (open_reader), so closing this one is safe.
        partial.close()

    def _resumable_on_disk(self) -> bool:
        hex_ = self.digest.split(":", 1)[1]
        return (self.fetcher.store.partial_dir / f"{hex_}.state").exists()

    def source(self) -> str:
        """Where this download's bytes came from: "swarm" if any piece came through write_piece, else "upstream"."""
        return "swarm" if self._peer_pieces else "upstream"

    async def _save_state(self) -> None:
        """Persist the bitfield for a resume after a restart; off the event loop, one save at a time."""
        partial = self.partial
        if self._saving or partial is None:
            return
        self._saving, self._save_due = True, False
        try:
            await trio.to_thread.run_sync(partial.save)
        except (OSError, ValueError) as e:
            log.warning("cannot save partial state of %s: %s", self.digest, e)
        finally:
            self._saving = False

    def _require_started(self) -> PartialBlob:
        if self.partial is None:
            raise FetchFailed(f"{self.digest}: download not started (or already discarded)")
        return self.partial

    def _wake(self) -> None:
        ev, self._progress = self._progress, trio.Event()
        ev.set()

    def _resume_offset(self) -> int:
        return max(self._stream_end, self._pieces_end)

    def _next_offset(self, start: int | None) -> int:
        """Where an upstream stream starts: the contiguous prefix's end, or the first piece not held from `start`;
        for a swarm's stream, no later than the first piece whose chaining value before it is known."""
        ps = self.piece_size or 1
        pos = self._resume_offset()
        if pos % ps and pos != self._piece_pos and pos != self.size:
            # A stream that ended mid-piece, and another stream since: the piece hash state is gone, so start
            # over at the piece (only with a swarm; a solo stream is the only one and keeps its state). Not when
            # every byte is held (the last piece ends off the piece grid): nothing is left to fetch, and a stream
            # of the last piece again met a whole-blob hash already at the end and failed every pull (a restart
            # between the last state save and the commit: found in review).
            pos -= pos % ps
        if start is not None and start > pos and self.partial is not None and self.size is not None:
            i = start // ps
            while i < self.n_pieces and self.partial.have(i):
                i += 1
            pos = min(i * ps, self.size)
        if self._hash_pieces() and pos != self._piece_pos and self.partial is not None:
            # The stream hashes a chain (swarm/chain.py) and must start from a known chaining value, which may
            # mean fetching some held pieces' bytes again (hashed, not written: write_unless_held).
            i = pos // ps
            while 0 < i < self.n_pieces and not self._link_before(i)[0]:
                i -= 1
            pos = min(pos, i * ps)
        return pos

    def _link_before(self, index: int) -> tuple[bool, bytes | None]:
        """Whether the chaining value before piece `index` is known, and it (None before piece 0): from the
        pieces held here, else from the swarm's piece hash list."""
        if index == 0:
            return True, None
        assert self.partial is not None
        link = self.partial.piece_hashes()[index - 1]
        if link is None and self.link_hints is not None and index - 1 < len(self.link_hints):
            link = self.link_hints[index - 1]
        return link is not None, link

    def _refresh_pieces_end(self) -> None:
        assert self.partial is not None and self.size is not None and self.piece_size is not None
        self._pieces_end = min(self.partial.contiguous_pieces() * self.piece_size, self.size)

    def _hash_pieces(self) -> bool:
        """Whether an upstream stream computes piece hashes: only a node in a swarm has a use for them."""
        return self.fetcher.swarm is not None or bool(self._listeners)

    def _solo(self) -> bool:
        """Whether the upstream stream is the blob's only writer (no swarm): then it feeds the whole-blob hash
        from memory as it streams, and clients may read its bytes before their piece is complete."""
        return not self._hash_pieces()

    def _mark(self, index: int, sha256: bytes | None, link_from: bytes | None = None) -> None:
        partial = self._require_started()
        if partial.have(index):
            return
        partial.mark(index, sha256)
        if link_from is not None:
            self._links_from[index] = link_from
        self._after_mark(index, sha256)

    def _after_mark(self, index: int, sha256: bytes | None) -> None:
        self._refresh_pieces_end()
        assert self.size is not None and self.piece_size is not None
        self._marked_since_save += piece_span(index, self.size, self.piece_size)[1]
        now = time.monotonic()
        if self._marked_since_save >= SAVE_EVERY_BYTES or now - self._saved_at >= SAVE_EVERY_SECONDS:
            self._marked_since_save = 0
            self._saved_at = now
            self._save_due = True  # saved by the writer or write_piece, in a worker thread (it fsyncs)
        if sha256 is not None:
            for cb in self._listeners:
                cb(index, sha256)

    async def _advance_whole_hash(self) -> None:
        """Feed the whole-blob hash from disk up to the end of the contiguous marked pieces (a marked piece's
        bytes never change again); nothing while a solo stream feeds it from memory (a background advance kicked
        before that stream began must not hash the same bytes)."""
        async with self._whole_lock:
            if self._streaming:
                return
            end = self._pieces_end
            if self._whole_pos < end and self.partial is not None:  # None: closed or discarded meanwhile
                start = self._whole_pos
                try:
                    await trio.to_thread.run_sync(self._hash_from_disk, start, end)
                except BaseException:
                    # The hash may hold part of the range: start it over (finish() rehashes from disk).
                    self._whole, self._whole_pos = hashlib.sha256(), 0
                    raise
                self._whole_pos = end

    async def _chained_digest(self) -> str | None:
        """The blob's SHA-256 (hex) from its piece hashes, when every piece but the last was checked from the
        chaining value of the piece before it as marked here (one chain from SHA-256's initial state): then one
        pass over the last piece's bytes on disk proves the whole digest (swarm/chain.py). None when that cannot
        be shown (pieces resumed from an earlier run, a stream that met a peer's different copy): finish() then
        hashes the whole blob from disk, as before."""
        partial = self._require_started()
        assert self.size is not None and self.piece_size is not None
        n = self.n_pieces
        hashes = partial.piece_hashes()
        for i in range(n - 1):
            if hashes[i] is None or self._links_from.get(i) != (hashes[i - 1] if i else b""):
                return None
        start, length = piece_span(n - 1, self.size, self.piece_size)
        before = hashes[n - 2] if n > 1 else None
        return (await trio.to_thread.run_sync(lambda: whole_digest(before, partial.read(start, length), start))).hex()

    def _hash_from_disk(self, start: int, end: int) -> None:
        # Worker thread: only this function touches self._whole while _whole_lock is held by its caller.
        buf = bytearray(REHASH_READ)
        view = memoryview(buf)
        pos = start
        while pos < end:
            n = os.preadv(self._fd, [view[: min(REHASH_READ, end - pos)]], pos)
            if n <= 0:
                raise FetchFailed(f"{self.digest}: partial file shorter than its marked pieces")
            self._whole.update(view[:n])
            pos += n

    async def _stream(self, chunks: AsyncIterator[bytes], offset: int, *, limit: int | None = None,
                      stop: Callable[[], bool] | None = None, detached: bool = False) -> BaseException | None:
        """Write and hash chunks from `offset` on (to `limit`, until `stop()`); returns the error that ended the
        body early, if any. `detached`: `offset` is past the contiguous prefix (see fetch_from_upstream)."""
        assert self.size is not None and self.piece_size is not None
        limit = self.size if limit is None else limit
        # Who hashes what: the writer thread pwrites, and computes piece hashes for a swarm. A solo stream (no
        # swarm: nobody else writes this blob) also feeds the whole-blob hash from memory, in the same thread
        # (one thread per stream: fewer GIL hand-offs, measured faster on 2 cores). With a swarm the whole-blob
        # hash is proved from the pieces' chain instead (_chained_digest), because peers write pieces too
        # and the hash must cover exactly the bytes that end up on disk.
        solo = self._solo() and not detached
        self._stream_hashes_pieces = not self._solo()
        if solo:
            async with self._whole_lock:
                if self._whole_pos < offset:
                    await trio.to_thread.run_sync(self._hash_from_disk, self._whole_pos, offset)
                    self._whole_pos = offset
            if self._whole_pos != offset:
                raise FetchFailed(f"{self.digest}: whole hash at {self._whole_pos}, stream at {offset}")
        if self._piece_pos != offset or (self._stream_hashes_pieces and self._chain is None):
            # Starting at a piece boundary (a resumed or swarm-filled prefix): the chain from the chaining value
            # there (_next_offset starts a swarm's stream only where it is known).
            if offset % self.piece_size:
                raise FetchFailed(f"{self.digest}: cannot resume mid-piece at {offset}")
            self._piece_index = offset // self.piece_size
            self._piece_pos = offset
            self._last_hasher = hashlib.sha256()
            self._chain = self._chain_start = None
            if self._stream_hashes_pieces:
                known, link = self._link_before(self._piece_index)
                if not known:
                    raise FetchFailed(f"{self.digest}: no chaining value at piece {self._piece_index}")
                self._chain, self._chain_start = ChainHasher(link, offset), link
        if not detached:
            self._stream_end = offset
        self._streaming = solo
        detach = getattr(chunks, "detach_socket", None)
        body = detach() if detach is not None and solo and stop is None else None
        if body is not None:
            try:
                return await self._pump(body, offset, limit, chunks.count_bytes)  # type: ignore[attr-defined]
            finally:
                self._streaming = False
        err: BaseException | None = None
        too_long = False
        stopping = False
        pos = offset
        try:
            async with trio.open_nursery() as nursery:
                writer = ThreadLane(self._write_batch, depth=LANE_DEPTH, max_batch=BATCH_CHUNKS)
                nursery.start_soon(writer.run)
                nursery.start_soon(self._after_writes, writer.results, nursery, detached)
                try:
                    try:
                        async for chunk in chunks:
                            if not chunk:
                                continue
                            if stop is not None and not stopping and stop():
                                stopping = True
                                limit = min(limit, -(-pos // self.piece_size) * self.piece_size)
                                if pos >= limit:
                                    break
                            if pos + len(chunk) > self.size:
                                too_long = True
                                chunk = chunk[: self.size - pos]
                            elif pos + len(chunk) > limit:
                                chunk = chunk[: limit - pos]
                            if chunk:
                                await writer.put((pos, chunk))
                                pos += len(chunk)
                            if too_long or pos >= limit:
                                break
                    except _TRANSIENT as e:
                        err = e  # the writer still finishes what arrived; the caller resumes from there
                finally:
                    writer.close()  # also when cancelled: the thread finishes what is queued and stops
        except BaseExceptionGroup as group:
            inner = _single(group)
            if inner is group:
                raise
            raise inner from None
        finally:
            self._streaming = False
        if too_long:
            # More bytes than the size upstream announced: these bytes cannot be the blob.
            self._too_long = True
        return err

    async def _pump(self, body: SocketBody, offset: int, limit: int, count: Callable[[int], None]
                    ) -> BaseException | None:
        """A solo stream's fast path (`pump.SocketPump`): an upstream body (TCP or TLS) from `offset` to `limit`,
        received and pwritten by one worker thread, fed to the whole-blob hash by another; the loop marks
        pieces, wakes clients and serves them. Returns like `_stream` (the error that ended the body early)."""

        def write(pos: int, view: memoryview) -> None:
            _pwrite_all(self._fd, view, pos)

        def digest(pos: int, view: memoryview) -> _Written:
            return self._write_batch([(pos, view)], write=False)

        pump = SocketPump(body, write=write, digest=digest, count=count, budget=self.fetcher.pump_buffers)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._after_writes, pump.results, nursery, False)
                try:
                    return await pump.run(offset, limit)
                except OSError as e:  # from write: a full or failing disk, not the upstream's fault
                    raise FetchFailed(f"cannot write {self.digest}: {e}") from e
        except BaseExceptionGroup as group:
            inner = _single(group)
            if inner is group:
                raise
            raise inner from None

    async def _after_writes(self, results: trio.MemoryReceiveChannel[_Written], nursery: trio.Nursery,
                            detached: bool) -> None:
        """On the loop, after each batch the writer thread wrote: mark pieces, wake clients, save now and then."""
        async with results:
            async for end, done, hashed, error in results:
                self._whole_pos += hashed
                if error is not None:  # a full or failing disk: not the upstream's fault, do not resume
                    raise FetchFailed(f"cannot write {self.digest}: {error}") from error
                if not detached:
                    self._stream_end = end
                for index, digest, link_from in done:
                    self._mark(index, digest, link_from)
                self._wake()
                if self._save_due:
                    nursery.start_soon(self._save_state)

    def _write_batch(self, batch: list[tuple[int, bytes | memoryview]], *, write: bool = True) -> _Written:
        # Writer thread: pwrite, piece hashes (chain links), and for a solo stream the whole-blob hash (see
        # _stream); the chain state, and then self._whole, are only touched here while streaming. write=False:
        # a solo stream's bytes are on disk already (_pump's receiver wrote them); hash and count pieces only.
        assert self.size is not None and self.piece_size is not None and self.partial is not None
        partial, solo = self.partial, self._streaming
        hashing = self._stream_hashes_pieces
        done: list[tuple[int, bytes | None, bytes | None]] = []
        last = self.n_pieces - 1
        end = self._stream_end
        hashed = 0
        try:
            for pos, chunk in batch:
                view = memoryview(chunk)
                if solo:
                    if write:
                        _pwrite_all(self._fd, view, pos)
                    self._whole.update(view)
                    hashed += len(view)
                while view:
                    start, length = piece_span(self._piece_index, self.size, self.piece_size)
                    take = view[: start + length - self._piece_pos]
                    if not solo:
                        # Peers write pieces too: never over a piece already held (its bytes may be hashed).
                        partial.write_unless_held(self._piece_index, self._piece_pos, take)
                    if hashing:
                        if self._piece_index == last:
                            self._last_hasher.update(take)
                        elif self._chain is not None:
                            self._chain.update(take)
                    self._piece_pos += len(take)
                    view = view[len(take):]
                    if self._piece_pos == start + length:
                        if not hashing or (self._chain is None and self._piece_index < last):
                            done.append((self._piece_index, None, None))
                        else:
                            link_from = self._chain_start or b""
                            if self._piece_index == last:
                                done.append((self._piece_index, self._last_hasher.digest(), link_from))
                            else:
                                assert self._chain is not None
                                self._chain_start = self._chain.link()
                                done.append((self._piece_index, self._chain_start, link_from))
                        self._piece_index += 1
                end = pos + len(chunk)
        except (OSError, ValueError) as e:  # a full or failing disk; a partial discarded under us
            return end, done, hashed, e  # the pieces in `done` are whole; the loop fails the download
        return end, done, hashed, None


class StoreCheck:
    """The one SHA-256 pass over a stored blob this process has not checked (one from an earlier run: bit rot, a
    file changed by hand). Its clients stream it meanwhile; the last byte of every response waits for the pass, as
    a cold blob's waits for its download's check, so a damaged blob never reaches a client whole."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.done = trio.Event()
        self.ok = False
        self.unreadable = False  # the pass could not read the file (not ok, and not shown damaged either)


class BlobHandle:
    """One client's view of a blob: its size, a file to sendfile from, and how far it may read."""

    def __init__(self, size: int, file: BinaryIO, download: Download | None = None,
                 check: StoreCheck | None = None) -> None:
        self.size = size
        self.file = file
        self._download = download
        self._check = check

    async def readable(self, offset: int, stop: int | None = None) -> int:
        """Wait until bytes [0, end) with end > offset (or end == size) may be sent; return end.

        `stop` is where the response's body ends (default: the blob's end). Its last byte waits for the
        whole-blob SHA-256: the blob's last piece only becomes readable after it matched, and a body that ends
        earlier (a Range) gets at most `stop - 1` bytes before it. Bytes a solo stream wrote are readable before
        anything could check them, so without this a Range of a cold blob made a complete 206 of bytes that
        could turn out wrong. Raises FetchFailed when the download failed (the response must then be aborted).
        """
        d = self._download
        if d is None:
            return await self._checked_end(offset, stop)
        end = await d.readable(offset)
        if stop is None:
            stop = self.size
        if end < stop or d.verified:
            return end
        if offset < stop - 1:
            return stop - 1
        return await d.readable(d.size - 1)  # returns once verified (or raises FetchFailed)

    async def _checked_end(self, offset: int, stop: int | None) -> int:
        """A stored blob: all of it once checked; until then all but the response's last byte."""
        c = self._check
        if c is None or c.ok:
            return self.size
        stop = self.size if stop is None else stop
        if offset < stop - 1:
            return stop - 1
        await c.done.wait()
        if not c.ok:
            raise FetchFailed(f"stored {c.digest} is damaged")
        return self.size


class Fetcher:
    """Hands out BlobHandles: from the store, or attached to the one Download of a digest."""

    def __init__(self, settings: Settings, store: BlobStore, upstream: Upstream, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        # the node's download limit, for its upstream downloads and (SwarmService) its peer reads (paced.py)
        self.down_share = DownloadShare(settings.download_limit, ahead=UPSTREAM_AHEAD)
        self.upstream = paced(upstream, self.down_share)
        self.metrics = metrics
        # What every upstream pump's buffers may hold at once (pump.py: Memory): many cold blobs at once stay small.
        self.pump_buffers = BufferBudget()
        self.swarm: BlobSwarm | None = None
        self._downloads: dict[str, Download] = {}
        # Digests whose last download from the swarm failed the whole-blob check: fetched from upstream next.
        self._distrust_swarm: set[str] = set()
        # Stored blobs this process hashed or committed (digest -> inode of the file it checked), and the passes
        # over those it has not checked yet (StoreCheck), one per digest.
        self._checked: dict[str, int] = {}
        self._checked_sweep_at = CHECKED_SWEEP_MIN
        self._checks: dict[str, StoreCheck] = {}
        self._check_slots = trio.CapacityLimiter(CHECK_PASSES)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery every download runs in; cancelling this cancels them all."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def downloads(self) -> dict[str, Download]:
        """The downloads in flight, by digest (for status pages and tests)."""
        return dict(self._downloads)

    @asynccontextmanager
    async def open_blob(self, repo: Repo, digest: str) -> AsyncIterator[BlobHandle]:
        """A handle over the blob; OciError (BLOB_UNKNOWN, UNAUTHORIZED, UNAVAILABLE...) before any byte."""
        parse_digest(digest)
        with ExitStack() as stack:
            stack.enter_context(self.store.pin(digest))
            f = self.store.open(digest)
            if f is not None:
                stack.callback(f.close)
                st = os.fstat(f.fileno())
                check = None if self._checked.get(digest) == st.st_ino else self._check_stored(digest, f)
                if check is not None and st.st_size == 0:
                    await check.done.wait()  # an empty body is complete with its headers (as below)
                if check is None or not check.done.is_set() or check.ok:
                    self.metrics.cache_hits.labels(kind="blob").inc()
                    yield BlobHandle(st.st_size, f, check=check)
                    return
                # Found damaged (and removed) before a byte went out: fetched again, as if it was never stored.
            download = self._join(repo, digest)
            # A blob already verified here (its commit still landing) is a hit: nothing more is fetched for it.
            counter = self.metrics.cache_hits if download.verified else self.metrics.cache_misses
            counter.labels(kind="blob").inc()
            size = await download.wait_size()
            if size == 0 and not download.verified:
                # An empty body is complete with its headers: nothing after them could abort it. So a blob the
                # upstream calls empty is handed out once its digest is checked (only one digest is empty).
                try:
                    await download.readable(0)
                except FetchFailed:
                    raise _client_error(download.error) from None
            reader = download.open_reader()
            stack.callback(reader.close)
            yield BlobHandle(size, reader, download)

    async def store_blob(self, repo: Repo, digest: str) -> int:
        """Get a blob into the store (preheat) and return its size once it is committed there.

        Clients may finish reading a blob a moment before its commit lands (see `Download.finish`); a caller that
        needs the blob on disk, not just its bytes, waits for the download to end. FetchFailed if it is not stored.
        """
        for attempt in range(2):
            async with self.open_blob(repo, digest) as handle:
                stored_unchecked = handle._check is not None
                try:
                    await handle.readable(max(0, handle.size - 1))  # the stored copy's check, if it has one
                except FetchFailed:
                    if attempt or not stored_unchecked:
                        raise
                    continue  # the stored copy was damaged and is gone: fetch it
                download = self._downloads.get(digest)
                if download is not None:
                    await download.done.wait()
            break
        size = self.store.stat(digest)
        if size is None:
            raise FetchFailed(f"{digest} could not be stored")
        return size

    async def stat_blob(self, repo: Repo, digest: str) -> int:
        """Size for HEAD: the store's, else an in-flight download's, else upstream's (a HEAD request)."""
        parse_digest(digest)
        size = self.store.stat(digest)
        if size is not None:
            return size
        download = self._downloads.get(digest)
        if download is not None and download.error is None:
            return await download.wait_size()
        try:
            return await self.upstream.head_blob(repo, digest)
        except UpstreamUnavailable as e:
            raise _client_error(e) from e

    async def verify_stored(self) -> dict[str, Any]:
        """Hash every stored blob this process has not hashed or committed (the admin's verify), CHECK_PASSES at
        a time; a damaged one is removed as on a first serve. Returns counts, the damaged digests, and those it
        could not read now (no permission, no descriptor left: kept, and reported)."""
        out: dict[str, Any] = {"checked": 0, "already": 0, "damaged": [], "unreadable": []}
        open_files = trio.CapacityLimiter(CHECK_PASSES)  # a descriptor per blob being checked, not per blob

        async def one(digest: str) -> None:
            async with open_files:
                try:
                    # Not store.open: a verify is no use of the blob, and must not reorder what LRU evicts next.
                    f = open(self.store.path(digest), "rb")
                except FileNotFoundError:
                    return  # evicted or deleted since the list was taken
                except OSError as e:  # one file this node cannot open must not end the whole scrub (review)
                    log.warning("verify: cannot open stored %s: %s", digest, e)
                    out["unreadable"].append(digest)
                    return
                with f:
                    if self._checked.get(digest) == os.fstat(f.fileno()).st_ino:
                        out["already"] += 1
                        return
                    try:
                        check = self._check_stored(digest, f)
                    except OciError:  # no descriptor for the pass's own file: logged there
                        out["unreadable"].append(digest)
                        return
                    await check.done.wait()
                if check.ok:
                    out["checked"] += 1
                else:
                    out["unreadable" if check.unreadable else "damaged"].append(digest)

        async with trio.open_nursery() as nursery:
            for digest in self.store.digests():
                nursery.start_soon(one, digest)
        out["damaged"].sort()
        out["unreadable"].sort()
        return out

    def checked(self, digest: str, inode: int) -> None:
        """The store's file `inode` of `digest` holds the right bytes: this process hashed or committed it.

        Entries of blobs the store no longer holds (evicted, deleted) are dropped once the record has doubled
        since the last sweep: a long-lived node that cycles through many blobs keeps one entry per blob it holds,
        not one per blob it ever held."""
        self._checked[digest] = inode
        if len(self._checked) >= self._checked_sweep_at:
            for d in [d for d in self._checked
                      if d not in self._downloads and self.store.stat(d, touch=False) is None]:
                del self._checked[d]
            self._checked_sweep_at = max(CHECKED_SWEEP_MIN, 2 * len(self._checked))

    def _check_stored(self, digest: str, f: BinaryIO) -> StoreCheck:
        """The pass over stored `digest` (the file `f` is open on), started if none runs."""
        check = self._checks.get(digest)
        if check is None:
            if self._nursery is None:
                raise OciError("UNAVAILABLE", "node is not running")
            try:
                # A file of its own: the pass outlives the request whose file it was found through (that file is
                # closed with its response). Opened before the check is registered: a failed open (no descriptor
                # left) must not leave a check that never ends, and every later request waiting on it (review).
                own = open(f"/proc/self/fd/{f.fileno()}", "rb")
            except OSError as e:
                log.warning("cannot check stored %s now: %s", digest, e)
                raise OciError("UNAVAILABLE", "the node cannot open the blob now; try again") from None
            check = self._checks[digest] = StoreCheck(digest)
            self._nursery.start_soon(self._run_check, check, own)
        return check

    async def _run_check(self, check: StoreCheck, f: BinaryIO) -> None:
        try:
            with f:
                inode = os.fstat(f.fileno()).st_ino
                async with self._check_slots:  # bounded memory: a buffer per pass (60 at once took 965 MB)
                    hasher, buf = hashlib.sha256(), memoryview(bytearray(CHECK_READ))
                    while await trio.to_thread.run_sync(_hash_some, f, hasher, buf):
                        pass  # a thread hop per CHECK_READ: node shutdown never waits for a whole blob's hash
            got = "sha256:" + hasher.hexdigest()
            check.ok = got == check.digest
            if check.ok:
                self.checked(check.digest, inode)
            else:
                self.metrics.digest_mismatches.labels(source="store").inc()
                removed = self.store.remove_damaged(check.digest, inode)
                log.error("stored %s is damaged (its bytes hash to %s)%s; its clients' responses are cut short, "
                          "the next request fetches it again", check.digest, got, ": removed" if removed else "")
        except OSError as e:  # an unreadable file is no blob to vouch for either
            check.unreadable = True
            log.error("cannot check stored %s: %s", check.digest, e)
        finally:
            del self._checks[check.digest]
            check.done.set()

    def _join(self, repo: Repo, digest: str) -> Download:
        # No await between the lookup and the insert: this is what makes downloads single-flight.
        download = self._downloads.get(digest)
        if download is not None:
            return download
        if self._nursery is None:
            raise OciError("UNAVAILABLE", "node is not running")
        download = Download(self, repo, digest, upstream_only=digest in self._distrust_swarm)
        self._downloads[digest] = download
        self._nursery.start_soon(self._run_download, download)
        return download

    async def _run_download(self, download: Download) -> None:
        self.metrics.downloads_in_flight.inc()
        try:
            with self.store.pin(download.digest):
                await download._run()
            self._distrust_swarm.discard(download.digest)
        except BlobDigestMismatch as e:
            log.error("%s: %s", download.digest, e)
            download._fail(e)
        except (OciError, UpstreamUnavailable, FetchFailed) as e:
            log.warning("download of %s failed: %s", download.digest, e)
            download._fail(e)
        except Exception as e:
            # Bad data from upstream or a bug must fail this download, never the node.
            log.exception("download of %s crashed", download.digest)
            download._fail(e)
        finally:
            if download._mismatch is not None and download.source() == "swarm":
                # The bytes came (at least partly) from peers: the next download of it trusts upstream only.
                # Checked here, not by exception type: the swarm's fill may have wrapped the mismatch.
                self._distrust_swarm.add(download.digest)
            download._fail(FetchFailed("download cancelled"))  # no-op unless it stopped unfinished
            download._close()
            if self._downloads.get(download.digest) is download:
                del self._downloads[download.digest]
            self.metrics.downloads_in_flight.dec()
            download.done.set()

