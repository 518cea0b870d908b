"""The piece hash chain (swarm/chain.py), checked against a SHA-256 written out here from FIPS 180-4."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from p2pcache.store.blobs import BlobStore
from p2pcache.swarm.chain import ChainHasher, piece_hash, whole_digest
from p2pcache.swarm.metainfo import checkable, piece_count, prev_link

_K = [int(x, 16) for x in """
428a2f98 71374491 b5c0fbcf e9b5dba5 3956c25b 59f111f1 923f82a4 ab1c5ed5 d807aa98 12835b01 243185be 550c7dc3
72be5d74 80deb1fe 9bdc06a7 c19bf174 e49b69c1 efbe4786 0fc19dc6 240ca1cc 2de92c6f 4a7484aa 5cb0a9dc 76f988da
983e5152 a831c66d b00327c8 bf597fc7 c6e00bf3 d5a79147 06ca6351 14292967 27b70a85 2e1b2138 4d2c6dfc 53380d13
650a7354 766a0abb 81c2c92e 92722c85 a2bfe8a1 a81a664b c24b8b70 c76c51a3 d192e819 d6990624 f40e3585 106aa070
19a4c116 1e376c08 2748774c 34b0bcb5 391c0cb3 4ed8aa4a 5b9cca4f 682e6ff3 748f82ee 78a5636f 84c87814 8cc70208
90befffa a4506ceb bef9a3f7 c67178f2""".split()]
_IV = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]
_M = 0xFFFFFFFF


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & _M


def reference_link(data: bytes) -> bytes:
    """The SHA-256 state after `data` (a whole number of 64-byte blocks), before any padding."""
    assert len(data) % 64 == 0
    h = list(_IV)
    for off in range(0, len(data), 64):
        w = list(struct.unpack(">16I", data[off:off + 64]))
        for t in range(16, 64):
            s0 = _rotr(w[t - 15], 7) ^ _rotr(w[t - 15], 18) ^ (w[t - 15] >> 3)
            s1 = _rotr(w[t - 2], 17) ^ _rotr(w[t - 2], 19) ^ (w[t - 2] >> 10)
            w.append((w[t - 16] + s0 + w[t - 7] + s1) & _M)
        a, b, c, d, e, f, g, hh = h
        for t in range(64):
            t1 = (hh + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + ((e & f) ^ (~e & g)) + _K[t] + w[t]) & _M
            t2 = ((_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) & _M
            a, b, c, d, e, f, g, hh = (t1 + t2) & _M, a, b, c, (d + t1) & _M, e, f, g
        h = [(x + y) & _M for x, y in zip(h, (a, b, c, d, e, f, g, hh), strict=True)]
    return struct.pack(">8I", *h)


def chain(data: bytes, piece: int) -> list[bytes | None]:
    n = piece_count(len(data), piece)
    out: list[bytes | None] = []
    for i in range(n):
        out.append(piece_hash(i, n, prev_link(out, i), data[i * piece:(i + 1) * piece], i * piece))
    return out


def test_the_reference_is_sha256() -> None:
    # padding done by hand for a one-block message: the reference's state is then the digest
    msg = b"abc"
    padded = msg + b"\x80" + b"\0" * (55 - len(msg)) + struct.pack(">Q", len(msg) * 8)
    assert reference_link(padded) == hashlib.sha256(msg).digest()


@pytest.mark.parametrize("size,piece", [(4096, 1024), (5000, 1024), (1024, 1024), (100, 1024), (3 * 512 + 1, 512)])
def test_links_are_sha256_states_at_piece_boundaries_and_the_last_is_that_piece_alone(size: int, piece: int) -> None:
    data = os.urandom(size)
    hashes = chain(data, piece)
    n = len(hashes)
    for i in range(n - 1):
        assert hashes[i] == reference_link(data[:(i + 1) * piece])
    assert hashes[n - 1] == hashlib.sha256(data[(n - 1) * piece:]).digest()
    assert whole_digest(prev_link(hashes, n - 1), data[(n - 1) * piece:], (n - 1) * piece) == \
        hashlib.sha256(data).digest()


def test_pieces_check_in_any_order_and_a_flipped_byte_fails_only_its_piece() -> None:
    piece = 64 << 10
    data = bytearray(os.urandom(9 * piece + 123))
    hashes = chain(bytes(data), piece)
    n = len(hashes)
    for i in reversed(range(n)):
        view = memoryview(data)[i * piece:(i + 1) * piece]  # writable views, as peers' payloads are
        assert piece_hash(i, n, prev_link(hashes, i), view, i * piece) == hashes[i]
    data[4 * piece + 17] ^= 1
    bad = [i for i in range(n) if piece_hash(i, n, prev_link(hashes, i), bytes(data[i * piece:(i + 1) * piece]),
                                             i * piece) != hashes[i]]
    assert bad == [4]


def test_a_chain_over_other_bytes_cannot_end_in_the_real_digest() -> None:
    piece = 4096
    good = os.urandom(6 * piece)
    lie = bytearray(good)
    lie[piece + 5] ^= 0x40
    lying = chain(bytes(lie), piece)  # every lying piece checks against the lying list...
    n = len(lying)
    assert all(piece_hash(i, n, prev_link(lying, i), lie[i * piece:(i + 1) * piece], i * piece) == lying[i]
               for i in range(n))
    # ... but the chain it forms proves another digest
    assert whole_digest(lying[n - 2], lie[(n - 1) * piece:], (n - 1) * piece) != hashlib.sha256(good).digest()


def test_the_hasher_resumes_only_at_block_boundaries_and_digest_leaves_it_usable() -> None:
    with pytest.raises(ValueError):
        ChainHasher(b"\0" * 32, 100)
    with pytest.raises(ValueError):
        ChainHasher(None, 64)
    h = ChainHasher()
    h.update(b"x" * 100)
    with pytest.raises(ValueError):
        h.link()
    assert h.digest() == hashlib.sha256(b"x" * 100).digest()
    h.update(b"y" * 28)
    assert h.link() == reference_link(b"x" * 100 + b"y" * 28)
    assert h.digest() == hashlib.sha256(b"x" * 100 + b"y" * 28).digest()


def test_fill_missing_hashes_fills_only_pieces_whose_previous_link_is_known(tmp_path: Path) -> None:
    piece = 256
    data = os.urandom(8 * piece + 10)  # 9 pieces
    want = chain(data, piece)
    p = BlobStore(tmp_path).partial("sha256:" + hashlib.sha256(data).hexdigest(), len(data), piece)
    for i in (0, 1, 2, 4, 5, 8):  # 3 and 6-7 missing: 4 and 5 come after a gap; 8 is the last (its own hash)
        p.write(i * piece, data[i * piece:(i + 1) * piece])
        p.mark(i, None)
    assert p.fill_missing_hashes() == 4
    got = p.piece_hashes()
    assert got == [want[0], want[1], want[2], None, None, None, None, None, want[8]]
    assert [checkable(got, i) for i in range(9)] == [True, True, True, False, False, False, False, False, True]
