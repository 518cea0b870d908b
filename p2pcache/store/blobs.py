"""The content-addressed blob store on disk: complete verified blobs, downloads in progress, pins and the LRU quota.

Layout under the data root:

    blobs/sha256/<ab>/<hex>        complete blobs whose SHA-256 is <hex> (manifests too: they are blobs)
    partial/<hex>.data, .state     downloads in progress (see partial.py)
    tmp/                           small writes (put_bytes) before their rename; emptied at startup

Rules (what this module must never do):
- Never hold a complete blob whose digest is wrong, nor a half-written file under `blobs/`: bytes reach
  `blobs/` only by `rename` of a fully written, fsynced file whose SHA-256 matched, on the same filesystem.
- Never build a path from an unvalidated digest: every public method first checks `sha256:<64 lowercase hex>`
  and raises `OciError("DIGEST_INVALID")` otherwise, so nothing can escape the store directory.
- Never evict a pinned blob or a partial download being written (a blob found damaged goes, pinned or not:
  `remove_damaged`; its readers keep their open files).

Partials untouched for a week (PARTIAL_MAX_AGE) are removed at start-up: abandoned downloads.

Quota: `max_bytes` counts complete blobs (sizes tracked in memory, computed once at startup by walking
`blobs/`), the disk held by idle partial downloads (a failed one, one a restart left to resume; the first to
be removed when room is needed), plus the full size of every download in progress, which is reserved when it
starts: two 2 GiB pulls started at once on a store 1 GiB under its quota evict 3 GiB of old blobs between
them, not nothing each. LRU order is by last access (open, stat for serving), initialised from file mtimes at
startup; `open` also bumps the mtime (at most once a minute per blob) so the order survives a restart.
`make_room(n)` (called before a download starts) removes idle partials, then evicts least-recently-used unpinned
blobs, until `used + idle + reserved + n <= max_bytes`; for an `n` above `max_bytes` it does nothing. When that is
impossible (too much pinned) it evicts what it can and returns: the download proceeds anyway, because serving a
pull over the quota is better than refusing it. `over_quota()` tells whether that happened. `commit` and
`put_bytes` apply the quota too.

Threads: every method is synchronous and fast except `commit(partial, None)`, which rehashes the whole file;
callers run that one with `trio.to_thread.run_sync`. Because commit may run in a worker thread while the event
loop uses the other methods, the in-memory index is guarded by a `threading.Lock`. One `BlobStore` per data
root per process (a second one would see the first one's files in tmp/ as crash leftovers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from p2pcache.metrics import Metrics
from p2pcache.oci.errors import OciError
from p2pcache.store.partial import PartialBlob
from p2pcache.store.quota import LruIndex

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_PARTIAL_RE = re.compile(r"([0-9a-f]{64})\.(data|state)")
# A download nobody resumed for this long is abandoned (the client gave up, the image was deleted upstream): its
# partial files are removed at start-up, so they cannot hold disk for ever outside the quota (which counts only
# complete blobs). A week keeps any download interrupted by a restart, a reboot or an outage resumable.
PARTIAL_MAX_AGE = 7 * 86400.0
MTIME_TOUCH_INTERVAL = 60.0  # seconds; bumping mtime on every open would be a syscall per request for nothing


class DigestMismatch(Exception):
    """The bytes' SHA-256 is not the digest they were stored under; nothing was stored."""

    def __init__(self, digest: str, actual_hex: str) -> None:
        super().__init__(f"content of {digest} hashes to sha256:{actual_hex}")
        self.digest = digest
        self.actual = f"sha256:{actual_hex}"


def digest_hex(digest: str) -> str:
    """The hex part of a valid `sha256:<64 lowercase hex>` digest, else OciError("DIGEST_INVALID")."""
    m = _DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        shown = repr(digest)[:80]
        raise OciError("DIGEST_INVALID", f"invalid digest {shown}")
    return m.group(1)


class BlobStore:
    """Complete blobs by digest, partial downloads, pins and the LRU disk quota under one data root."""

    def __init__(self, root: Path, max_bytes: int | None = None, metrics: Metrics | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.partial_dir = self.root / "partial"
        self.tmp_dir = self.root / "tmp"
        self.manifests_dir = self.root / "manifests"  # sidecars removed with their blob; ManifestStore owns them
        for d in (self.blobs_dir, self.partial_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index = LruIndex()
        self._last_mtime_touch: dict[str, float] = {}
        # Downloads in progress, so two callers asking for one digest share one file. Weak: a partial its
        # Download dropped (closed after a failure) disappears by itself, and the next call resumes from disk.
        self._partials: weakref.WeakValueDictionary[str, PartialBlob] = weakref.WeakValueDictionary()
        self._clean_tmp()
        self._scan_blobs()
        self._clean_partials()
        self._publish()
        # A quota lowered since the last run, or blobs that pins held over it at the end: complete blobs go. Not
        # partials here: each is a download a restart left to resume, and make_room weighs them when it resumes.
        # Not the most recently used blob when it alone is bigger than the quota: it stays until something else
        # comes, as its commit and its pin's end decided (found in review: a plain restart deleted it).
        newest = self._index.newest()
        huge = newest is not None and max_bytes is not None and (self._index.size(newest) or 0) > max_bytes
        self._enforce(0, exclude=newest if huge else None, idle_partials=False)

    # --- startup ----------------------------------------------------------------------------------------------

    def _clean_tmp(self) -> None:
        """Anything in tmp/ is a write that a crash interrupted."""
        for p in self.tmp_dir.iterdir():
            _remove(p)

    def _clean_partials(self) -> None:
        """Drop temp state files, half pairs (a `.state` without `.data` or vice versa cannot be resumed) and
        partials untouched for PARTIAL_MAX_AGE.

        Runs after _scan_blobs so that partials of blobs already complete can be dropped too."""
        stale_before = time.time() - PARTIAL_MAX_AGE
        kinds: dict[str, set[str]] = {}
        for p in self.partial_dir.iterdir():
            m = _PARTIAL_RE.fullmatch(p.name)
            if m is None or not p.is_file():
                _remove(p)  # e.g. <hex>.state.tmp from a crash in save(), or junk
                continue
            kinds.setdefault(m.group(1), set()).add(m.group(2))
        for hex_, have in kinds.items():
            # A download that finished before the crash (already in blobs/) has nothing left to resume.
            if have != {"data", "state"} or hex_ in self._index or self._abandoned(hex_, stale_before):
                for kind in have:
                    _remove(self.partial_dir / f"{hex_}.{kind}")

    def _abandoned(self, hex_: str, stale_before: float) -> bool:
        try:
            last = max((self.partial_dir / f"{hex_}.{kind}").stat().st_mtime for kind in ("data", "state"))
        except OSError:
            return True
        if last < stale_before:
            log.info("store: removing the partial download of sha256:%s, untouched since %s", hex_,
                     time.strftime("%Y-%m-%d", time.localtime(last)))
            return True
        return False

    def _scan_blobs(self) -> None:
        """Index every complete blob, least recently modified first (that is the LRU order we restart with)."""
        found: list[tuple[float, str, int]] = []
        for sub in self.blobs_dir.iterdir():
            if not (len(sub.name) == 2 and sub.is_dir() and not sub.is_symlink()):
                _remove(sub)
                continue
            for p in sub.iterdir():
                # Only <ab>/<hex> with matching prefix is ours; anything else cannot have come from a commit.
                # A symlink would let the store serve a file from outside itself.
                if not (_HEX_RE.fullmatch(p.name) and p.name[:2] == sub.name and p.is_file()
                        and not p.is_symlink()):
                    log.warning("store: removing unexpected file %s", p)
                    _remove(p)
                    continue
                st = p.stat()
                found.append((st.st_mtime, p.name, st.st_size))
        found.sort()
        for _, hex_, size in found:
            self._index.add(hex_, size)

    # --- paths ------------------------------------------------------------------------------------------------

    def _blob_path(self, hex_: str) -> Path:
        return self.blobs_dir / hex_[:2] / hex_

    def path(self, digest: str) -> Path:
        """Where the complete blob `digest` lives (whether or not it is there)."""
        return self._blob_path(digest_hex(digest))

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.store_bytes.set(self._index.used)

    # --- complete blobs ---------------------------------------------------------------------------------------

    def stat(self, digest: str, *, touch: bool = True) -> int | None:
        """Size of the complete blob, None if absent. Counts as an access for LRU unless touch=False."""
        hex_ = digest_hex(digest)
        with self._lock:
            size = self._index.size(hex_)
            if size is not None and touch:
                self._index.touch(hex_)
        return size

    def open(self, digest: str) -> BinaryIO | None:
        """An open (rb) file of the complete blob, or None. The caller closes it. Counts as an access for LRU."""
        hex_ = digest_hex(digest)
        path = self._blob_path(hex_)
        try:
            f = open(path, "rb")  # returned to the caller
        except FileNotFoundError:
            # Removed behind our back (an operator, a full-disk cleanup): forget it instead of failing forever.
            # Checked again under the lock: a commit (a worker thread) may have renamed the blob into place and
            # indexed it since the open failed, and forgetting that entry left a file no quota counted.
            with self._lock:
                if not os.path.exists(path) and self._index.remove(hex_) is not None:
                    self._publish()
            return None
        with self._lock:
            self._index.touch(hex_)  # no-op if an eviction raced this open: the open file is still verified
            now = time.time()
            stale = now - self._last_mtime_touch.get(hex_, 0.0) > MTIME_TOUCH_INTERVAL
            if stale:
                self._last_mtime_touch[hex_] = now
        if stale:
            with contextlib.suppress(OSError):
                os.utime(f.fileno())
        return f

    def read_bytes(self, digest: str) -> bytes | None:
        """The whole content of a small complete blob (a manifest), or None."""
        f = self.open(digest)
        if f is None:
            return None
        with f:
            return f.read()

    def put_bytes(self, digest: str, data: bytes) -> None:
        """Store a small blob (a manifest) after checking sha256(data) == digest; DigestMismatch otherwise."""
        hex_ = digest_hex(digest)
        actual = hashlib.sha256(data).hexdigest()
        if actual != hex_:
            raise DigestMismatch(digest, actual)
        with self._lock:
            if hex_ in self._index and self._blob_path(hex_).exists():
                self._index.touch(hex_)
                return
        tmp = self.tmp_dir / f"{hex_}.{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._install(tmp, hex_, len(data))
        finally:
            _remove(tmp)

    def _install(self, src: Path, hex_: str, size: int) -> None:
        """Rename a verified, fsynced file into blobs/ and index it; then hold the quota."""
        final = self._blob_path(hex_)
        final.parent.mkdir(exist_ok=True)
        os.replace(src, final)  # same filesystem: atomic, and an existing copy has the same bytes anyway
        _fsync_dir(final.parent)
        with self._lock:
            self._index.add(hex_, size)
            self._last_mtime_touch[hex_] = time.time()
            self._publish()  # without a quota _enforce publishes nothing: the gauge stayed 0 (found in review)
        self._enforce(0, exclude=hex_)

    def delete(self, digest: str) -> bool:
        """Remove a complete blob. False if it is pinned (being served or downloaded) or absent."""
        hex_ = digest_hex(digest)
        with self._lock:
            if self._index.pinned(hex_):
                return False
            known = self._index.remove(hex_) is not None
            existed = self._unlink_blob(hex_)
            self._publish()
        return known or existed

    def remove_damaged(self, digest: str, inode: int) -> bool:
        """Remove a complete blob whose bytes were found not to match its digest, pinned or not (its readers keep
        their open files; their responses are cut short before the last byte). Only the file `inode` that was
        checked: never a good copy installed since. True if it was removed."""
        hex_ = digest_hex(digest)
        with self._lock:
            try:
                if os.stat(self._blob_path(hex_)).st_ino != inode:
                    return False
            except FileNotFoundError:
                return False
            self._index.remove(hex_)
            removed = self._unlink_blob(hex_)
            self._publish()
        return removed

    def _unlink_blob(self, hex_: str) -> bool:
        """Remove a blob file and its manifest sidecar (caller holds the lock)."""
        self._last_mtime_touch.pop(hex_, None)
        try:
            os.unlink(self._blob_path(hex_))
            existed = True
        except FileNotFoundError:
            existed = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.manifests_dir / f"{hex_}.type")
        return existed

    def digests(self) -> list[str]:
        """Digests of every complete blob, least recently used first (for admin status)."""
        with self._lock:
            return [f"sha256:{h}" for h in self._index.lru_order()]

    # --- pins and quota ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def pin(self, digest: str) -> Iterator[None]:
        """While held, `digest` is never evicted nor deleted (refcounted; the blob need not exist yet)."""
        hex_ = digest_hex(digest)
        with self._lock:
            self._index.pin(hex_)
        try:
            yield
        finally:
            with self._lock:
                self._index.unpin(hex_)
                limit = self.max_bytes
                over = limit is not None and self._index.used > limit
                huge = limit is not None and (self._index.size(hex_) or 0) > limit
            if over:
                # Pins held the store above its quota (blobs committed while served): a pin that goes brings it
                # back, in LRU order, or a store served only from cache stayed over for good (found in review:
                # 195 MiB under a 100 MiB quota, still after a restart). Not a blob bigger than the whole quota
                # that was just served (it stays, as its commit decided, until something else comes), never a
                # partial, and a failing unlink is logged, not raised out of the `with` that served the blob.
                try:
                    self._enforce(0, exclude=hex_ if huge else None, idle_partials=False, before_pinned=True)
                except OSError as e:
                    log.warning("store: evicting for the quota failed: %s", e)

    def pinned(self, digest: str) -> bool:
        hex_ = digest_hex(digest)
        with self._lock:
            return self._index.pinned(hex_)

    def used_bytes(self) -> int:
        """Total size of the complete blobs held (partials not included)."""
        with self._lock:
            return self._index.used

    def over_quota(self) -> bool:
        """True when the store holds more than max_bytes (only possible when what is left is pinned)."""
        with self._lock:
            return self.max_bytes is not None and self._index.used > self.max_bytes

    def make_room(self, nbytes: int, keep: str | None = None) -> None:
        """Make room for a download of `nbytes`: evict idle partial downloads (not `keep`'s, the digest about to
        resume its own), then least-recently-used unpinned blobs, until it fits or nothing evictable is left.

        Never fails: if pins keep the store above quota the caller proceeds anyway (see over_quota()). A download
        larger than the whole quota evicts nothing: it cannot fit whatever goes (an upstream that announced an
        absurd size emptied the cache before its first byte), and its commit applies the quota as usual.
        """
        keep_hex = digest_hex(keep) if keep is not None else None
        self._free_disk(max(0, nbytes), keep_hex)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            log.warning("store: a download of %d bytes is larger than the quota (%d): nothing evicted for it",
                        nbytes, self.max_bytes)
            return
        self._enforce(max(0, nbytes), exclude=None, keep=keep_hex)

    def _free_disk(self, nbytes: int, keep: str | None) -> None:
        """Remove idle partial downloads, oldest first, while the filesystem has less room than `nbytes` plus
        what the downloads in progress still have to write (their files are sparse), quota or not.

        Why: without --max-disk nothing else ever removed them, and a download that failed on a full disk left
        its partial holding that disk: every later pull failed until a restart (found in review). Complete blobs
        are not touched here; only the quota evicts those."""
        try:
            st = os.statvfs(self.partial_dir)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        with self._lock:
            live = [p for p in self._partials.values() if not (p.discarded or p.committed or p.file.closed)]
        need = nbytes
        for p in live:
            with contextlib.suppress(OSError, ValueError):
                need += max(0, p.size - os.fstat(p.file.fileno()).st_blocks * 512)
        if keep is not None:  # a resume writes only what its partial does not hold yet
            with contextlib.suppress(OSError):
                need -= min(nbytes, (self.partial_dir / f"{keep}.data").stat().st_blocks * 512)
        if free >= need:
            return
        with self._lock:
            idle = self._idle_partials(keep)
            while idle and free < need:
                _, hex_, n = idle.pop(0)
                log.warning("store: removing the idle partial download of sha256:%s (%d bytes): the disk has "
                            "%d bytes free, %d needed", hex_, n, free, need)
                for kind in ("data", "state"):
                    _remove(self.partial_dir / f"{hex_}.{kind}")
                free += n

    def reserved_bytes(self) -> int:
        """The sizes of the downloads in progress (live partials), which the quota holds room for."""
        with self._lock:
            return self._reserved()

    def _reserved(self) -> int:
        limit = self.max_bytes
        return sum(p.size for p in self._partials.values()
                   if not (p.discarded or p.committed or p.file.closed) and (limit is None or p.size <= limit))

    def _live(self, hex_: str) -> bool:
        p = self._partials.get(hex_)
        return p is not None and not (p.discarded or p.committed or p.file.closed)

    def _idle_partials(self, keep: str | None) -> list[tuple[float, str, int]]:
        """Partial downloads on disk that no download is writing (one failed, or a restart left it to resume):
        (mtime, hex, bytes on disk), oldest first. The quota counts them, and they are the first to go."""
        out = []
        for p in self.partial_dir.glob("*.data"):
            hex_ = p.name[: -len(".data")]
            if hex_ == keep or not _HEX_RE.fullmatch(hex_) or self._live(hex_):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((st.st_mtime, hex_, st.st_blocks * 512))
        out.sort()
        return out

    def _enforce(self, nbytes: int, exclude: str | None, keep: str | None = None, idle_partials: bool = True,
                 before_pinned: bool = False) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            need = nbytes + self._reserved()
            # Idle partials first: a download that failed on a full disk left one no quota counted, and every
            # later pull failed on the disk it held (found in review: a 20 MB tmpfs under a 15 MB quota).
            idle = self._idle_partials(keep) if idle_partials else []
            idle_bytes = sum(n for _, _, n in idle)
            while idle and self._index.used + idle_bytes + need > self.max_bytes:
                _, hex_, n = idle.pop(0)
                log.info("store: removing the idle partial download of sha256:%s (%d bytes) for quota", hex_, n)
                for kind in ("data", "state"):
                    _remove(self.partial_dir / f"{hex_}.{kind}")
                idle_bytes -= n
            victims = self._index.victims(need + idle_bytes, self.max_bytes, exclude, before_pinned)
            for hex_ in victims:
                # A reader with the file open keeps its inode; unlinking under it is safe.
                self._unlink_blob(hex_)
                self._index.remove(hex_)
                if self.metrics is not None:
                    self.metrics.evictions.inc()
            if victims:
                log.info("store: evicted %d blob(s) for quota, %d bytes used", len(victims), self._index.used)
            self._publish()

    # --- downloads --------------------------------------------------------------------------------------------

    def partial(self, digest: str, size: int, piece_size: int) -> PartialBlob:
        """The download in progress for `digest`: the live one, else resumed from disk, else a new one.

        One with another size or piece size is discarded and started over. A live one whose file was closed
        is not handed out again: it is reopened from its saved state instead.
        """
        hex_ = digest_hex(digest)
        with self._lock:
            live = self._partials.get(hex_)
            if live is not None and not (live.discarded or live.committed or live.file.closed):
                if live.size == size and live.piece_size == piece_size:
                    return live
                live.discard()
            p = PartialBlob(self.partial_dir, f"sha256:{hex_}", size, piece_size)
            self._partials[hex_] = p
            return p

    def commit(self, partial: PartialBlob, sha256_hex: str | None = None) -> None:
        """Move a finished download into blobs/ once its SHA-256 equals its digest.

        `sha256_hex` is the hash the caller computed over the bytes in order; when None the data file is
        rehashed here, which reads the whole blob: run that with `trio.to_thread.run_sync`. On a mismatch the
        partial is discarded and DigestMismatch raised; nothing reaches blobs/. The partial's `file` stays open
        and readable afterwards (rename keeps the inode), so readers mid-sendfile are unaffected.
        """
        hex_ = digest_hex(partial.digest)
        if partial.committed:
            return
        if partial.discarded:
            raise ValueError(f"partial {partial.digest} was discarded")
        if sha256_hex is None:
            actual = partial.sha256_hex()
        else:
            # Accept "sha256:<hex>" too: a caller passing the prefixed form must not lose a good download.
            actual = str(sha256_hex).lower().removeprefix("sha256:")
        if actual != hex_ or os.fstat(partial.file.fileno()).st_size != partial.size:
            partial.discard()
            self._forget_partial(partial)
            raise DigestMismatch(partial.digest, actual)
        os.fsync(partial.file.fileno())  # the bytes are durable before the name says "complete"
        partial.committed = True
        try:
            self._install(partial.data_path, hex_, partial.size)
        except BaseException:
            partial.committed = False
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial.state_path)
        partial.data_path = self._blob_path(hex_)
        self._forget_partial(partial)

    def _forget_partial(self, partial: PartialBlob) -> None:
        with self._lock:
            hex_ = partial.digest.split(":", 1)[1]
            if self._partials.get(hex_) is partial:
                del self._partials[hex_]


def _remove(path: Path) -> None:
    """Remove a file or a directory tree left by a crash; ignore what is already gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                _remove(child)
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("store: cannot remove %s: %s", path, e)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; not every filesystem allows opening a directory, so failures are ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
