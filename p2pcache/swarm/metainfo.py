"""Piece layout of a blob: how big its pieces are and which bytes each covers.

Every node must cut a given blob the same way, so the piece size is a pure function of the blob size (or an
explicit override agreed through the metainfo the fetching node publishes). Never reads files or sockets.
"""

from __future__ import annotations

MIN_PIECE = 1 << 20  # 1 MiB: below this, per-piece overhead (a request, a hash, a frame) dominates
MAX_PIECE = 16 << 20  # 16 MiB: above this, a slow peer holds a large share of the blob hostage
TARGET_PIECES = 64  # enough pieces that N peers can each hold different ones early in a rollout


def piece_size_for(size: int) -> int:
    """A power of two between 1 and 16 MiB giving about TARGET_PIECES pieces."""
    piece = MIN_PIECE
    while piece < MAX_PIECE and size > piece * TARGET_PIECES:
        piece <<= 1
    return piece


def piece_count(size: int, piece_size: int) -> int:
    """Number of pieces; an empty blob has one empty piece so it still has a hash to check."""
    return max(1, -(-size // piece_size))


def piece_span(index: int, size: int, piece_size: int) -> tuple[int, int]:
    """(offset, length) of piece `index`."""
    start = index * piece_size
    return start, max(0, min(piece_size, size - start))
