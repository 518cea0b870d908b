"""The node's `--download-limit` applied to its upstream blob downloads, with or without the swarm.

Why: the limit is the node's (README: "bytes/s for this node"), but only the swarm's upstream stream and peer
reads were paced; a plain mirror, and a download the node fetched from upstream on its own beside the swarm,
pulled at full speed with no word (found in review: 40 MB in 1.2 s under `--download-limit 5MB/s`). Every
upstream blob body now passes through `PacedUpstream`, which counts each chunk against the node's one
`DownloadShare` (`swarm/ratelimit.py`; the swarm's peer reads count against the same one), in the upstream
stream's class: assured half of the limit, ahead of peer reads, and whatever the peer reads leave.

A paced body is read chunk by chunk on the event loop, not through `pump.py`'s threads: a node held to a
limit has no use for a gigabyte a second.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from p2pcache.swarm.ratelimit import DownloadShare

if TYPE_CHECKING:
    from p2pcache.oci.reference import Repo

__all__ = ["PacedUpstream", "UPSTREAM_AHEAD", "paced", "take_upstream"]

UPSTREAM_AHEAD = 1.0  # seconds of download-limit debt the upstream stream may run ahead of peer reads (in its half)


async def take_upstream(share: DownloadShare, n: int) -> None:
    """Wait until `n` upstream bytes may count against the download limit, then count them."""
    while True:
        taken, delay = share.upstream(n, trio.current_time())
        if taken:
            break
        await trio.sleep(delay)
    if delay > 0:
        await trio.sleep(delay)


def paced(upstream: Any, share: DownloadShare) -> Any:
    """`upstream` with its blob bodies paced by `share`, or itself when there is no limit (the fetcher's and the
    swarm's stream ask here, so both take the same decision)."""
    return upstream if math.isinf(share.total.rate) else PacedUpstream(upstream, share)


class PacedUpstream:
    """An Upstream's blob side (`head_blob`, `open_blob`) whose bodies are paced by `share`."""

    def __init__(self, upstream: Any, share: DownloadShare) -> None:
        self.upstream = upstream
        self.share = share

    async def head_blob(self, repo: Repo, digest: str) -> int:
        return await self.upstream.head_blob(repo, digest)

    @asynccontextmanager
    async def open_blob(self, repo: Repo, digest: str, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[_PacedBody]:
        ranged = {} if end is None else {"end": end}  # as fetch.py asks: an Upstream may take no `end`
        async with self.upstream.open_blob(repo, digest, offset, **ranged) as resp:
            yield _PacedBody(resp, self.share)


class _PacedBody:
    def __init__(self, resp: Any, share: DownloadShare) -> None:
        self.size = resp.size
        self.offset = resp.offset
        self._chunks = resp.__aiter__()
        self._share = share

    def __aiter__(self) -> _PacedBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.__anext__()
        await take_upstream(self._share, len(chunk))
        return chunk
