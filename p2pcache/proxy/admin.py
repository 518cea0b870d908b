"""Admin API of a node, served only on `settings.admin_listen` (loopback by default), never on the registry port.

- `DELETE /admin/blobs/<digest>`: remove a cached blob (404 if absent, 409 while it is being served or
  downloaded);
- `DELETE /admin/images/<ns>/<name>:<tag>` (or `@<digest>`): the seed's `rmi`: forget the tag, delete the
  manifest and, for an image manifest, its config and layers; for an index, its child manifests and theirs.
  Best effort: pinned blobs are skipped and reported, absent ones counted, and what another stored manifest
  refers to is kept ("shared"), as `docker rmi` keeps a layer another image uses;
- `GET /admin/status`: store bytes, blob count, downloads in flight, version;
- `POST /admin/verify`: hash every stored blob the node has not checked since it started (a scrub after a disk
  scare); damaged ones are removed, as on their first serve. Answers when done: `{"checked": N, "already": N,
  "damaged": [digests], "unreadable": [digests it could not open now, kept], "seconds": S}`;
- `POST /admin/preheat` `{"image": "docker.io/library/x:1", "platforms": ["linux/amd64"]}`: resolve the image
  and fetch its config and every layer into the store (all platforms of an index unless `platforms` is given);
  answers when done with a JSON summary (200, or 502 when something could not be fetched).
Also `/healthz` and `/metrics`, so an operator can use one port.

Rules: this module must never be reachable from peers or the registry port (the node mounts it on its own
listener); it never deletes a pinned blob (the store refuses); every name, tag and digest goes through
`oci.reference` first, and every error is an OCI JSON body.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Container
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import p2pcache
from p2pcache.config import Settings
from p2pcache.metrics import Metrics
from p2pcache.oci.errors import OciError, UpstreamUnavailable
from p2pcache.oci.reference import Repo, check_tag, is_digest, parse_digest, resolve_repo
from p2pcache.oci.upstream import DEFAULT_MANIFEST_ACCEPT
from p2pcache.proxy.server import Request, Response, oci_error_response

if TYPE_CHECKING:
    from p2pcache.fetch import Fetcher
    from p2pcache.store.blobs import BlobStore
    from p2pcache.store.manifests import ManifestStore, TagCache
    from p2pcache.tags import ManifestResolver

log = logging.getLogger(__name__)

PREHEAT_CONCURRENCY = 4  # blobs fetched at once by one preheat: enough to fill a link, few enough for clients
MAX_INDEX_DEPTH = 2  # an index of indexes is legal but rare; deeper nesting is refused, not followed forever


def split_image(ref: str, default_ns: str) -> tuple[Repo, str]:
    """'docker.io/library/x:1' -> (Repo('docker.io', 'library/x'), '1'); '@sha256:…' gives the digest; no tag
    means 'latest'. Raises OciError(NAME_INVALID / DIGEST_INVALID)."""
    if "@" in ref:
        name, _, reference = ref.partition("@")
        parse_digest(reference)
    else:
        slash = ref.rfind("/")
        colon = ref.rfind(":")
        if colon > slash:
            name, reference = ref[:colon], ref[colon + 1:]
        else:
            name, reference = ref, "latest"
        check_tag(reference)
    return resolve_repo(name, None, default_ns), reference


def manifest_children(body: bytes) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(child manifests with their index entries, blob digests) referenced by a manifest body.

    The body is the upstream's and may be any JSON: only lists of objects with a string digest count (a
    `"layers": 5` was a TypeError, a 500 of preheat and rmi)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # nested past the parser's recursion limit: a 500 before (review)
        return [], []
    if not isinstance(doc, dict):
        return [], []
    children: list[tuple[str, dict[str, Any]]] = []
    blobs: list[str] = []
    for entry in _list(doc.get("manifests")):
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            children.append((entry["digest"], entry))
    config = doc.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        blobs.append(config["digest"])
    for layer in _list(doc.get("layers")):
        if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
            blobs.append(layer["digest"])
    return children, blobs


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _platform(entry: dict[str, Any]) -> str:
    p = entry.get("platform")
    if not isinstance(p, dict):
        p = {}
    parts = [str(p.get("os", "")), str(p.get("architecture", ""))]
    if p.get("variant"):
        parts.append(str(p["variant"]))
    return "/".join(parts)


def platform_matches(entry: dict[str, Any], wanted: list[str]) -> bool:
    """Whether an index entry is for one of the `wanted` platforms: "os/arch" takes any variant (Docker Hub's
    arm64 entries say "v8", and "linux/arm64" fetched nothing: found in review), "os/arch/variant" that one."""
    have = _platform(entry).split("/")
    for w in wanted:
        parts = w.split("/")
        if parts[:2] == have[:2] and (len(parts) < 3 or parts[2:] == have[2:]):
            return True
    return False


def _json(status: int, doc: Any) -> Response:
    return Response(status, [("content-type", "application/json")], json.dumps(doc).encode() + b"\n")


class Admin:
    """The request handler of the admin listener."""

    def __init__(self, settings: Settings, store: BlobStore, manifests: ManifestStore, tags: TagCache,
                 fetcher: Fetcher, resolver: ManifestResolver, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.manifests = manifests
        self.tags = tags
        self.fetcher = fetcher
        self.resolver = resolver
        self.metrics = metrics
        self.started_at = time.time()

    async def __call__(self, req: Request) -> Response:
        try:
            return await self._route(req)
        except OciError as e:
            return oci_error_response(e)
        except UpstreamUnavailable as e:
            return oci_error_response(OciError("UNAVAILABLE", f"upstream registry unreachable: {e}"))

    async def _route(self, req: Request) -> Response:
        m, path = req.method, req.path
        if path == "/healthz" and m in ("GET", "HEAD"):
            return Response(200, [("content-type", "text/plain")], b"ok\n")
        if path == "/metrics" and m in ("GET", "HEAD"):
            return Response(200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self.metrics.registry))
        if path == "/admin/status" and m in ("GET", "HEAD"):
            return _json(200, self.status())
        if path == "/admin/preheat" and m == "POST":
            return await self.preheat(req.body)
        if path == "/admin/verify" and m == "POST":
            return await self.verify()
        if path.startswith("/admin/blobs/") and m == "DELETE":
            return self.delete_blob(path[len("/admin/blobs/"):])
        if path.startswith("/admin/images/") and m == "DELETE":
            return await self.delete_image(path[len("/admin/images/"):])
        known = ("/admin/status", "/admin/preheat", "/admin/verify", "/healthz", "/metrics")
        if path in known or path.startswith(("/admin/blobs/", "/admin/images/")):
            raise OciError("UNSUPPORTED", f"{m} is not supported on {path}")
        raise OciError("NAME_UNKNOWN", "not found", status=404)

    # --- status ------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        downloads = self.fetcher.downloads()
        return {
            "version": p2pcache.__version__,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "store_bytes": self.store.used_bytes(),
            "max_disk": self.settings.max_disk,
            "blobs": len(self.store.digests()),
            "downloads_in_flight": len(downloads),
            "downloads": sorted(downloads),
            "swarm": self.fetcher.swarm is not None,
        }

    # --- verify ------------------------------------------------------------------------------------------

    async def verify(self) -> Response:
        started = time.monotonic()
        summary = await self.fetcher.verify_stored()
        summary["seconds"] = round(time.monotonic() - started, 2)
        if summary["damaged"]:
            log.warning("admin: verify removed %d damaged blob(s): %s", len(summary["damaged"]),
                        ", ".join(summary["damaged"]))
        return _json(200, summary)

    # --- deletions ---------------------------------------------------------------------------------------

    def delete_blob(self, digest: str) -> Response:
        parse_digest(digest)
        if self.store.stat(digest, touch=False) is None:
            if self.store.pinned(digest):  # being downloaded: not in the store yet, and committed when done
                raise OciError("DENIED", "blob is being downloaded; try again when it is done", status=409)
            raise OciError("BLOB_UNKNOWN", "blob not in the store")
        if not self.store.delete(digest):
            raise OciError("DENIED", "blob is being served or downloaded; try again later", status=409)
        log.info("admin: deleted blob %s", digest)
        return _json(200, {"deleted": digest})

    async def delete_image(self, ref: str) -> Response:
        repo, reference = split_image(ref, self.settings.default_ns)
        roots: list[str] = []
        if is_digest(reference):
            roots.append(reference)
        else:
            roots += self._cached_tag_digests(repo, reference)
            if not roots:
                # Not in the tag cache (e.g. expired and forgotten): ask the resolver, which also knows the
                # cache's Accept variants; an upstream that is down just means nothing more to delete.
                try:
                    info, _ = await self.resolver.resolve(repo, reference, DEFAULT_MANIFEST_ACCEPT)
                    roots.append(info.digest)
                except (OciError, UpstreamUnavailable) as e:
                    log.info("admin rmi %s: tag not resolvable (%s)", ref, e)
            self.tags.forget(repo, reference)
        report: dict[str, list[str]] = {"deleted": [], "in_use": [], "absent": [], "shared": []}
        order: list[str] = []
        seen: set[str] = set()
        for digest in roots:
            self._walk(digest, order, seen, depth=0)
        # Like `docker rmi`: what another stored manifest refers to stays (found in review: an rmi of one image
        # took a layer it shared with another, which then no longer pulled with the upstream down). A scan of
        # every stored manifest, in a thread: thousands of small files must not stall the event loop.
        keep = await trio.to_thread.run_sync(self._referenced_elsewhere, seen, set(roots), self.tags.digests())
        for digest in order:
            if digest in keep:
                report["shared"].append(digest)
            else:
                self._delete_one(digest, report)
        log.info("admin: rmi %s: %d deleted, %d in use, %d shared", ref, len(report["deleted"]),
                 len(report["in_use"]), len(report["shared"]))
        if not roots:
            raise OciError("MANIFEST_UNKNOWN", "image not known to this node")
        return _json(200, {"image": f"{repo}:{reference}" if not is_digest(reference) else f"{repo}@{reference}",
                           **report})

    def _cached_tag_digests(self, repo: Repo, tag: str) -> list[str]:
        # One tag may be cached under several Accept sets (docker, containerd and skopeo differ): take them all.
        return list(dict.fromkeys(e.digest for e in self.tags.entries(repo, tag).values()))

    def _walk(self, digest: str, order: list[str], seen: set[str], depth: int,
              leave: Container[str] = ()) -> None:
        """Append to `order` (and `seen`) what `digest` names in the store, children first: for a stored
        manifest, its child manifests (an index's) and its blobs, then itself; nothing of those in `leave`."""
        if digest in seen or digest in leave:
            return
        seen.add(digest)
        try:
            parse_digest(digest)
        except OciError:
            return  # a malformed child reference in a manifest: nothing of ours can be named by it
        got = self.manifests.get(digest)
        if got is not None:
            children, blobs = manifest_children(got[1])
            if depth < MAX_INDEX_DEPTH:
                for child, _ in children:
                    self._walk(child, order, seen, depth + 1, leave)
            for blob in blobs:
                if blob not in seen:
                    seen.add(blob)
                    order.append(blob)
        order.append(digest)

    def _referenced_elsewhere(self, tree: set[str], roots: set[str], tagged: set[str]) -> set[str]:
        """What the stored manifests outside `tree` name (their blobs and child manifests), short of the `roots`
        being deleted: an index still stored does not keep the one of its images an rmi names. And what another
        cached tag (`tagged`: the tag cache's digests, the rmi's own tag forgotten) names, with all it holds: an
        rmi of a:1 took the image a:2 names too, and a:2 no longer pulled with the upstream down (found in
        review). In a thread."""
        order: list[str] = []
        seen: set[str] = set()
        for digest in self.manifests.digests():
            if digest not in tree:
                self._walk(digest, order, seen, 0, roots)
        for digest in tagged & tree:
            self._walk(digest, order, seen, 0)
        return seen

    def _delete_one(self, digest: str, report: dict[str, list[str]]) -> None:
        try:
            if self.store.stat(digest, touch=False) is None:
                # being downloaded (pinned: committed when done) is in use, as DELETE /admin/blobs says with
                # its 409; reported absent, it was stored a moment after the rmi (found in review)
                report["in_use" if self.store.pinned(digest) else "absent"].append(digest)
            elif self.store.delete(digest):
                report["deleted"].append(digest)
            else:
                report["in_use"].append(digest)
        except OciError:
            pass  # an invalid digest inside a manifest names nothing in the store

    # --- preheat -----------------------------------------------------------------------------------------

    async def preheat(self, body: bytes) -> Response:
        try:
            doc = json.loads(body or b"null")
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
            raise OciError("UNKNOWN", 'expected JSON {"image": "docker.io/library/x:1"}', status=400)
        platforms = doc.get("platforms")
        if platforms is not None and not (isinstance(platforms, list) and platforms
                                          and all(isinstance(p, str) for p in platforms)):
            # [] matched no entry and answered 404 "no entry of 1 is for ;" (found in review)
            raise OciError("UNKNOWN", '"platforms" must be a non-empty list like ["linux/amd64"] (or left out)',
                           status=400)
        repo, reference = split_image(doc["image"], self.settings.default_ns)
        started = time.monotonic()
        summary: dict[str, Any] = {"image": doc["image"], "manifests": [], "blobs": 0, "bytes": 0,
                                   "already_cached": 0, "errors": []}
        blobs = await self._collect(repo, reference, platforms, summary)
        limiter = trio.CapacityLimiter(PREHEAT_CONCURRENCY)

        async def fetch(digest: str) -> None:
            async with limiter:
                try:
                    cached = self.store.stat(digest, touch=False) is not None
                    size = await self.fetcher.store_blob(repo, digest)
                    summary["blobs"] += 1
                    summary["bytes"] += size
                    summary["already_cached"] += cached
                except Exception as e:  # FetchFailed, OciError, …: reported, the other blobs go on
                    summary["errors"].append({"digest": digest, "error": str(e) or type(e).__name__})

        async with trio.open_nursery() as nursery:
            for digest in blobs:
                nursery.start_soon(fetch, digest)
        summary["seconds"] = round(time.monotonic() - started, 3)
        log.info("admin: preheated %s: %d blobs, %d bytes, %d errors", doc["image"], summary["blobs"],
                 summary["bytes"], len(summary["errors"]))
        return _json(502 if summary["errors"] else 200, summary)

    async def _collect(self, repo: Repo, reference: str, platforms: list[str] | None,
                       summary: dict[str, Any]) -> list[str]:
        """Resolve the image (and its index children) and return every blob digest to fetch, in order."""
        blobs: list[str] = []
        todo: list[tuple[str, int]] = [(reference, 0)]
        while todo:
            ref, depth = todo.pop(0)
            info, body = await self.resolver.resolve(repo, ref, DEFAULT_MANIFEST_ACCEPT)
            summary["manifests"].append(info.digest)
            children, layer_digests = manifest_children(body)
            if depth < MAX_INDEX_DEPTH:
                chosen = [(c, e) for c, e in children if platforms is None or platform_matches(e, platforms)]
                if children and not chosen:
                    # a 200 that fetched nothing (found in review): say what the index has instead
                    have = sorted({_platform(e) for _, e in children})
                    raise OciError("MANIFEST_UNKNOWN", f"no entry of {ref} is for {', '.join(platforms or [])}; "
                                   f"it has {', '.join(have)}")
                for child, _ in chosen:
                    parse_digest(child)
                    todo.append((child, depth + 1))
            for d in layer_digests:
                parse_digest(d)
                if d not in blobs:
                    blobs.append(d)
        return blobs
