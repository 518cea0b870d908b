"""Client-side blob fetches that record exactly what a client would end up with."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import httpx


@dataclass
class Fetched:
    status: int | None
    nbytes: int
    sha256: str | None  # hex of what arrived, when the response ended cleanly
    declared: int | None  # Content-Length
    error: str | None  # the transport error that ended the body, if any
    ttfb: float | None = None  # seconds from the request to the first body byte

    @property
    def complete(self) -> bool:
        """The client got a whole response with no error: it would believe it has the blob."""
        return self.error is None and self.status == 200 and self.declared == self.nbytes

    def is_complete_wrong(self, digest: str) -> bool:
        return self.complete and "sha256:" + (self.sha256 or "") != digest


def fetch_blob(base_url: str, path: str, timeout: float = 60, headers: dict | None = None) -> Fetched:
    h = hashlib.sha256()
    n, status, declared = 0, None, None
    try:
        with httpx.Client(base_url=base_url, timeout=timeout) as c, c.stream("GET", path,
                                                                                headers=headers) as r:
            status = r.status_code
            declared = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
            for chunk in r.iter_raw(1 << 20):
                h.update(chunk)
                n += len(chunk)
    except httpx.HTTPError as e:
        return Fetched(status, n, None, declared, f"{type(e).__name__}: {e}")
    return Fetched(status, n, h.hexdigest(), declared, None)


async def afetch_blob(client: httpx.AsyncClient, path: str) -> Fetched:
    h = hashlib.sha256()
    n, status, declared, ttfb = 0, None, None, None
    t0 = time.monotonic()
    try:
        async with client.stream("GET", path) as r:
            status = r.status_code
            declared = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
            async for chunk in r.aiter_raw(1 << 20):
                if ttfb is None and chunk:
                    ttfb = time.monotonic() - t0
                h.update(chunk)
                n += len(chunk)
    except httpx.HTTPError as e:
        return Fetched(status, n, None, declared, f"{type(e).__name__}: {e}", ttfb)
    return Fetched(status, n, h.hexdigest(), declared, None, ttfb)
