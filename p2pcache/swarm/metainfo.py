"""Piece layout of a blob: how big its pieces are and which bytes each covers.

Every node must cut a given blob the same way, so the piece size is a pure function of the blob size (or an
explicit override agreed through the metainfo the fetching node publishes). Never reads files or sockets.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2pcache.swarm.chain import BLOCK

# 512 KiB: small layers still get pieces that pass on quickly. With 1 MiB, a 25 MB layer had 24 pieces and the
# swarm bench's 8 nodes at 10 MB/s (bench/swarm_bench.py --image-mb 100 --rate 10MB/s) finished at 1.34-1.35x
# the bound; with 512 KiB at 1.18-1.26x (256 KiB: 1.21x, for 40% more CPU per byte than 1 MiB), and the simulator
# agrees on the direction (simulations/bench-8x100.toml, seed 7: 1.38x -> 1.23x). Below this, per-piece overhead (a
# request, a hash, a HAVE to each peer, a thread hop) costs more CPU than the latency it saves.
MIN_PIECE = 512 << 10
MAX_PIECE = 16 << 20  # 16 MiB: above this, a slow peer holds a large share of the blob hostage
# The most pieces a blob's metainfo may have: their hashes (34 bytes each in msgpack) must fit one metainfo answer
# (wire.MAX_HEADER, 1 MiB). piece_size_for never comes near it (16 MiB pieces of a 256 GiB blob); a tracker
# refuses a layout with more (a peer that published 2^27 one-byte pieces made it allocate a gigabyte).
MAX_META_PIECES = 1 << 14
# About 256 pieces per blob (so 4 MiB for 1 GiB, 2 MiB for 500 MB). Chosen with the simulator (see
# simulations/README.md): when the registry and the nodes' links are equally fast (the hard case), the slowest
# of 100 nodes pulling 1 GB lands at 1.12x the Kumar-Ross bound with 2 MiB pieces, 1.17x with 4 MiB, 1.28x with
# 8 MiB and 1.45x with 16 MiB (2026-11-29; the scheduler was slower then, the order the same when this was
# chosen: 1.26, 1.39, 1.59, 1.89x): a node can only pass a piece on once it holds (and has verified) all of it, so
# big pieces make every hop of the epidemic slow. 256 keeps per-piece costs (a request, a HAVE to each peer, a
# hash in the metainfo) negligible while staying near the bound.
TARGET_PIECES = 256


def piece_size_for(size: int, override: int | None = None) -> int:
    """A power of two between 512 KiB and 16 MiB giving about TARGET_PIECES pieces (at most TARGET_PIECES
    until the 16 MiB cap; a 10 GiB layer gets 640 pieces of 16 MiB); or `override` (--piece-size), doubled
    until the blob has at most MAX_META_PIECES pieces (a tracker refuses more)."""
    if override:
        piece = override
        while piece_count(size, piece) > MAX_META_PIECES:
            piece <<= 1
        return piece
    piece = MIN_PIECE
    while piece < MAX_PIECE and size > piece * TARGET_PIECES:
        piece <<= 1
    return piece


def valid_layout(size: object, piece_size: object) -> bool:
    """A layout some node could have made: pieces of at most MAX_PIECE ending on SHA-256 blocks (they are links
    of one hash chain, swarm/chain.py), at most MAX_META_PIECES of them. A peer's or publisher's other layout is
    refused where it arrives: one that is off the 64-byte block failed every download of the blob."""
    return (type(size) is int and type(piece_size) is int and size >= 0 and 0 < piece_size <= MAX_PIECE
            and piece_size % BLOCK == 0 and piece_count(size, piece_size) <= MAX_META_PIECES)


def piece_count(size: int, piece_size: int) -> int:
    """Number of pieces; an empty blob has one empty piece so it still has a hash to check."""
    return max(1, -(-size // piece_size))


def piece_span(index: int, size: int, piece_size: int) -> tuple[int, int]:
    """(offset, length) of piece `index`."""
    start = index * piece_size
    return start, max(0, min(piece_size, size - start))


def checkable(hashes: Sequence[bytes | None], index: int) -> bool:
    """Whether piece `index` can be checked: its own hash and, but for the first and the last piece, the one before
    (piece hashes are links of a SHA-256 chain, see swarm/chain.py)."""
    return hashes[index] is not None and (index == 0 or index == len(hashes) - 1 or hashes[index - 1] is not None)


def prev_link(hashes: Sequence[bytes | None], index: int) -> bytes | None:
    """The chaining value piece `index` resumes from (None for the first piece: SHA-256's initial state)."""
    return hashes[index - 1] if index else None
