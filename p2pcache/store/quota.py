"""The disk quota's bookkeeping: which complete blobs the store holds, how big, in what LRU order, which are pinned.

Pure in-memory state with no I/O and no lock: `BlobStore` owns one `LruIndex`, guards it with its lock, and does
the unlinking itself. Keeping the policy here means the eviction order can be tested without a disk.

Rules:
- Only complete blobs are indexed here. The store adds the room it reserves for downloads in progress (never
  evicted) to what it asks of `victims`.
- A pinned blob is never chosen as a victim, whatever the pressure.
- When the quota cannot be met (everything left is pinned), `victims` returns what it can and the caller carries on:
  we prefer serving a blob over the quota to refusing a pull.
"""

from __future__ import annotations

from collections import OrderedDict


class LruIndex:
    """Sizes of complete blobs by hex digest, least recently used first, plus pin refcounts."""

    def __init__(self) -> None:
        # Insertion order is the LRU order: the first key is the least recently used.
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._pins: dict[str, int] = {}
        self.used = 0

    def __contains__(self, hex_: str) -> bool:
        return hex_ in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def size(self, hex_: str) -> int | None:
        return self._sizes.get(hex_)

    def add(self, hex_: str, size: int) -> None:
        """Record a complete blob as the most recently used (no-op on the count if already known)."""
        old = self._sizes.pop(hex_, None)
        if old is not None:
            self.used -= old
        self._sizes[hex_] = size
        self.used += size

    def remove(self, hex_: str) -> int | None:
        size = self._sizes.pop(hex_, None)
        if size is not None:
            self.used -= size
        return size

    def touch(self, hex_: str) -> None:
        if hex_ in self._sizes:
            self._sizes.move_to_end(hex_)

    def pin(self, hex_: str) -> None:
        self._pins[hex_] = self._pins.get(hex_, 0) + 1

    def unpin(self, hex_: str) -> None:
        n = self._pins.get(hex_, 0) - 1
        if n > 0:
            self._pins[hex_] = n
        else:
            self._pins.pop(hex_, None)

    def pinned(self, hex_: str) -> bool:
        return hex_ in self._pins

    def lru_order(self) -> list[str]:
        return list(self._sizes)

    def newest(self) -> str | None:
        """The most recently used blob, if any."""
        return next(reversed(self._sizes), None)

    def victims(self, nbytes: int, max_bytes: int, exclude: str | None = None, before_pinned: bool = False
                ) -> list[str]:
        """Least recently used unpinned blobs whose removal makes `used + nbytes <= max_bytes`, as far as possible.

        `before_pinned`: only blobs used less recently than every pinned one. For catching up with a quota that
        pins held over, not for making room: the excess is the pinned blob's, and it goes (as the least recently
        used) when its pin does. Without this, a blob fetched while an older one was being served was evicted
        the moment its own download ended, and fetched again at the next pull (found in review).
        Does not remove them: the caller unlinks each file, then calls `remove`.
        """
        excess = self.used + nbytes - max_bytes
        out: list[str] = []
        if excess <= 0:
            return out
        for hex_, size in self._sizes.items():
            if hex_ in self._pins and before_pinned:
                break
            if hex_ in self._pins or hex_ == exclude:
                continue
            out.append(hex_)
            excess -= size
            if excess <= 0:
                break
        return out
