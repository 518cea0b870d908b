"""The read-only OCI distribution API (`/v2/…`) of the registry port, plus `/metrics` and `/healthz`.

Routes every request to the Fetcher (blobs) or the ManifestResolver (manifests) after validating the name, tag
and digest with `oci.reference`, so nothing unchecked ever reaches a path or an upstream URL. Every error is an
OCI JSON body. Answers:
- `GET /v2/` → 200 `{}` with `Docker-Distribution-API-Version: registry/2.0`;
- `GET|HEAD /v2/<name>/manifests/<tag|digest>` → the manifest bytes verbatim, their media type and digest;
- `GET|HEAD /v2/<name>/blobs/<digest>` → the blob (Range → 206, unsatisfiable → 416), streamed by the server's
  sendfile path while the Fetcher's download is still running;
- `GET|HEAD /v2/<name>/tags/list` (`n`, `last`) → the upstream's list, a page at a time, with a `Link` to the next
  page in this node's own path form; never a list of what the cache holds (that would leave tags out);
- every push method (POST, PUT, PATCH, DELETE) → 405 UNSUPPORTED; `/v2/_catalog` → 405 UNSUPPORTED too (a
  pull-through cache knows only what was pulled through it, and upstreams such as Docker Hub list no catalog);
- anything else → 404 with an OCI body.
The namespace is `?ns=` (containerd), else a host-like first name segment, else `settings.default_ns`.

This module must never write: no route here changes the store except by fetching what a client asked for. Admin
operations live in `proxy/admin.py` on another listener.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from p2pcache.config import Settings
from p2pcache.metrics import Metrics
from p2pcache.oci.errors import OciError, UpstreamUnavailable
from p2pcache.oci.reference import Repo, check_tag, is_digest, page_size, parse_digest, resolve_repo
from p2pcache.proxy.conditional import if_range_allows, match_fails, none_match
from p2pcache.proxy.ranges import RangeNotSatisfiable, content_range, parse_range
from p2pcache.proxy.server import BlobBody, Request, Response, oci_error_response

if TYPE_CHECKING:
    from p2pcache.fetch import Fetcher
    from p2pcache.tags import ManifestResolver

log = logging.getLogger(__name__)

API_VERSION_HEADER = ("docker-distribution-api-version", "registry/2.0")
MAX_TAGS_PAGE = 10_000  # the most tags a client may ask for in one page (`n`)
READ_METHODS = ("GET", "HEAD")


def accept_types(req: Request) -> list[str]:
    """The media types of every Accept header (clients send one line or several), in order, de-duplicated.

    Wildcards (`*/*`, `application/*`) are left out, so a client that sends only those is asked for as one that
    sends none: with the manifest types a client of today reads (oci.upstream.DEFAULT_MANIFEST_ACCEPT), which a
    wildcard accepts too. Passed on, `*/*` made docker-registry 2.8 convert a schema2 tag to a signed schema1
    manifest whose digest it then could not serve (curl's default Accept got a 404 for a tag that exists)."""
    out: list[str] = []
    for value in req.header_values("accept"):
        for item in value.split(","):
            media = item.split(";", 1)[0].strip()
            if media and media not in out and not media.endswith("/*"):
                out.append(media)
    return out


def split_v2_path(rest: str) -> tuple[str, str, str] | None:
    """'library/x/manifests/1' -> ('manifests', 'library/x', '1'); None if it is neither route.

    Names may contain slashes (and even a 'blobs' or 'manifests' component), references never do, so the
    route is the last '/manifests/' or '/blobs/' in the path. What follows it is returned as is, slashes
    included ("sha256:../../etc"), so the reference grammar rejects it with 400 rather than a vague 404.
    """
    best: tuple[int, str] | None = None
    for kind in ("manifests", "blobs"):
        i = rest.rfind(f"/{kind}/")
        if i > 0 and (best is None or i > best[0]):
            best = (i, kind)
    if best is None:
        return None
    i, kind = best
    return kind, rest[:i], rest[i + len(kind) + 2:]


class Registry:
    """The request handler of the registry port."""

    def __init__(self, settings: Settings, fetcher: Fetcher, resolver: ManifestResolver, metrics: Metrics) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.resolver = resolver
        self.metrics = metrics
        # Namespaces whose upstream was seen ignoring a tag list's `n` or `last` (docker-registry 2.8 ignores
        # both): from then on the node cuts every page of theirs itself. Seen only where the answer shows it (more
        # than n tags, or `last` among them); a `last` no longer in the list (a tag deleted between two pages)
        # shows nothing, and the whole list went back as the page, tags before `last` included (found in review).
        self._ignores_paging: set[str] = set()

    async def __call__(self, req: Request) -> Response:
        started = time.monotonic()
        route = route_label(req.path)  # errors too: a manifest's 404 is a "manifests" one, not "unknown"
        try:
            resp = await self._route(req)
        except OciError as e:
            resp = oci_error_response(e)
        except UpstreamUnavailable as e:
            log.warning("upstream unavailable for %s: %s", req.path, e)
            resp = oci_error_response(OciError("UNAVAILABLE", "upstream registry unreachable"))
        resp.headers.append(API_VERSION_HEADER)
        counts_bytes = route in ("blobs", "manifests") and resp.status < 300

        def on_sent(nbytes: int, complete: bool) -> None:
            # Counted when the body is done, so a 1 GiB blob's time is its transfer, not its first byte.
            self.metrics.requests.labels(route=route, method=method_label(req.method), status=str(resp.status)).inc()
            self.metrics.request_seconds.labels(route=route).observe(time.monotonic() - started)
            if counts_bytes:
                self.metrics.served_bytes.inc(nbytes)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s -> %d, %d bytes%s, %.3f s", req.method, req.target, resp.status, nbytes,
                          "" if complete else " (aborted)", time.monotonic() - started)

        resp.on_sent = on_sent
        return resp

    async def _route(self, req: Request) -> Response:
        # What each path is counted as in /metrics is route_label()'s, valid or not.
        path = req.path
        if path == "/healthz":
            return self._read_only(req) or Response(200, [("content-type", "text/plain")], b"ok\n")
        if path == "/metrics":
            return self._read_only(req) or Response(
                200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self.metrics.registry))
        if path in ("/v2", "/v2/"):
            return self._read_only(req) or Response(200, [("content-type", "application/json")], b"{}")
        if not path.startswith("/v2/"):
            raise OciError("NAME_UNKNOWN", "not found", status=404)
        if req.method not in READ_METHODS:
            # Before any parsing: a push attempt gets the one answer that tells docker this is a mirror.
            raise OciError("UNSUPPORTED", "this registry is a read-only pull-through cache")
        rest = path[len("/v2/"):]
        if rest == "_catalog":
            return oci_error_response(OciError("UNSUPPORTED", "the catalog is not listed by this cache"))
        if rest.endswith("/tags/list"):
            return await self._tags(req, rest[: -len("/tags/list")])
        parts = split_v2_path(rest)
        if parts is None:
            raise OciError("NAME_UNKNOWN", "not found", status=404)
        kind, name, ref = parts
        if kind == "blobs" and (ref == "uploads" or ref.startswith("uploads/")):
            raise OciError("UNSUPPORTED", "this registry is a read-only pull-through cache")
        repo = resolve_repo(name, req.query.get("ns"), self.settings.default_ns)
        if kind == "manifests":
            if is_digest(ref):
                parse_digest(ref)
            else:
                check_tag(ref)
            return await self._manifest(req, repo, ref)
        return await self._blob(req, repo, parse_digest(ref))

    def before_body(self, req: Request) -> Response | None:
        """The server asks before it reads a request's body: a push (any method but GET and HEAD) is answered
        405 UNSUPPORTED from its head alone, whatever the path, never 413 for a big layer or after reading it."""
        if req.method in READ_METHODS:
            return None
        resp = oci_error_response(OciError("UNSUPPORTED", "this registry is a read-only pull-through cache"))
        resp.headers.append(API_VERSION_HEADER)
        self.metrics.requests.labels(route=route_label(req.path), method=method_label(req.method),
                                      status=str(resp.status)).inc()
        return resp

    def _read_only(self, req: Request) -> Response | None:
        if req.method in READ_METHODS:
            return None
        return oci_error_response(OciError("UNSUPPORTED", f"{req.method} is not supported here"))

    async def _tags(self, req: Request, name: str) -> Response:
        repo = resolve_repo(name, req.query.get("ns"), self.settings.default_ns)
        n_text, last = req.query.get("n"), req.query.get("last")
        n = page_size(n_text, MAX_TAGS_PAGE)
        if n_text is not None and n is None:
            raise OciError("PAGINATION_NUMBER_INVALID", f"n must be a number from 1 to {MAX_TAGS_PAGE}")
        if last is not None:
            check_tag(last)
        tags, following = await self.resolver.upstream.list_tags(repo, n, last)
        ignored = (n is not None and len(tags) > n) or (last is not None and last in tags)
        if ignored and following is None:
            self._ignores_paging.add(repo.ns)
        ignored = ignored or repo.ns in self._ignores_paging
        if following is None and (ignored or (n is None and last is None)):
            # The whole list, from an upstream asked for all of it or one that ignores `n` and `last` and lists in
            # any order (docker-registry 2.8 does): the node cuts the page itself, in lexical order as the
            # distribution spec has it. An upstream that pages is passed through page by page as it ordered
            # them, its last page (no Link) included: re-sorting its pages, or dropping what sorts before `last`,
            # lost tags where it did not sort (found in review, twice).
            tags = sorted(t for t in tags if last is None or t > last)
            if n is not None and len(tags) > n:
                tags, following = tags[:n], (n, tags[n - 1])
        headers = [("content-type", "application/json")]
        if following is not None:
            # The upstream's link names its own path; the client pages on through ours (its name, its ?ns=), with
            # its own page size, or the upstream's if that is one the node would take from a client.
            up_n = following[0] if following[0] is not None and 1 <= following[0] <= MAX_TAGS_PAGE else None
            query = {"n": n if n is not None else up_n, "last": following[1], "ns": req.query.get("ns")}
            q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
            headers.append(("link", f'</v2/{name}/tags/list?{q}>; rel="next"'))
        return Response(200, headers, json.dumps({"name": name, "tags": tags}).encode())

    async def _manifest(self, req: Request, repo: Repo, ref: str) -> Response:
        info, body = await self.resolver.resolve(repo, ref, accept_types(req))
        etag = f'"{info.digest}"'
        if none_match(req.header_values("if-none-match"), etag):
            return Response(304, [("docker-content-digest", info.digest), ("etag", etag)])
        return Response(200, [
            ("content-type", info.media_type),
            ("docker-content-digest", info.digest),
            ("content-length", str(len(body))),
            ("etag", etag),
        ], body)

    async def _blob(self, req: Request, repo: Repo, digest: str) -> Response:
        etag = f'"{digest}"'
        headers = [
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", digest),
            ("accept-ranges", "bytes"),
            ("etag", etag),
            # a blob's bytes never change (docker-registry sends the same)
            ("cache-control", "max-age=31536000"),
        ]
        if match_fails(req.header_values("if-match"), etag):
            await self.fetcher.stat_blob(repo, digest)  # a blob that does not exist is a 404 first
            return Response(412, [])
        not_modified = none_match(req.header_values("if-none-match"), etag)
        if req.method == "HEAD" or not_modified:
            # the blob must exist (404 otherwise), but neither answer needs a byte of it: no download starts
            size = await self.fetcher.stat_blob(repo, digest)
            if not_modified:
                return Response(304, [h for h in headers if h[0] != "content-type"])
            return Response(200, headers + [("content-length", str(size))])
        # The handle stays open (and the blob pinned) until the server has sent the body or given up on it.
        handle = await req.resources.enter_async_context(self.fetcher.open_blob(repo, digest))
        size = handle.size
        try:
            rng = parse_range(req.header("range"), size) if if_range_allows(req.header("if-range"), etag) else None
        except RangeNotSatisfiable as e:
            err = OciError("RANGE_INVALID", "requested range not satisfiable",
                           headers={"Content-Range": e.content_range()})
            return oci_error_response(err)
        if rng is None:
            return Response(200, headers + [("content-length", str(size))], stream=BlobBody(handle, 0, size))
        start, end = rng
        headers += [("content-length", str(end - start)), ("content-range", content_range(start, end, size))]
        return Response(206, headers, stream=BlobBody(handle, start, end))


METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The metrics method of a request: any other method is "other" (found in review: each made-up method a
    client sent became a series of its own, without end)."""
    return method if method in METHOD_LABELS else "other"


def route_label(path: str) -> str:
    """The metrics route of a request path, before (and whether or not) it is valid: blobs and manifests errors
    are counted there, not under "unknown" (found in review: every 404, 401 and 503 of a blob or manifest was)."""
    if path in ("/healthz", "/metrics"):
        return path[1:]
    if path in ("/v2", "/v2/"):
        return "base"
    if not path.startswith("/v2/"):
        return "unknown"
    rest = path[len("/v2/"):]
    if rest == "_catalog" or rest.endswith("/tags/list"):
        return "list"
    parts = split_v2_path(rest)
    return parts[0] if parts is not None else "unknown"
