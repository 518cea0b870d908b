"""A download in progress knows which pieces it holds, survives a restart, and never writes outside the blob."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgpack
import pytest

from p2pcache.store.blobs import BlobStore
from p2pcache.store.partial import PartialBlob


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


DATA = bytes(range(256)) * 10  # 2560 bytes: 10 pieces of 256
PIECE = 256


def write_piece(p: PartialBlob, i: int, data: bytes = DATA) -> None:
    chunk = data[i * PIECE:(i + 1) * PIECE]
    p.write(i * PIECE, chunk)
    p.mark(i, hashlib.sha256(chunk).digest())


def test_new_partial_is_sparse_and_empty(tmp_path: Path) -> None:
    p = BlobStore(tmp_path).partial(digest_of(DATA), len(DATA), PIECE)
    assert p.n_pieces == 10
    assert os.fstat(p.file.fileno()).st_size == len(DATA)
    assert p.bitfield() == b"\0\0"
    assert p.contiguous_pieces() == 0 and p.contiguous_bytes() == 0
    assert p.piece_hashes() == [None] * 10
    assert not p.resumed


def test_bitfield_and_contiguous_pieces(tmp_path: Path) -> None:
    p = BlobStore(tmp_path).partial(digest_of(DATA), len(DATA), PIECE)
    for i in (1, 3, 9):
        write_piece(p, i)
    assert [p.have(i) for i in range(10)] == [i in (1, 3, 9) for i in range(10)]
    assert p.bitfield() == bytes([0b0101_0000, 0b0100_0000])  # piece 0 is the high bit of byte 0
    assert p.contiguous_pieces() == 0
    write_piece(p, 0)
    assert p.contiguous_pieces() == 2
    write_piece(p, 2)
    assert p.contiguous_pieces() == 4
    assert p.contiguous_bytes() == 4 * PIECE
    assert p.read(0, 4 * PIECE) == DATA[:4 * PIECE]
    assert p.piece_hashes()[3] == hashlib.sha256(DATA[3 * PIECE:4 * PIECE]).digest()
    assert p.held() == 5 and not p.complete()


def test_last_piece_is_short(tmp_path: Path) -> None:
    data = DATA[:1000]  # 3 full pieces + 232 bytes
    p = BlobStore(tmp_path).partial(digest_of(data), len(data), PIECE)
    assert p.n_pieces == 4
    for i in range(4):
        write_piece(p, i, data)
    assert p.contiguous_bytes() == 1000
    assert p.complete()


def test_empty_blob_has_one_empty_piece_and_commits(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    p = store.partial(digest_of(b""), 0, PIECE)
    assert p.n_pieces == 1
    p.mark(0, hashlib.sha256(b"").digest())
    store.commit(p)
    assert store.stat(digest_of(b"")) == 0


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    p = store.partial(digest_of(DATA), len(DATA), PIECE)
    with pytest.raises(ValueError, match="outside"):
        p.write(len(DATA) - 1, b"ab")
    with pytest.raises(ValueError, match="outside"):
        p.write(-1, b"a")
    with pytest.raises(IndexError):
        p.mark(10, b"\0" * 32)
    with pytest.raises(IndexError):
        p.have(-1)
    with pytest.raises(ValueError, match="32"):
        p.mark(0, b"short")
    with pytest.raises(ValueError):
        p.read(-5, 1)
    assert len(p.read(len(DATA) - 3, 100)) == 3  # clamped to the blob's end
    with pytest.raises(ValueError, match="pieces"):
        store.partial(digest_of(b"huge"), 1 << 50, 1 << 20)  # a lying size must not exhaust memory
    with pytest.raises(ValueError, match="cannot allocate"):
        store.partial(digest_of(b"huge"), (1 << 63) - 1, 1 << 44)  # beyond any filesystem's file size
    assert sorted(q.name for q in (tmp_path / "partial").iterdir()) == [p.data_path.name]
    for bad_size, bad_piece in ((-1, PIECE), (10, 0), (10, -4)):
        with pytest.raises(ValueError):
            store.partial(digest_of(b"x"), bad_size, bad_piece)


def test_resume_across_a_new_store(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    p = store.partial(digest_of(DATA), len(DATA), PIECE)
    for i in (0, 1, 2, 5):
        write_piece(p, i)
    p.save()
    write_piece(p, 6)  # not saved: lost on "restart", and that is fine
    p.close()

    store2 = BlobStore(tmp_path)  # a restarted node
    q = store2.partial(digest_of(DATA), len(DATA), PIECE)
    assert q.resumed
    assert [q.have(i) for i in range(10)] == [i in (0, 1, 2, 5) for i in range(10)]
    assert q.contiguous_pieces() == 3
    assert q.read(5 * PIECE, PIECE) == DATA[5 * PIECE:6 * PIECE]
    for i in range(10):
        if not q.have(i):
            write_piece(q, i)
    store2.commit(q)
    assert store2.read_bytes(digest_of(DATA)) == DATA


def test_same_store_returns_the_live_partial(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    p = store.partial(digest_of(DATA), len(DATA), PIECE)
    assert store.partial(digest_of(DATA), len(DATA), PIECE) is p


def test_closed_partial_is_reopened_from_saved_state(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    p = store.partial(digest_of(DATA), len(DATA), PIECE)
    write_piece(p, 0)
    p.save()
    p.close()  # a download that failed and let go of its file
    q = store.partial(digest_of(DATA), len(DATA), PIECE)
    assert q is not p and q.resumed and q.have(0)
    assert q.read(0, 4) == DATA[:4]


def test_other_layout_starts_over(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    p = store.partial(digest_of(DATA), len(DATA), PIECE)
    write_piece(p, 0)
    p.save()
    q = BlobStore(tmp_path).partial(digest_of(DATA), len(DATA), 512)
    assert not q.resumed and q.contiguous_pieces() == 0 and q.n_pieces == 5
    # And within one store, another layout replaces the live one.
    r = store.partial(digest_of(DATA), len(DATA), 1024)
    assert p.discarded and r.n_pieces == 3


@pytest.mark.parametrize(
    "state",
    [
        b"not msgpack at all \xc1\xc1",
        msgpack.packb({"v": 99}),
        msgpack.packb([1, 2, 3]),
        "bitfield-too-short",
        "hash-wrong-length",
    ],
)
def test_corrupt_state_starts_over(tmp_path: Path, state: bytes | str) -> None:
    store = BlobStore(tmp_path)
    p = store.partial(digest_of(DATA), len(DATA), PIECE)
    write_piece(p, 0)
    p.save()
    if isinstance(state, str):
        doc = msgpack.unpackb(p.state_path.read_bytes())
        if state == "bitfield-too-short":
            doc["bitfield"] = b"\xff"
        else:
            doc["hashes"][0] = b"\x01\x02"
        state = msgpack.packb(doc, use_bin_type=True)
    p.state_path.write_bytes(state)
    q = BlobStore(tmp_path).partial(digest_of(DATA), len(DATA), PIECE)
    assert not q.resumed and q.bitfield() == b"\0\0"


def test_discard_removes_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    p = store.partial(digest_of(DATA), len(DATA), PIECE)
    write_piece(p, 0)
    p.save()
    p.discard()
    assert list((tmp_path / "partial").iterdir()) == []
    assert p.read(0, 4) == DATA[:4]  # readers holding the descriptor are not cut off
    with pytest.raises(ValueError):
        write_piece(p, 1)
    p.save()  # no-op, recreates nothing
    assert list((tmp_path / "partial").iterdir()) == []


def test_a_save_that_fails_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    """A full disk during save(): the error goes to the caller, the old state stands, no .state.tmp is left."""
    p = BlobStore(tmp_path).partial(digest_of(DATA), len(DATA), PIECE)
    p.save()
    before = p.state_path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    write_piece(p, 0)
    with pytest.raises(OSError):
        p.save()
    monkeypatch.undo()
    assert sorted(f.name for f in p.state_path.parent.iterdir()) == sorted([p.data_path.name, p.state_path.name])
    assert p.state_path.read_bytes() == before
    p.close()
