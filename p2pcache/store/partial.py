"""A blob download in progress on disk: a sparse data file plus a state file with the piece bitfield and hashes.

`<data>/partial/<hex>.data` is created at the blob's full size (sparse, `os.ftruncate`) so pieces can be written
in any order; `<hex>.state` (msgpack: digest, size, piece_size, bitfield, piece hashes) is replaced atomically
(temporary file + rename) by `save()`, so a restarted node resumes the download instead of starting over.

Concurrency: the data file is opened once (r+b) and kept open. Everything goes through `os.pwrite`/`os.pread` on
its descriptor, never seek+read/write, so the event loop, worker threads and `os.sendfile` users may read while
pieces are being written. Bitfield and hashes are guarded by a `threading.Lock` because `BlobStore.commit` may
run in a worker thread.

Never:
- writes outside [0, size) of the data file;
- claims a piece it was not told about (`mark` is the caller's statement that the piece is written, and, with a
  hash, that the piece matched it: its link in the blob's SHA-256 chain, see swarm/chain.py);
- deletes anything under `blobs/`: becoming a complete blob is `BlobStore.commit`'s job, after the whole-blob
  digest matched.

Durability: `save()` does not fsync the data file (that would make a frequent call slow). After a process crash
the page cache still holds every written byte, so the saved bitfield is right. After a power loss it may claim
pieces that never reached the disk; the whole-blob check at commit catches that (the download is discarded and
fetched again).

Pieces without a hash: a node that only mirrors (no swarm) has no use for per-piece hashes of bytes that came
from upstream in order (nothing checks them but the whole-blob digest, which covers every byte anyway), and
computing them doubled the hashing of a cold pull. Such pieces are marked with `None`. They resume like any
other (the whole-blob hash is rebuilt from disk and checked at commit); a node that shares them with peers calls
`fill_missing_hashes()` first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from p2pcache.swarm.chain import piece_hash
from p2pcache.swarm.metainfo import piece_count, piece_span, prev_link

STATE_VERSION = 2  # 2: piece hashes are chaining values (swarm/chain.py), not each piece's own SHA-256
HASH_LEN = 32  # SHA-256
# The bitfield and hash list live in memory and in every save(): a million pieces (1 TiB at 1 MiB pieces) is
# far beyond any image layer and still only ~40 MB of hashes.
MAX_PIECES = 1 << 20
_READ_CHUNK = 1 << 20  # hashing reads: large enough to amortise syscalls, small enough to keep RSS flat


class PartialStateError(ValueError):
    """A `.state` file that cannot be used (corrupt, another version, or for another blob layout)."""


class PartialBlob:
    """One download in progress. Created (or resumed) by `BlobStore.partial`, never directly by callers."""

    digest: str
    size: int
    piece_size: int
    n_pieces: int
    file: BinaryIO

    def __init__(
        self,
        directory: Path,
        digest: str,
        size: int,
        piece_size: int,
        *,
        resume: bool = True,
    ) -> None:
        """Open `<directory>/<hex>.data`/`.state`, resuming them when they describe the same layout.

        `digest` must already be validated by the caller (it becomes part of a path).
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"blob size must be a non-negative integer, got {size!r}")
        if not isinstance(piece_size, int) or isinstance(piece_size, bool) or piece_size <= 0:
            raise ValueError(f"piece size must be a positive integer, got {piece_size!r}")
        n_pieces = piece_count(size, piece_size)
        if n_pieces > MAX_PIECES:
            raise ValueError(f"{size} bytes in {piece_size}-byte pieces is {n_pieces} pieces (max {MAX_PIECES})")
        self.digest = digest
        self.hex = digest.split(":", 1)[1]
        self.size = size
        self.piece_size = piece_size
        self.n_pieces = n_pieces
        self.data_path = directory / f"{self.hex}.data"
        self.state_path = directory / f"{self.hex}.state"
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # write_unless_held / write_piece_once: check-and-write as one step
        self._bits = bytearray((self.n_pieces + 7) // 8)
        self._hashes: list[bytes | None] = [None] * self.n_pieces
        self._contig = 0  # leading pieces held; only ever grows, so it is advanced in mark()
        self.discarded = False
        self.committed = False
        self.resumed = False  # True when pieces were recovered from a previous run

        state = self._load_state() if resume else None
        if state is None:
            # Start over: a stale state must not survive next to fresh data.
            _unlink(self.state_path)
            self.file = open(self.data_path, "w+b")  # kept open for the download's lifetime
        else:
            self.file = open(self.data_path, "r+b")
            bits, hashes = state
            self._bits[:] = bits
            self._hashes = hashes
            self._advance_contig()
            self.resumed = any(self._bits)
        # Sparse preallocation: every offset of the blob is addressable from the start; no-op when resuming.
        try:
            os.ftruncate(self.file.fileno(), size)
        except OSError as e:
            # e.g. EFBIG for an absurd size announced by an upstream: a clear error, no file left behind.
            self.file.close()
            _unlink(self.data_path)
            _unlink(self.state_path)
            raise ValueError(f"cannot allocate a {size}-byte partial for {digest}: {e.strerror}") from e

    # --- state file -------------------------------------------------------------------------------------------

    def _load_state(self) -> tuple[bytes, list[bytes | None]] | None:
        """The saved bitfield and hashes, or None when there is nothing usable to resume."""
        try:
            raw = self.state_path.read_bytes()
            st = os.stat(self.data_path)
        except FileNotFoundError:
            return None
        try:
            doc: Any = msgpack.unpackb(raw, raw=False)
        except Exception:  # msgpack raises several types on garbage; a corrupt state just means start over
            return None
        try:
            if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION:
                raise PartialStateError("unknown state format")
            if doc.get("digest") != self.digest:
                raise PartialStateError("state is for another digest")
            if doc.get("size") != self.size or doc.get("piece_size") != self.piece_size:
                return None  # another layout: the caller asked for a fresh start
            bits = doc.get("bitfield")
            hashes = doc.get("hashes")
            if not isinstance(bits, bytes) or len(bits) != len(self._bits):
                raise PartialStateError("bad bitfield")
            if not isinstance(hashes, list) or len(hashes) != self.n_pieces:
                raise PartialStateError("bad piece hashes")
            for h in hashes:
                if h is not None and not (isinstance(h, bytes) and len(h) == HASH_LEN):
                    raise PartialStateError("bad piece hash")
            if st.st_size != self.size:
                raise PartialStateError("data file has the wrong size")
        except (PartialStateError, ValueError, TypeError):
            # A corrupt or foreign state is not worth a crash: the download simply starts over.
            return None
        bits = bytearray(bits)
        # Bits past n_pieces must be zero so bitfield() is canonical.
        for i in range(self.n_pieces, len(bits) * 8):
            bits[i >> 3] &= ~(0x80 >> (i & 7))
        return bytes(bits), list(hashes)

    def save(self) -> None:
        """Persist bitfield and hashes atomically (temporary file + fsync + rename). Cheap: call it every few pieces."""
        with self._lock:
            if self.discarded or self.committed:
                return
            doc = {
                "v": STATE_VERSION,
                "digest": self.digest,
                "size": self.size,
                "piece_size": self.piece_size,
                "bitfield": bytes(self._bits),
                "hashes": list(self._hashes),
            }
            tmp = self.state_path.with_name(self.state_path.name + ".tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(msgpack.packb(doc, use_bin_type=True))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.state_path)
            except BaseException:
                with contextlib.suppress(OSError):  # a full disk: leave no .tmp behind (the old state stands)
                    os.unlink(tmp)
                raise

    # --- data -------------------------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset` (positional, so concurrent readers are unaffected)."""
        if self.discarded or self.committed:
            raise ValueError(f"partial {self.digest} is {'discarded' if self.discarded else 'committed'}")
        n = len(data)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"write of {n} bytes at {offset} is outside the blob (size {self.size})")
        view = memoryview(data)
        fd = self.file.fileno()
        done = 0
        while done < n:  # pwrite may write less than asked (signals, quotas)
            done += os.pwrite(fd, view[done:], offset + done)

    def write_unless_held(self, index: int, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Write part of piece `index` at `offset` unless the piece is held already; whether it was written.

        With `write_piece_once` this keeps every held piece's bytes exactly those it was marked with: an
        upstream stream writing a piece in parts and a peer's copy of the same piece never mix.
        """
        self._check_index(index)
        start, length = piece_span(index, self.size, self.piece_size)
        if offset < start or offset + len(data) > start + length:
            raise ValueError(f"write at {offset} (+{len(data)}) is outside piece {index}")
        with self._write_lock:
            if _bit(self._bits, index):
                return False
            self.write(offset, data)
            return True

    def write_piece_once(self, index: int, data: bytes | bytearray | memoryview, piece_sha256: bytes | None) -> bool:
        """Write the whole piece `index` and mark it, in one step, unless it is held already; whether it was."""
        self._check_index(index)
        start, length = piece_span(index, self.size, self.piece_size)
        if len(data) != length:
            raise ValueError(f"piece {index} has {len(data)} bytes, expected {length}")
        with self._write_lock:
            if _bit(self._bits, index):
                return False
            self.write(start, data)
            self.mark(index, piece_sha256)
            return True

    def read(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes at `offset`, clamped to the blob's size."""
        if offset < 0 or n < 0:
            raise ValueError(f"bad read: offset {offset}, length {n}")
        n = max(0, min(n, self.size - offset))
        fd = self.file.fileno()
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = os.pread(fd, n - got, offset + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    # --- pieces -----------------------------------------------------------------------------------------------

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.n_pieces:
            raise IndexError(f"piece {index} out of range (blob has {self.n_pieces})")

    def have(self, index: int) -> bool:
        self._check_index(index)
        return _bit(self._bits, index)

    def mark(self, index: int, piece_sha256: bytes | None) -> None:
        """Record piece `index` as written, with its verified piece hash (32 raw bytes, swarm/chain.py), or None
        when nobody needs per-piece hashes (see the module docstring)."""
        self._check_index(index)
        if piece_sha256 is not None and (
                not isinstance(piece_sha256, bytes | bytearray) or len(piece_sha256) != HASH_LEN):
            raise ValueError("piece hash must be 32 raw bytes (SHA-256 digest) or None")
        with self._lock:
            if self.discarded:
                raise ValueError(f"partial {self.digest} is discarded")
            self._bits[index >> 3] |= 0x80 >> (index & 7)
            self._hashes[index] = None if piece_sha256 is None else bytes(piece_sha256)
            self._advance_contig()

    def _advance_contig(self) -> None:
        while self._contig < self.n_pieces and _bit(self._bits, self._contig):
            self._contig += 1

    def bitfield(self) -> bytes:
        """One bit per piece, piece 0 in the most significant bit of byte 0 (BitTorrent order)."""
        with self._lock:
            return bytes(self._bits)

    def piece_hashes(self) -> list[bytes | None]:
        with self._lock:
            return list(self._hashes)

    def held(self) -> int:
        """Number of pieces held."""
        with self._lock:
            return sum(bin(b).count("1") for b in self._bits)

    def complete(self) -> bool:
        return self.held() == self.n_pieces

    def contiguous_pieces(self) -> int:
        """Number of leading pieces held: bytes [0, piece_span(k)) are final once piece k-1 is."""
        return self._contig

    def contiguous_bytes(self) -> int:
        """Length of the held prefix in bytes."""
        k = self._contig
        if k == 0:
            return 0
        start, length = piece_span(k - 1, self.size, self.piece_size)
        return start + length

    def fill_missing_hashes(self) -> int:
        """Hash every held piece that was marked without a hash and whose chaining value before it is known
        (see swarm/chain.py: a piece's hash depends on every byte before it); returns how many. Slow: run in a
        thread. A held piece after a gap keeps None: peers cannot check it, so it is not offered to them."""
        with self._lock:
            hashes = list(self._hashes)
            held = [_bit(self._bits, i) for i in range(self.n_pieces)]
        filled = 0
        for i in range(self.n_pieces):
            if not held[i] or hashes[i] is not None:
                continue
            if i and i < self.n_pieces - 1 and hashes[i - 1] is None:
                continue
            start, length = piece_span(i, self.size, self.piece_size)
            hashes[i] = piece_hash(i, self.n_pieces, prev_link(hashes, i), self.read(start, length), start)
            with self._lock:
                if _bit(self._bits, i) and self._hashes[i] is None:
                    self._hashes[i] = hashes[i]
                    filled += 1
        return filled

    def sha256_hex(self) -> str:
        """SHA-256 of the whole data file, read with pread in 1 MiB chunks. CPU/disk heavy: run in a thread."""
        h = hashlib.sha256()
        fd = self.file.fileno()
        offset = 0
        while offset < self.size:
            chunk = os.pread(fd, min(_READ_CHUNK, self.size - offset), offset)
            if not chunk:
                break  # shorter than expected: the digest will not match
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()

    # --- end of life ------------------------------------------------------------------------------------------

    def discard(self) -> None:
        """Forget this download: remove its files. The descriptor stays open for readers still holding it (the
        inode lives on until `close()`); writes are refused from now on."""
        with self._lock:
            if self.committed:
                return
            self.discarded = True
        _unlink(self.data_path)
        _unlink(self.state_path)
        _unlink(self.state_path.with_name(self.state_path.name + ".tmp"))

    def close(self) -> None:
        """Close the data file. Only once nobody reads from `file` any more (a reused descriptor number would
        otherwise be read by them)."""
        self.file.close()

    def __repr__(self) -> str:
        return (f"PartialBlob({self.digest}, size={self.size}, piece_size={self.piece_size}, "
                f"held={self.held()}/{self.n_pieces})")


def _bit(bits: bytes | bytearray, i: int) -> bool:
    return bool(bits[i >> 3] & (0x80 >> (i & 7)))


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
