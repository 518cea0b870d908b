"""Manifest resolution: a tag to its digest (one cheap upstream HEAD per TTL), and manifests by digest.

What this module is for: answering `GET/HEAD /v2/<name>/manifests/<ref>`. A manifest by digest is content like a
blob: served from the `ManifestStore`, else fetched once from upstream (verified there) and stored. A tag is
re-checked against the upstream with a HEAD (Docker Hub does not count HEADs against its pull limit) at most every
`settings.tag_ttl` seconds per Accept set; the answer is remembered in the persisted `TagCache`, so when the upstream
cannot be reached the last known digest is served (stale, counted in `p2pcache_stale_tag_serves`), even after a
restart. With the swarm (issue 3) the node sets `resolver.peers` (`peer_tag(repo, tag, accept_key)` and
`peer_manifest(digest)`): when the upstream is unreachable and nothing is cached here, other nodes' answers are
used; their manifest bytes are checked against the digest here.

What it must never do:
- never serve a manifest body whose SHA-256 is not its digest (bodies come from the ManifestStore, which verified
  them, or from `Upstream.get_manifest` by digest, which verifies them);
- never turn an upstream answer into a stale serve: a 404 is MANIFEST_UNKNOWN, a 401/403/429 pass through; only
  an unreachable upstream (`UpstreamUnavailable`) falls back to the cache;
- never ask upstream twice for the same thing at once: identical resolutions in flight are coalesced
  (single-flight keyed by (repo, ref, accept_key)), and a caller that gives up does not fail the others.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from p2pcache.oci.errors import OciError, UpstreamUnavailable
from p2pcache.oci.reference import check_tag, is_digest, parse_digest
from p2pcache.oci.upstream import DEFAULT_MANIFEST_ACCEPT, ManifestInfo
from p2pcache.store.manifests import TagCache, TagEntry, check_media_type

if TYPE_CHECKING:
    from p2pcache.config import Settings
    from p2pcache.metrics import Metrics
    from p2pcache.oci.reference import Repo
    from p2pcache.oci.upstream import Upstream
    from p2pcache.store.blobs import BlobStore
    from p2pcache.store.manifests import ManifestStore

log = logging.getLogger(__name__)

T = TypeVar("T")


# The media types that can change which manifest a registry answers a tag with (OCI and Docker, the legacy
# schema 1 and the `application/json` old registries label it with). Only these make the tag cache's key: any
# other type in a client's Accept is still sent upstream but picks no manifest, and a client sending a new
# made-up type with each GET made a new cache entry, a new upstream HEAD and a rewrite of the tag's whole file
# each time (found in review: 4000 such GETs, a 1 MB file and 112 ms a request).
MANIFEST_MEDIA_TYPES = frozenset({
    *DEFAULT_MANIFEST_ACCEPT,
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
})


def accept_key(accept_values: Sequence[str]) -> str:
    """The tag cache's key for an Accept set: its manifest media types (`MANIFEST_MEDIA_TYPES`; others are
    dropped) without parameters, lower case, de-duplicated, sorted, joined with ",". Several header lines and one
    comma-joined line give the same key; at most 2^7 keys exist."""
    types: set[str] = set()
    for value in accept_values:
        if not isinstance(value, str):
            continue
        for item in value.split(","):
            media = item.split(";", 1)[0].strip().lower()
            if media in MANIFEST_MEDIA_TYPES:
                types.add(media)
    return ",".join(sorted(types))


class _Flight(Generic[T]):
    """One resolution in progress; the callers that arrive meanwhile wait for its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: T | None = None
        self.error: Exception | None = None
        self.abandoned = False  # the leader was cancelled: a waiter takes over


class ManifestResolver:
    """Resolves manifest references for the registry routes; see the module docstring.

    `tags` should be the node's one TagCache (the admin API forgets tags through it); `clock` is wall-clock time
    (TagEntry.checked_at survives restarts), injectable for tests.
    """

    def __init__(self, settings: Settings, store: BlobStore, manifests: ManifestStore, upstream: Upstream,
                 metrics: Metrics, *, tags: TagCache | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.manifests = manifests
        self.upstream = upstream
        self.metrics = metrics
        self.tags = tags if tags is not None else TagCache(settings.data)
        self._clock = clock
        # The swarm (issue 3), set by the node when it shares with peers: `peer_tag(repo, tag, accept_key)` and
        # `peer_manifest(digest)` answer from other nodes when the upstream is unreachable and we hold nothing.
        self.peers: Any = None
        self._flights: dict[tuple[str, str, str, str], _Flight[tuple[ManifestInfo, bytes]]] = {}

    async def resolve(self, repo: Repo, ref: str, accept: Sequence[str]) -> tuple[ManifestInfo, bytes]:
        """(what the manifest is, its bytes verbatim) for a tag or a digest; OciError for the client otherwise."""
        accept = list(accept)
        key = accept_key(accept)
        run: Callable[[], Awaitable[tuple[ManifestInfo, bytes]]]
        if is_digest(ref):
            run = functools.partial(self._by_digest, repo, parse_digest(ref), accept)
            # Its bytes are the digest's whatever the Accept set (a held one is served to any), so docker,
            # containerd and skopeo asking at once with their different Accept sets make one upstream GET.
            key = ""
        else:
            run = functools.partial(self._by_tag, repo, check_tag(ref), accept, key)
        info, body = await self._coalesced((repo.ns, repo.name, ref, key), run)
        if info.stale:
            # here, per request: counted inside the one lookup that callers asking at once share, 5 stale
            # answers counted 1 (found in review)
            self.metrics.stale_tag_serves.inc()
        return dataclasses.replace(info), body

    # ---- by digest ----

    async def _by_digest(self, repo: Repo, digest: str, accept: list[str]) -> tuple[ManifestInfo, bytes]:
        held = self.manifests.get(digest)
        if held is not None:
            self.metrics.cache_hits.labels(kind="manifest").inc()
            media_type, body = held
            return ManifestInfo(digest, media_type, len(body)), body
        self.metrics.cache_misses.labels(kind="manifest").inc()
        # Every type we know besides the caller's: the callers of all Accept sets share this one GET (see
        # `resolve`), and with the first one's set alone an OCI client waiting on a Docker-only client's GET got
        # that client's 404 (found in review). The digest fixes the bytes, so no upstream converts anything.
        accept = [*accept, *(t for t in DEFAULT_MANIFEST_ACCEPT if t not in accept)]
        try:
            info, body = await self.upstream.get_manifest(repo, digest, accept)
        except UpstreamUnavailable as e:
            from_peers = await self._from_peers(digest)
            if from_peers is not None:
                return from_peers
            raise OciError("UNAVAILABLE", "upstream registry unreachable and manifest not cached") from e
        self._keep(info, body)
        return info, body

    # ---- by tag ----

    async def _by_tag(self, repo: Repo, tag: str, accept: list[str], key: str) -> tuple[ManifestInfo, bytes]:
        now = self._clock()
        entry = self.tags.get(repo, tag, key)
        if entry is not None and 0 <= now - entry.checked_at < self.settings.tag_ttl:
            held = self.manifests.get(entry.digest)
            if held is not None:
                self.metrics.cache_hits.labels(kind="manifest").inc()
                return ManifestInfo(entry.digest, held[0], len(held[1])), held[1]
        try:
            # HEAD first: free on Docker Hub, and usually the digest is one we already hold.
            head = await self.upstream.head_manifest(repo, tag, accept)
            held = self.manifests.get(head.digest)
            if held is not None:
                self.metrics.cache_hits.labels(kind="manifest").inc()
                info, body = ManifestInfo(head.digest, held[0], len(held[1])), held[1]
            else:
                self.metrics.cache_misses.labels(kind="manifest").inc()
                info, body = await self.upstream.get_manifest(repo, head.digest, accept)
                self._keep(info, body)
        except UpstreamUnavailable as e:
            stale = self._stale(repo, tag, key, entry)
            if stale is None:
                stale = await self._tag_from_peers(repo, tag, key)
            if stale is None:
                raise OciError("UNAVAILABLE", "upstream registry unreachable and tag not cached") from e
            log.warning("upstream unreachable (%s); serving %s:%s from cache as %s", e, repo, tag, stale[0].digest)
            return stale
        self.tags.put(repo, tag, key, TagEntry(info.digest, info.media_type, info.size, self._clock()))
        return info, body

    def _stale(self, repo: Repo, tag: str, key: str, entry: TagEntry | None) -> tuple[ManifestInfo, bytes] | None:
        """The last known answer for this tag: same Accept set first, then any other, newest first."""
        candidates = [entry] if entry is not None else []
        others = [e for k, e in self.tags.entries(repo, tag).items() if k != key]
        candidates += sorted(others, key=lambda e: e.checked_at, reverse=True)
        for candidate in candidates:
            held = self.manifests.get(candidate.digest)
            if held is not None:
                return ManifestInfo(candidate.digest, held[0], len(held[1]), stale=True), held[1]
        return None

    # ---- helpers ----

    async def _tag_from_peers(self, repo: Repo, tag: str, key: str) -> tuple[ManifestInfo, bytes] | None:
        """What other nodes last resolved this tag to (upstream unreachable, nothing cached here), kept."""
        if self.peers is None:
            return None
        try:
            peer_entry = await self.peers.peer_tag(repo, tag, key)
        except Exception as e:  # a peer failing must not turn "unavailable" into a crash
            log.warning("asking peers for %s:%s failed: %s", repo, tag, e)
            return None
        if not isinstance(peer_entry, TagEntry):
            return None
        held = await self._from_peers(peer_entry.digest)
        if held is None:
            return None
        try:
            self.tags.put(repo, tag, key, TagEntry(held[0].digest, held[0].media_type, held[0].size,
                                                   peer_entry.checked_at))
        except (OSError, OciError) as e:
            log.warning("cannot remember %s:%s from peers: %s", repo, tag, e)
        return dataclasses.replace(held[0], stale=True), held[1]

    async def _from_peers(self, digest: str) -> tuple[ManifestInfo, bytes] | None:
        """A manifest by digest from another node, checked here against the digest (peers are not trusted)."""
        if self.peers is None:
            return None
        try:
            got = await self.peers.peer_manifest(digest)
        except Exception as e:
            log.warning("asking peers for manifest %s failed: %s", digest, e)
            return None
        if got is None:
            return None
        media_type, body = got
        try:
            check_media_type(media_type)
        except OciError:
            return None
        if not isinstance(body, bytes) or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            log.warning("a peer sent a manifest that is not %s; ignored", digest)
            return None
        info = ManifestInfo(digest, media_type, len(body))
        self._keep(info, body)
        return info, body

    def _keep(self, info: ManifestInfo, body: bytes) -> None:
        """Store a manifest fetched from upstream; a store that cannot take it must not fail the request."""
        try:
            self.manifests.put(info.digest, info.media_type, body)
        except OSError as e:
            log.warning("cannot store manifest %s: %s", info.digest, e)

    async def _coalesced(self, key: tuple[str, str, str, str],
                         run: Callable[[], Awaitable[tuple[ManifestInfo, bytes]]]) -> tuple[ManifestInfo, bytes]:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.abandoned:
                continue  # its leader was cancelled (client gone): try again, maybe as the leader
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.result = await run()
            return flight.result
        except Exception as e:
            flight.error = e
            raise
        except BaseException:
            flight.abandoned = True
            raise
        finally:
            del self._flights[key]
            flight.done.set()
