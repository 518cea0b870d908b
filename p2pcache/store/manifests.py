"""Manifests on disk: bodies by digest (stored as blobs) with a media-type sidecar, and the persisted tag cache.

    <data>/manifests/<hex>.type    media type of the manifest blob <hex> (one line, ASCII)
    <data>/tags/<sha256>.json      one (repo, tag): {accept_key: {digest, media_type, size, checked_at}}

The tag cache is on disk so that a restarted node can still answer a tag while the upstream is down. Rules:
- Never builds a path from a repository name or a tag: tag files are named by the SHA-256 of "ns/name:tag".
- Every file is written to a temporary name in the same directory and renamed into place, so a crash leaves
  either the old or the new file; leftovers and unreadable files are removed at startup, never trusted.
- A media type is stored only if it is safe to send back as a Content-Type header (printable ASCII, no CR/LF).
- Never decides freshness: TTL and stale serving are tags.py's job; this module only remembers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pcache.oci.errors import OciError
from p2pcache.store.blobs import BlobStore, digest_hex

if TYPE_CHECKING:
    from p2pcache.oci.reference import Repo

log = logging.getLogger(__name__)

_MEDIA_TYPE_RE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")  # printable ASCII, header-safe, bounded
_TMP_PREFIX = ".tmp-"
# A tag's entry is rewritten on disk when its content changes, or when the persisted checked_at is older
# than this: re-resolving a tag every TTL must not mean a file write every TTL.
PERSIST_CHECKED_AT_EVERY = 600.0
# Accept variants kept per tag (docker, containerd, skopeo and podman send one each); beyond this the one
# checked longest ago is forgotten, so a tag's entries, and the file rewritten when one changes, stay small.
MAX_TAG_VARIANTS = 16


def check_media_type(media_type: str) -> str:
    if not isinstance(media_type, str) or _MEDIA_TYPE_RE.fullmatch(media_type) is None:
        raise OciError("MANIFEST_INVALID", f"unusable manifest media type {repr(media_type)[:80]}")
    return media_type


def _write_atomic(path: Path, data: bytes, *, sync: bool) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _clean_tmp(directory: Path) -> None:
    for p in directory.iterdir():
        if p.name.startswith(_TMP_PREFIX):
            with contextlib.suppress(OSError):
                p.unlink()


class ManifestStore:
    """Manifests by digest: the body is a blob of the BlobStore, the media type a sidecar file."""

    def __init__(self, root: Path, blobs: BlobStore) -> None:
        self.dir = Path(root) / "manifests"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.blobs = blobs
        _clean_tmp(self.dir)

    def get(self, digest: str) -> tuple[str, bytes] | None:
        """(media_type, body), or None when either the body or its media type is missing."""
        hex_ = digest_hex(digest)
        try:
            media_type = (self.dir / f"{hex_}.type").read_text("ascii").strip()
            check_media_type(media_type)
        except (FileNotFoundError, UnicodeDecodeError, OciError):
            return None  # without a trustworthy media type the manifest must be fetched again
        body = self.blobs.read_bytes(digest)
        if body is None:
            return None
        return media_type, body

    def digests(self) -> list[str]:
        """The digests of the manifests stored (those with a media type; get() may still find a body gone)."""
        return [f"sha256:{p.name[:-5]}" for p in self.dir.iterdir() if p.name.endswith(".type")]

    def put(self, digest: str, media_type: str, body: bytes) -> None:
        """Store a manifest; DigestMismatch (from the BlobStore) when sha256(body) != digest."""
        hex_ = digest_hex(digest)
        check_media_type(media_type)
        self.blobs.put_bytes(digest, body)  # verifies the digest before anything is written
        # The blob lands first: a crash in between leaves a blob without type, which get() treats as absent.
        _write_atomic(self.dir / f"{hex_}.type", media_type.encode("ascii"), sync=True)


@dataclass
class TagEntry:
    digest: str
    media_type: str
    size: int
    checked_at: float  # wall-clock time.time() of the last successful upstream check


def _entry_from(doc: Any) -> TagEntry:
    """A TagEntry from its JSON form; ValueError on anything unexpected."""
    if not isinstance(doc, dict):
        raise ValueError("entry is not an object")
    entry = TagEntry(
        digest=doc["digest"], media_type=doc["media_type"], size=doc["size"], checked_at=doc["checked_at"]
    )
    digest_hex(entry.digest)
    check_media_type(entry.media_type)
    if not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0:
        raise ValueError("bad size")
    if not isinstance(entry.checked_at, int | float) or isinstance(entry.checked_at, bool):
        raise ValueError("bad checked_at")
    entry.checked_at = float(entry.checked_at)
    return entry


class TagCache:
    """Last known (repo, tag, accept_key) -> TagEntry, in memory and under <root>/tags/."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "tags"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # (ns, name, tag) -> {accept_key: entry}; plus what is on disk, to skip needless rewrites.
        self._mem: dict[tuple[str, str, str], dict[str, TagEntry]] = {}
        self._disk: dict[tuple[str, str, str], dict[str, TagEntry]] = {}
        _clean_tmp(self.dir)
        self._load()

    @staticmethod
    def _file_name(ns: str, name: str, tag: str) -> str:
        return hashlib.sha256(f"{ns}/{name}:{tag}".encode()).hexdigest() + ".json"

    def _load(self) -> None:
        """Read every tag file once; tag files are tiny, and forget(repo) needs to know all tags of a repo."""
        for p in self.dir.iterdir():
            try:
                doc = json.loads(p.read_bytes())
                ns, name, tag = doc["ns"], doc["name"], doc["tag"]
                if not all(isinstance(x, str) for x in (ns, name, tag)):
                    raise ValueError("bad key")
                if p.name != self._file_name(ns, name, tag):
                    raise ValueError("file name does not match its content")
                entries = {str(k): _entry_from(v) for k, v in doc["entries"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError, OciError) as e:
                log.warning("tag cache: removing unreadable %s: %s", p.name, e)
                with contextlib.suppress(OSError):
                    p.unlink()
                continue
            key = (ns, name, tag)
            self._mem[key] = entries
            self._disk[key] = {k: TagEntry(**asdict(v)) for k, v in entries.items()}

    def get(self, repo: Repo, tag: str, accept_key: str) -> TagEntry | None:
        with self._lock:
            entry = self._mem.get((repo.ns, repo.name, tag), {}).get(accept_key)
            return None if entry is None else TagEntry(**asdict(entry))  # a copy: callers cannot alter ours

    def entries(self, repo: Repo, tag: str) -> dict[str, TagEntry]:
        """Every Accept variant known for a tag (docker, containerd and skopeo each send their own Accept set)."""
        with self._lock:
            return {k: TagEntry(**asdict(e)) for k, e in self._mem.get((repo.ns, repo.name, tag), {}).items()}

    def put(self, repo: Repo, tag: str, accept_key: str, entry: TagEntry) -> None:
        digest_hex(entry.digest)
        check_media_type(entry.media_type)
        key = (repo.ns, repo.name, tag)
        with self._lock:
            entries = self._mem.setdefault(key, {})
            entries[accept_key] = TagEntry(**asdict(entry))
            while len(entries) > MAX_TAG_VARIANTS:
                del entries[min((k for k in entries if k != accept_key), key=lambda k: entries[k].checked_at)]
            on_disk = self._disk.get(key, {}).get(accept_key)
            if on_disk is not None and (
                (on_disk.digest, on_disk.media_type, on_disk.size) == (entry.digest, entry.media_type, entry.size)
                and entry.checked_at - on_disk.checked_at < PERSIST_CHECKED_AT_EVERY
            ):
                return
            self._persist(key, entries)

    def _persist(self, key: tuple[str, str, str], entries: dict[str, TagEntry]) -> None:
        """Write one tag's file (caller holds the lock). Not fsynced: a lost update only means an older entry,
        and a torn file is discarded at the next startup."""
        ns, name, tag = key
        path = self.dir / self._file_name(ns, name, tag)
        if not entries:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._disk.pop(key, None)
            return
        doc = {"ns": ns, "name": name, "tag": tag, "entries": {k: asdict(v) for k, v in entries.items()}}
        try:
            _write_atomic(path, json.dumps(doc, sort_keys=True).encode(), sync=False)
        except OSError as e:
            # The in-memory cache still works; only a restart would lose this entry.
            log.warning("tag cache: cannot persist %s/%s:%s: %s", ns, name, tag, e)
            return
        self._disk[key] = {k: TagEntry(**asdict(v)) for k, v in entries.items()}

    def digests(self) -> set[str]:
        """Every manifest digest some cached tag (any repository, any Accept variant) points to."""
        with self._lock:
            return {e.digest for entries in self._mem.values() for e in entries.values()}

    def forget(self, repo: Repo, tag: str | None = None) -> int:
        """Drop one tag (every Accept variant) or, with tag None, every tag of `repo`. Returns tags dropped."""
        with self._lock:
            keys = [k for k in self._mem if k[0] == repo.ns and k[1] == repo.name and (tag is None or k[2] == tag)]
            for key in keys:
                del self._mem[key]
                self._persist(key, {})
            return len(keys)
