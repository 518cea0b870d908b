"""Manifests keep their media type; the tag cache survives a restart so tags resolve while the upstream is down."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from p2pcache.oci.errors import OciError
from p2pcache.oci.reference import Repo
from p2pcache.store.blobs import BlobStore, DigestMismatch
from p2pcache.store.manifests import ManifestStore, TagCache, TagEntry

INDEX = "application/vnd.oci.image.index.v1+json"
BODY = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()
ALPINE = Repo("docker.io", "library/alpine")


def test_manifest_round_trip(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    ms = ManifestStore(tmp_path, blobs)
    assert ms.get(DIGEST) is None
    ms.put(DIGEST, INDEX, BODY)
    assert ms.get(DIGEST) == (INDEX, BODY)
    # A restarted node still has it.
    assert ManifestStore(tmp_path, BlobStore(tmp_path)).get(DIGEST) == (INDEX, BODY)


def test_manifest_digest_mismatch_stores_nothing(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    ms = ManifestStore(tmp_path, blobs)
    with pytest.raises(DigestMismatch):
        ms.put(DIGEST, INDEX, BODY + b" ")
    assert ms.get(DIGEST) is None
    assert list((tmp_path / "manifests").iterdir()) == []
    assert blobs.used_bytes() == 0


@pytest.mark.parametrize("bad", ["", "text/plain\r\nX-Evil: 1", "a" * 300, "caf\u00e9/x"])
def test_unsafe_media_type_refused(tmp_path: Path, bad: str) -> None:
    ms = ManifestStore(tmp_path, BlobStore(tmp_path))
    with pytest.raises(OciError):
        ms.put(DIGEST, bad, BODY)
    assert ms.get(DIGEST) is None


def test_missing_sidecar_or_body_means_absent(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    ms = ManifestStore(tmp_path, blobs)
    ms.put(DIGEST, INDEX, BODY)
    (tmp_path / "manifests" / f"{DIGEST[7:]}.type").unlink()
    assert ms.get(DIGEST) is None
    ms.put(DIGEST, INDEX, BODY)  # the blob is already there; the sidecar comes back
    assert ms.get(DIGEST) == (INDEX, BODY)
    assert blobs.delete(DIGEST)  # deleting the blob removes its sidecar too
    assert ms.get(DIGEST) is None
    assert list((tmp_path / "manifests").iterdir()) == []


def test_manifest_bad_digest(tmp_path: Path) -> None:
    ms = ManifestStore(tmp_path, BlobStore(tmp_path))
    with pytest.raises(OciError):
        ms.get("sha256:../../x")


def entry(digest: str = DIGEST, at: float = 1000.0) -> TagEntry:
    return TagEntry(digest=digest, media_type=INDEX, size=len(BODY), checked_at=at)


def test_tag_cache_persists_across_instances(tmp_path: Path) -> None:
    tc = TagCache(tmp_path)
    assert tc.get(ALPINE, "3.19", INDEX) is None
    tc.put(ALPINE, "3.19", INDEX, entry())
    other = "sha256:" + "b" * 64
    tc.put(ALPINE, "3.19", "application/vnd.docker.distribution.manifest.v2+json", entry(other))
    tc2 = TagCache(tmp_path)  # a restarted node
    assert tc2.get(ALPINE, "3.19", INDEX) == entry()
    assert tc2.get(ALPINE, "3.19", "application/vnd.docker.distribution.manifest.v2+json") == entry(other)
    assert tc2.get(ALPINE, "3.20", INDEX) is None
    assert tc2.get(Repo("ghcr.io", "library/alpine"), "3.19", INDEX) is None
    # every Accept variant of a tag is listed (stale serves and admin rmi need all of them)
    assert tc2.entries(ALPINE, "3.19") == {
        INDEX: entry(), "application/vnd.docker.distribution.manifest.v2+json": entry(other)}
    assert tc2.entries(ALPINE, "3.20") == {}


def test_tag_files_are_named_by_hash_not_by_name(tmp_path: Path) -> None:
    tc = TagCache(tmp_path)
    tc.put(Repo("127.0.0.1:5000", "org/app"), "v1", INDEX, entry())
    names = [p.name for p in (tmp_path / "tags").iterdir()]
    assert len(names) == 1
    assert names[0] == hashlib.sha256(b"127.0.0.1:5000/org/app:v1").hexdigest() + ".json"


def test_returned_entries_are_copies(tmp_path: Path) -> None:
    tc = TagCache(tmp_path)
    tc.put(ALPINE, "latest", INDEX, entry())
    got = tc.get(ALPINE, "latest", INDEX)
    assert got is not None
    got.digest = "sha256:" + "0" * 64
    assert tc.get(ALPINE, "latest", INDEX) == entry()


def test_checked_at_refresh_is_kept_in_memory_without_rewriting(tmp_path: Path) -> None:
    tc = TagCache(tmp_path)
    tc.put(ALPINE, "latest", INDEX, entry(at=1000.0))
    tc.put(ALPINE, "latest", INDEX, entry(at=1030.0))
    got = tc.get(ALPINE, "latest", INDEX)
    assert got is not None and got.checked_at == 1030.0
    assert TagCache(tmp_path).get(ALPINE, "latest", INDEX) == entry(at=1000.0)
    # A new digest is written at once.
    new = "sha256:" + "c" * 64
    tc.put(ALPINE, "latest", INDEX, entry(new, at=1060.0))
    assert TagCache(tmp_path).get(ALPINE, "latest", INDEX) == entry(new, at=1060.0)


def test_a_tag_keeps_a_bounded_number_of_accept_variants(tmp_path: Path) -> None:
    """Beyond MAX_TAG_VARIANTS the variant checked longest ago is forgotten, in memory and on disk: a tag's
    entries (and the file rewritten whole when one changes) stay small whatever clients send."""
    from p2pcache.store.manifests import MAX_TAG_VARIANTS

    cache = TagCache(tmp_path)
    for i in range(MAX_TAG_VARIANTS + 10):
        cache.put(ALPINE, "1", f"key-{i}", TagEntry(DIGEST, INDEX, 10, 1000.0 + i))
    keys = set(cache.entries(ALPINE, "1"))
    assert keys == {f"key-{i}" for i in range(10, MAX_TAG_VARIANTS + 10)}
    assert set(TagCache(tmp_path).entries(ALPINE, "1")) == keys


def test_forget(tmp_path: Path) -> None:
    tc = TagCache(tmp_path)
    busybox = Repo("docker.io", "library/busybox")
    for tag in ("3.18", "3.19", "latest"):
        tc.put(ALPINE, tag, INDEX, entry())
    tc.put(busybox, "latest", INDEX, entry())
    assert tc.forget(ALPINE, "3.18") == 1
    assert tc.forget(ALPINE, "3.18") == 0
    assert tc.get(ALPINE, "3.18", INDEX) is None
    assert tc.forget(ALPINE) == 2
    tc2 = TagCache(tmp_path)
    assert tc2.get(ALPINE, "latest", INDEX) is None
    assert tc2.get(busybox, "latest", INDEX) == entry()
    assert len(list((tmp_path / "tags").iterdir())) == 1


def test_bad_entries_refused(tmp_path: Path) -> None:
    tc = TagCache(tmp_path)
    with pytest.raises(OciError):
        tc.put(ALPINE, "latest", INDEX, entry(digest="sha256:nope"))
    assert list((tmp_path / "tags").iterdir()) == []


def test_corrupt_and_leftover_tag_files_removed_at_startup(tmp_path: Path) -> None:
    tc = TagCache(tmp_path)
    tc.put(ALPINE, "latest", INDEX, entry())
    tags = tmp_path / "tags"
    good = json.loads(next(tags.glob("*.json")).read_text())
    (tags / ".tmp-x.json.123").write_text("{")
    (tags / ("a" * 64 + ".json")).write_text("{not json")
    good["tag"] = "renamed"  # content no longer matches its file name
    (tags / ("b" * 64 + ".json")).write_text(json.dumps(good))
    bad_entry = dict(good, tag="x")
    bad_entry["entries"] = {INDEX: {"digest": "sha256:../../etc", "media_type": INDEX, "size": 1, "checked_at": 1}}
    (tags / TagCache._file_name("docker.io", "library/alpine", "x")).write_text(json.dumps(bad_entry))
    tc2 = TagCache(tmp_path)
    assert tc2.get(ALPINE, "latest", INDEX) == entry()
    assert tc2.get(ALPINE, "x", INDEX) is None
    assert len(list(tags.iterdir())) == 1
