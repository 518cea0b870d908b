"""Manifests and tags: one HEAD per TTL, manifests by digest cached, stale answers only when upstream is down.

Real ManifestStore and TagCache on tmp_path; an in-process fake upstream that follows the Upstream contract and
counts every request, and a fake clock.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import trio

from p2pcache.config import Settings
from p2pcache.metrics import Metrics
from p2pcache.oci.errors import OciError, UpstreamUnavailable
from p2pcache.oci.reference import Repo
from p2pcache.oci.upstream import ManifestInfo
from p2pcache.store.blobs import BlobStore
from p2pcache.store.manifests import ManifestStore, TagCache, TagEntry
from p2pcache.tags import ManifestResolver, accept_key

REPO = Repo("docker.io", "library/alpine")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = [OCI_INDEX, DOCKER_V2]


def manifest(n: int) -> tuple[str, bytes]:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "n": n}).encode()
    return "sha256:" + hashlib.sha256(body).hexdigest(), body


class FakeUpstream:
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.bodies: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.error: BaseException | None = None
        self.delay = 0.0

    def publish(self, tag: str, n: int) -> str:
        digest, body = manifest(n)
        self.tags[tag] = digest
        self.bodies[digest] = body
        return digest

    async def _answer(self, method: str, ref: str) -> tuple[str, bytes]:
        self.calls.append((method, ref))
        await trio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        digest = ref if ref.startswith("sha256:") else self.tags.get(ref, "")
        if digest not in self.bodies:
            raise OciError("MANIFEST_UNKNOWN", "manifest unknown")
        return digest, self.bodies[digest]

    async def head_manifest(self, repo: Repo, ref: str, accept: list[str]) -> ManifestInfo:
        digest, body = await self._answer("HEAD", ref)
        return ManifestInfo(digest, OCI_INDEX, len(body))

    async def get_manifest(self, repo: Repo, ref: str, accept: list[str]) -> tuple[ManifestInfo, bytes]:
        digest, body = await self._answer("GET", ref)
        if accept and OCI_INDEX not in accept:
            # as docker-registry answers a client whose Accept names none of the manifest's types
            raise OciError("MANIFEST_UNKNOWN", "manifest unknown")
        return ManifestInfo(digest, OCI_INDEX, len(body)), body


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data=tmp_path, tag_ttl=30.0)


def make(settings: Settings, up: FakeUpstream, clock: Clock) -> ManifestResolver:
    store = BlobStore(settings.data)
    return ManifestResolver(settings, store, ManifestStore(settings.data, store), up,  # type: ignore[arg-type]
                            Metrics(), tags=TagCache(settings.data), clock=clock)


def stale_serves(r: ManifestResolver) -> float:
    return r.metrics.registry.get_sample_value("p2pcache_stale_tag_serves_total") or 0.0


def test_accept_key_is_the_set_of_media_types() -> None:
    assert accept_key([f"{DOCKER_V2}; q=0.9, {OCI_INDEX}", DOCKER_V2]) == f"{DOCKER_V2},{OCI_INDEX}"
    assert accept_key([OCI_INDEX, DOCKER_V2]) == accept_key([f"{DOCKER_V2},{OCI_INDEX}"])
    assert accept_key(["Application/JSON ;charset=utf-8", " , "]) == "application/json"
    assert accept_key([]) == ""


async def test_made_up_media_types_in_accept_make_no_new_tag_entries(settings: Settings) -> None:
    """A client sending a new made-up media type with each GET of one tag: one HEAD per TTL and one entry in
    all, and the made-up types still go upstream. Each was an entry of its own, an upstream HEAD, and a rewrite
    of the tag's whole file, which grew without bound (found in review: 4000 GETs, 1 MB, 112 ms a GET)."""
    up, clock = FakeUpstream(), Clock()
    up.publish("latest", 1)
    heads: list[list[str]] = []
    head = up.head_manifest

    async def recording_head(repo: Repo, ref: str, accept: list[str]) -> ManifestInfo:
        heads.append(list(accept))
        return await head(repo, ref, accept)

    up.head_manifest = recording_head  # type: ignore[method-assign]
    r = make(settings, up, clock)
    for i in range(200):
        await r.resolve(REPO, "latest", [*ACCEPT, f"application/x-junk-{i}"])
    assert [c for c in up.calls if c[0] == "HEAD"] == [("HEAD", "latest")]
    assert heads == [[*ACCEPT, "application/x-junk-0"]]
    assert list(r.tags.entries(REPO, "latest")) == [accept_key(ACCEPT)]
    assert sum(p.stat().st_size for p in (settings.data / "tags").iterdir()) < 1000
    assert accept_key(["application/x-junk, */*"]) == ""


async def test_a_manifest_by_digest_is_fetched_once_then_served_from_the_store(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    digest = up.publish("3.19", 1)
    r = make(settings, up, clock)
    info, body = await r.resolve(REPO, digest, ACCEPT)
    assert (info.digest, info.media_type, info.size) == (digest, OCI_INDEX, len(body))
    assert body == up.bodies[digest]
    again = await r.resolve(REPO, digest, ACCEPT)
    assert again == (info, body)
    assert up.calls == [("GET", digest)]


async def test_a_tag_is_checked_with_one_head_per_ttl(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    first = up.publish("latest", 1)
    r = make(settings, up, clock)
    assert (await r.resolve(REPO, "latest", ACCEPT))[0].digest == first
    assert up.calls == [("HEAD", "latest"), ("GET", first)]
    clock.now += 29
    assert (await r.resolve(REPO, "latest", ACCEPT))[0].digest == first
    assert len(up.calls) == 2, "within the TTL no upstream request at all"
    clock.now += 2
    assert (await r.resolve(REPO, "latest", ACCEPT))[0].digest == first
    assert up.calls[2:] == [("HEAD", "latest")], "a HEAD; the body is already in the store"
    second = up.publish("latest", 2)  # the tag moves
    clock.now += 31
    info, body = await r.resolve(REPO, "latest", ACCEPT)
    assert info.digest == second and body == up.bodies[second]
    assert up.calls[3:] == [("HEAD", "latest"), ("GET", second)]


async def test_the_tag_cache_is_keyed_by_the_accept_set(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    up.publish("latest", 1)
    r = make(settings, up, clock)
    await r.resolve(REPO, "latest", ACCEPT)
    await r.resolve(REPO, "latest", [DOCKER_V2])
    assert [c for c in up.calls if c[0] == "HEAD"] == [("HEAD", "latest")] * 2


async def test_upstream_down_serves_the_last_known_digest_and_counts_it(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    digest = up.publish("latest", 1)
    r = make(settings, up, clock)
    await r.resolve(REPO, "latest", ACCEPT)
    up.error = UpstreamUnavailable("connection refused")
    clock.now += 3600
    info, body = await r.resolve(REPO, "latest", ACCEPT)
    assert info.digest == digest and body == up.bodies[digest]
    assert stale_serves(r) == 1
    # Another Accept set never seen for this tag: the answer for any Accept set beats a 503.
    info, _ = await r.resolve(REPO, "latest", [DOCKER_V2])
    assert info.digest == digest
    assert stale_serves(r) == 2
    # Five clients at once share one lookup, and each got a stale answer: five counted (found in review: 1).
    up.delay = 0.01

    async def client() -> None:
        await r.resolve(REPO, "latest", ACCEPT)

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(client)
    assert stale_serves(r) == 7
    assert len([c for c in up.calls if c == ("HEAD", "latest")]) < 2 + 5  # they did share lookups
    up.delay = 0.0
    # A restarted node (new resolver, tag cache read back from disk) still answers.
    r2 = make(settings, up, clock)
    assert (await r2.resolve(REPO, "latest", ACCEPT))[0].digest == digest
    assert stale_serves(r2) == 1
    # Unknown tag, upstream down: nothing to serve.
    with pytest.raises(OciError) as e:
        await r.resolve(REPO, "never-seen", ACCEPT)
    assert e.value.code == "UNAVAILABLE" and e.value.status == 503
    with pytest.raises(OciError) as e:
        await r.resolve(REPO, manifest(99)[0], ACCEPT)
    assert e.value.code == "UNAVAILABLE"


async def test_an_upstream_404_is_a_404_not_a_stale_serve(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    up.publish("latest", 1)
    r = make(settings, up, clock)
    await r.resolve(REPO, "latest", ACCEPT)
    del up.tags["latest"]  # the tag was deleted upstream
    clock.now += 60
    with pytest.raises(OciError) as e:
        await r.resolve(REPO, "latest", ACCEPT)
    assert e.value.code == "MANIFEST_UNKNOWN" and e.value.status == 404
    assert stale_serves(r) == 0
    up.error = OciError("TOOMANYREQUESTS", headers={"Retry-After": "60"})
    with pytest.raises(OciError) as e:
        await r.resolve(REPO, "other", ACCEPT)
    assert e.value.code == "TOOMANYREQUESTS" and e.value.headers == {"Retry-After": "60"}


async def test_identical_concurrent_resolutions_are_coalesced(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    digest = up.publish("latest", 1)
    up.delay = 0.01
    r = make(settings, up, clock)
    results: list[str] = []

    async def client() -> None:
        results.append((await r.resolve(REPO, "latest", ACCEPT))[0].digest)

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(client)
    assert results == [digest] * 8
    assert up.calls == [("HEAD", "latest"), ("GET", digest)]


async def test_a_digest_asked_with_different_accept_sets_at_once_is_one_upstream_get(settings: Settings) -> None:
    """docker, containerd and skopeo send different Accept sets; a manifest by digest is the same bytes to all.
    Found in review against docker-registry: with a Docker-only client first, its Accept alone went upstream for
    everyone, and the OCI clients waiting on that GET got its 404 (4 rounds of 10); the node asks with every
    manifest type it knows (the digest fixes the bytes)."""
    up, clock = FakeUpstream(), Clock()
    digest = up.publish("latest", 1)
    up.delay = 0.01
    r = make(settings, up, clock)
    results: list[str] = []

    async def client(accept: list[str]) -> None:
        results.append((await r.resolve(REPO, digest, accept))[0].digest)

    async with trio.open_nursery() as n:
        n.start_soon(client, [DOCKER_V2])
        await trio.sleep(0.001)  # its GET is the one the others wait for
        for accept in (ACCEPT, ACCEPT[:1], list(reversed(ACCEPT))):
            n.start_soon(client, accept)
    assert results == [digest] * 4
    assert up.calls == [("GET", digest)]


async def test_a_client_that_gives_up_does_not_fail_the_others(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    digest = up.publish("latest", 1)
    up.delay = 0.05
    r = make(settings, up, clock)
    results: list[str] = []

    async def impatient() -> None:
        with trio.move_on_after(0.01):
            await r.resolve(REPO, "latest", ACCEPT)

    async def patient() -> None:
        await trio.sleep(0.001)
        results.append((await r.resolve(REPO, "latest", ACCEPT))[0].digest)

    async with trio.open_nursery() as n:
        n.start_soon(impatient)
        n.start_soon(patient)
    assert results == [digest]


async def test_bad_references_are_refused_before_any_upstream_request(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    r = make(settings, up, clock)
    with pytest.raises(OciError) as e:
        await r.resolve(REPO, "../../etc", ACCEPT)
    assert e.value.code == "NAME_INVALID"
    with pytest.raises(OciError) as e:
        await r.resolve(REPO, "sha256:ABC", ACCEPT)
    assert e.value.code == "DIGEST_INVALID"
    assert up.calls == []


async def test_an_outage_between_head_and_get_still_serves_the_last_known_digest(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    old = up.publish("latest", 1)
    r = make(settings, up, clock)
    await r.resolve(REPO, "latest", ACCEPT)
    up.publish("latest", 2)  # the tag moved, and the registry dies right after answering the HEAD

    real_get = up.get_manifest

    async def get_fails(repo: Repo, ref: str, accept: list[str]) -> tuple[ManifestInfo, bytes]:
        raise UpstreamUnavailable("connection reset")

    up.get_manifest = get_fails  # type: ignore[method-assign]
    clock.now += 60
    info, _ = await r.resolve(REPO, "latest", ACCEPT)
    assert info.digest == old and stale_serves(r) == 1
    up.get_manifest = real_get  # type: ignore[method-assign]
    assert (await r.resolve(REPO, "latest", ACCEPT))[0].digest != old


async def test_a_clock_that_went_back_does_not_stretch_the_ttl(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    up.publish("latest", 1)
    r = make(settings, up, clock)
    await r.resolve(REPO, "latest", ACCEPT)
    clock.now -= 3600
    await r.resolve(REPO, "latest", ACCEPT)
    assert [c for c in up.calls if c[0] == "HEAD"] == [("HEAD", "latest")] * 2


class FakePeers:
    def __init__(self, entry: TagEntry | None, manifest: tuple[str, bytes] | None, fail: bool = False) -> None:
        self.entry, self.manifest, self.fail = entry, manifest, fail

    async def peer_tag(self, repo: Repo, tag: str, key: str) -> TagEntry | None:
        if self.fail:
            raise ConnectionResetError("peer gone")
        return self.entry

    async def peer_manifest(self, digest: str) -> tuple[str, bytes] | None:
        return self.manifest


async def test_peers_answer_a_tag_when_upstream_is_down_and_their_bytes_are_checked(settings: Settings) -> None:
    up, clock = FakeUpstream(), Clock()
    up.error = UpstreamUnavailable("down")
    digest, body = manifest(7)
    entry = TagEntry(digest, OCI_INDEX, len(body), clock.now)
    r = make(settings, up, clock)

    r.peers = FakePeers(entry, (OCI_INDEX, body[:-1] + b" "))  # a peer that lies about the bytes
    with pytest.raises(OciError) as e:
        await r.resolve(REPO, "latest", ACCEPT)
    assert e.value.code == "UNAVAILABLE"
    assert r.manifests.get(digest) is None

    r.peers = FakePeers(entry, (OCI_INDEX, body), fail=True)  # a peer that dies while asked
    with pytest.raises(OciError) as e:
        await r.resolve(REPO, "latest", ACCEPT)
    assert e.value.code == "UNAVAILABLE"

    r.peers = FakePeers(entry, (OCI_INDEX, body))
    info, got = await r.resolve(REPO, "latest", ACCEPT)
    assert (info.digest, got) == (digest, body)
    assert stale_serves(r) == 1
    r.peers = None  # now known here: served from this node's cache
    assert (await r.resolve(REPO, "latest", ACCEPT))[0].digest == digest
