"""The client side of the registry API: fetch manifests and blobs from an upstream registry over httpx.

This is the only module that talks to upstream registries. What it guarantees its callers (fetch.py, tags.py):

- Errors come out as `OciError` when the client should see them (404 -> BLOB_UNKNOWN / MANIFEST_UNKNOWN,
  401 -> UNAUTHORIZED, 403 -> DENIED, 429 -> TOOMANYREQUESTS with the upstream's `Retry-After`) and as
  `UpstreamUnavailable` when the registry cannot be reached or keeps failing (connection errors, stalls and 5xx
  after `settings.upstream_retries` retries with backoff). `UpstreamProtocolError`, a kind of
  UpstreamUnavailable, means the registry answered something inconsistent (a wrong `Content-Range`, a body of
  the wrong length): callers fall back to peers on both.
- Bytes are never trusted: a manifest fetched by digest is hashed before it is returned; a ranged blob
  request is checked against the status and `Content-Range`, and when the upstream ignored Range (200) the
  prefix is skipped here. A blob body without Content-Length (chunked, or HTTP/1.0 read to the close) takes
  its size from a HEAD and must end exactly there. The whole-blob digest is the caller's job (it hashes as it
  stores).
- `Authorization` is only ever sent to the registry's own origin (scheme, host, port). Redirects are followed
  by hand so a blob redirected to a CDN, as Docker Hub does, is fetched without the token. Token requests follow
  redirects too (a moved token endpoint, http -> https), their credentials only to the realm's own host.

It never retries a 429 (the limit belongs to the user's account, the client decides), never follows more than
`MAX_REDIRECTS` hops, never reads an unbounded manifest into memory, and never logs a credential or a token
(a URL goes into a message through `_for_log`, without userinfo and query).

Throughput: httpcore 1.0 reads the socket in 64 KiB pieces, which caps a stream at ~0.4-1.1 GB/s on loopback;
`enable_large_reads()` raises that to 1 MiB (~4.2 GB/s on an idle machine of ours), and blob bodies are iterated
with `aiter_raw()` (no decoding: we ask for `identity` encoding), whose chunks are then single socket reads of up
to 1 MiB. Against docker-registry on a loaded 2-core machine this path took 2.6x less CPU per byte than 64 KiB
reads, and 1.5x less than `aiter_raw(1 MiB)`, which copies every byte through a BytesIO.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import trio

from p2pcache.config import Settings, upstream_tls_context
from p2pcache.metrics import Metrics
from p2pcache.oci.auth import (
    Challenge,
    CredentialStore,
    TokenCache,
    load_credentials,
    parse_www_authenticate,
    pick_challenge,
)
from p2pcache.oci.errors import STATUS_OF_CODE, OciError, UpstreamUnavailable
from p2pcache.oci.rawbody import SocketBody, detach_body
from p2pcache.oci.reference import TAG_RE, Repo, check_name, check_tag, is_digest, page_size, parse_digest

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # what a BlobResponse yields at most per step, and httpcore's socket read size
MAX_MANIFEST_BYTES = 4 << 20  # the distribution registry's own limit for a manifest
MAX_TAGS_BYTES = 4 << 20  # a tag list page: ~100,000 tags of 40 bytes
MAX_ERROR_BODY = 16 << 10  # we read this much of an error response to learn its OCI code
MAX_TOKEN_BODY = 1 << 20  # a token server's answer (JWTs of a few KiB; Docker Hub's is ~4 KiB)
MAX_REDIRECTS = 5
MAX_BACKOFF = 5.0  # seconds; a retry never waits longer than this
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# What we ask for when the client sent no Accept: every manifest kind clients pull today. Without the OCI
# types the distribution registry answers 404 for OCI manifests.
DEFAULT_MANIFEST_ACCEPT = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_HEADER_VALUE = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
_CONTENT_RANGE = re.compile(r"bytes\s+([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")  # ASCII, int()-sized

T = TypeVar("T")


class UpstreamProtocolError(UpstreamUnavailable):
    """The upstream answered, but inconsistently (bad Content-Range, wrong length, missing headers)."""


def enable_large_reads(read_size: int = CHUNK_SIZE) -> bool:
    """Make httpcore's HTTP/1.1 connections read up to `read_size` bytes per socket read.

    httpcore 1.0.x reads `AsyncHTTP11Connection.READ_NUM_BYTES` (64 KiB) per `recv`; the attribute is read
    through `self`, so raising the class default is the one hook that does not fork httpcore. It is a
    buffer size, not a behaviour: responses parse the same, each read just may return more. The change is
    process-wide, only ever raises the value, and is idempotent. Returns False (and leaves httpcore alone)
    if this httpcore has no such attribute, so an upgrade costs speed, never correctness.
    """
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # pragma: no cover - a future httpcore layout
        return False
    current = getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", None)
    if not isinstance(current, int):  # pragma: no cover
        return False
    if current < read_size:
        AsyncHTTP11Connection.READ_NUM_BYTES = read_size
    return True


@dataclass
class ManifestInfo:
    digest: str
    media_type: str
    size: int
    stale: bool = False  # a tag's last known answer, served while the upstream is unreachable (tags.py)


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    port = url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme, 0)
    return url.scheme, url.host, port


def _carries_credentials(realm: httpx.URL, target: httpx.URL) -> bool:
    """Whether a token request to `target`, reached by redirects from `realm`, may carry the credentials.

    The realm's own origin may, and so may the same host upgraded to https (a token server moved behind TLS, the
    common redirect): the credentials were meant for that host and travel no less safely. Another host, or a
    downgrade from https to http, may not.
    """
    if _origin(target) == _origin(realm):
        return True
    return target.host == realm.host and target.scheme == "https"


def _accept_header(accept: Sequence[str]) -> str:
    # Header values with control characters would make h11 refuse the whole request; drop such items
    # rather than fail, since Accept is advisory.
    items = [a.strip() for a in accept if isinstance(a, str)]
    items = [a for a in items if _HEADER_VALUE.fullmatch(a)]
    return ", ".join(items or DEFAULT_MANIFEST_ACCEPT)


def _require_identity(resp: httpx.Response, what: str) -> None:
    # We asked for identity and read raw bytes: an encoded body would be hashed, stored and served encoded.
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UpstreamProtocolError(f"{what}: unexpected Content-Encoding {encoding!r}")


def _check_ref(ref: str) -> str:
    return parse_digest(ref) if is_digest(ref) else check_tag(ref)


def _content_length(resp: httpx.Response) -> int | None:
    value = resp.headers.get("content-length")
    if value is None or not re.fullmatch(r"[0-9]{1,19}", value.strip()):
        return None
    return int(value)


class _Retry(Exception):
    """An answer worth retrying (a 5xx from the registry or its token server)."""


class Upstream:
    """All requests to upstream registries, over one httpx.AsyncClient (connection pooling, trio backend).

    `transport`, `credentials` and `retry_backoff` exist for tests; a node passes only settings and metrics.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        credentials: CredentialStore | None = None,
        token_cache: TokenCache | None = None,
        retry_backoff: float = 0.25,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        if credentials is None:
            credentials = load_credentials(settings.credentials) if settings.credentials else CredentialStore()
        self._credentials = credentials
        self._tokens = token_cache if token_cache is not None else TokenCache()
        self._token_locks: dict[tuple[str, str], trio.Lock] = {}
        self._basic_registries: set[str] = set()  # registries that answered a Basic challenge
        self._retries = max(0, int(settings.upstream_retries))
        self._retry_backoff = retry_backoff
        enable_large_reads()
        timeout = httpx.Timeout(
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_read_timeout,  # per socket read: this is the stall timeout
            write=settings.upstream_read_timeout,
            pool=None,  # waiting for a pooled connection is our own back-pressure, not an upstream fault
        )
        self._client = httpx.AsyncClient(
            transport=transport,
            verify=upstream_tls_context(settings.upstream_ca),  # unused when a transport is given (tests)
            timeout=timeout,
            follow_redirects=False,  # we follow by hand: Authorization must not leak to another host
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            # identity everywhere: manifests must arrive byte for byte as hashed, and blobs are read raw.
            headers={"User-Agent": "p2pcache/0.1", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- the contract ---

    async def head_manifest(self, repo: Repo, ref: str, accept: Sequence[str]) -> ManifestInfo:
        """Digest, media type and size of a manifest with one HEAD (GET only if the HEAD lacks them)."""
        _check_ref(ref)

        async def read_headers(resp: httpx.Response) -> ManifestInfo | None:
            digest = resp.headers.get("docker-content-digest", "")
            media_type = resp.headers.get("content-type", "")
            size = _content_length(resp)
            try:
                parse_digest(digest)
            except OciError:
                return None
            if not media_type or size is None:
                return None
            if is_digest(ref) and digest != ref:
                raise OciError("DIGEST_INVALID", f"upstream answered {digest} for manifest {ref}")
            return ManifestInfo(digest, media_type, size)

        info = await self._call(
            "HEAD", repo, f"manifests/{ref}", "manifest", {"Accept": _accept_header(accept)}, read_headers
        )
        if info is None:
            # Some registries omit Docker-Content-Digest on HEAD: the body tells us.
            info, _ = await self.get_manifest(repo, ref, accept)
        return info

    async def get_manifest(self, repo: Repo, ref: str, accept: Sequence[str]) -> tuple[ManifestInfo, bytes]:
        """The manifest's bytes, verbatim, and what they are. By digest, the bytes are verified first."""
        _check_ref(ref)

        async def read_body(resp: httpx.Response) -> tuple[ManifestInfo, bytes]:
            _require_identity(resp, f"manifest {ref}")
            declared = _content_length(resp)
            if declared is not None and declared > MAX_MANIFEST_BYTES:
                raise OciError("MANIFEST_INVALID", f"upstream manifest {ref} is larger than 4 MiB")
            body = await self._read_capped(resp, MAX_MANIFEST_BYTES)
            if body is None:
                raise OciError("MANIFEST_INVALID", f"upstream manifest {ref} is larger than 4 MiB")
            if declared is not None and declared != len(body):
                raise UpstreamProtocolError(f"manifest {ref}: Content-Length {declared}, got {len(body)} bytes")
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if is_digest(ref) and digest != ref:
                raise OciError("DIGEST_INVALID", f"upstream sent a manifest for {ref} whose digest is {digest}")
            claimed = resp.headers.get("docker-content-digest", "")
            if claimed.startswith("sha256:") and claimed != digest:
                # By tag nothing else tells us the bytes are right; a registry contradicting itself is lying.
                raise OciError("DIGEST_INVALID", f"upstream claims {claimed} for {ref} but sent {digest}")
            media_type = resp.headers.get("content-type", "") or _media_type_of(body)
            if not media_type:
                raise OciError("MANIFEST_INVALID", f"upstream manifest {ref} has no media type")
            return ManifestInfo(digest, media_type, len(body)), body

        return await self._call(
            "GET", repo, f"manifests/{ref}", "manifest", {"Accept": _accept_header(accept)}, read_body
        )

    async def list_tags(self, repo: Repo, n: int | None = None, last: str | None = None
                        ) -> tuple[list[str], tuple[int | None, str] | None]:
        """One page of the upstream's tags of `repo` (`n` and `last` as in the distribution spec), and where the
        next page starts, (n, last), when the upstream's Link header names one. Tags that are not tags by the
        OCI grammar are left out: they could name nothing a client can pull."""
        query = httpx.QueryParams({k: v for k, v in (("n", n), ("last", last)) if v is not None})
        path = f"tags/list?{query}" if query else "tags/list"

        async def read_page(resp: httpx.Response) -> tuple[list[str], tuple[int | None, str] | None]:
            body = await self._read_capped(resp, MAX_TAGS_BYTES)
            if body is None:
                raise UpstreamProtocolError(f"tag list of {repo.name} is larger than {MAX_TAGS_BYTES >> 20} MiB")
            try:
                tags = json.loads(body).get("tags") or []
            except (ValueError, AttributeError, RecursionError):
                raise UpstreamProtocolError(f"tag list of {repo.name} is not a JSON object") from None
            if not isinstance(tags, list):
                raise UpstreamProtocolError(f"tag list of {repo.name} has no list of tags")
            good = [t for t in tags if isinstance(t, str) and TAG_RE.fullmatch(t)]
            return good, _next_page(resp.headers.get("link", ""))

        return await self._call("GET", repo, path, "tags", {"Accept": "application/json"}, read_page)

    async def head_blob(self, repo: Repo, digest: str) -> int:
        """Size of a blob, from one HEAD."""
        parse_digest(digest)

        async def read_size(resp: httpx.Response) -> int:
            size = _content_length(resp)
            if size is None:
                raise UpstreamProtocolError(f"HEAD blob {digest}: no Content-Length")
            return size

        return await self._call("HEAD", repo, f"blobs/{digest}", "blob", {}, read_size)

    @asynccontextmanager
    async def open_blob(self, repo: Repo, digest: str, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[BlobResponse]:
        """Stream a blob from `offset` to `end` (exclusive; None: its end); chunks of up to 1 MiB.

        `end` goes into the Range header, so the registry stops sending there (a swarm node fetching only the
        pieces nobody else has must not pull the rest of the blob through its socket buffers); an end beyond the
        blob is its size. A registry that ignores Range is cut off at `end` by us.

        Raises before yielding if the blob cannot be had (OciError / UpstreamUnavailable). While iterating,
        a broken body is resumed with a Range request (up to `upstream_retries` times), so callers see either the
        right bytes in order or UpstreamUnavailable; a stalled one (no byte for the read timeout) is not resumed
        here: that is the caller's call, which resumes already (nested, the two made 16 timeouts of one stall).
        """
        parse_digest(digest)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end <= offset):
            raise ValueError(f"end must be an int > offset, got {end!r}")
        resp, size, skip = await self._open_blob_response(repo, digest, offset, end)
        blob = BlobResponse(self, repo, digest, offset, size, resp, skip, end)
        try:
            yield blob
        finally:
            await blob.aclose()

    # --- blobs ---

    async def _open_blob_response(self, repo: Repo, digest: str, offset: int,
                                  end: int | None = None) -> tuple[httpx.Response, int, int]:
        """An open response for the blob from `offset` (to `end`): (response, blob size, prefix bytes to skip)."""
        headers: dict[str, str] = {}
        if end is not None:
            headers["Range"] = f"bytes={offset}-{end - 1}"
        elif offset:
            headers["Range"] = f"bytes={offset}-"

        async def check(resp: httpx.Response) -> tuple[httpx.Response, int | None, int]:
            _require_identity(resp, f"blob {digest}")
            length = _content_length(resp)
            if resp.status_code == 200:
                # Range ignored (or not asked for): the whole blob comes, we drop the prefix ourselves. Without
                # a Content-Length (None) the size is asked for below.
                return resp, length, offset
            if resp.status_code == 206:
                m = _CONTENT_RANGE.fullmatch(resp.headers.get("content-range", "").strip())
                if m is None or m.group(3) == "*":
                    raise UpstreamProtocolError(f"blob {digest}: 206 without a usable Content-Range")
                start, last_got, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
                last = total - 1 if end is None else min(end, total) - 1
                if start != offset or last_got != last or last_got < start:
                    raise UpstreamProtocolError(
                        f"blob {digest}: asked for bytes {offset}-, got Content-Range {m.group(0)!r}"
                    )
                if length is not None and length != last_got - start + 1:
                    raise UpstreamProtocolError(f"blob {digest}: Content-Length {length} != range length")
                return resp, total, 0
            raise UpstreamProtocolError(f"blob {digest}: unexpected status {resp.status_code}")

        resp, size, skip = await self._call("GET", repo, f"blobs/{digest}", "blob", headers, check, keep_open=True)
        if size is None:
            # A chunked or HTTP/1.0 (read to the close) body: its end cannot tell a whole blob from a cut one, so
            # the size comes from a HEAD, as a client's would from the manifest (skopeo pulls such blobs), and
            # BlobResponse holds the body to exactly that size. The GET is closed first and sent again after:
            # holding its pooled connection while the HEAD waited for another, 64 such blobs at once held every
            # connection of the pool and nothing reached the upstream any more (found in review).
            await resp.aclose()
            size = await self.head_blob(repo, digest)
            resp, again, skip = await self._call("GET", repo, f"blobs/{digest}", "blob", headers, check,
                                                 keep_open=True)
            if again is not None and again != size:
                await resp.aclose()
                raise UpstreamProtocolError(f"blob {digest}: HEAD says {size} bytes, the GET {again}")
        try:
            if offset > size:
                raise OciError("RANGE_INVALID", f"offset {offset} beyond blob size {size}",
                               headers={"Content-Range": f"bytes */{size}"})
        except BaseException:
            await resp.aclose()
            raise
        return resp, size, skip

    # --- the request machinery: retries > authentication > redirects ---

    async def _call(
        self,
        method: str,
        repo: Repo,
        path: str,
        kind: str,
        headers: dict[str, str],
        consume: Callable[[httpx.Response], Awaitable[T]],
        *,
        keep_open: bool = False,
    ) -> T:
        """Send a request with retries; `consume` turns a successful response into the result.

        Connection errors, stalls (also while `consume` reads the body) and 5xx are retried with backoff.
        Unless `keep_open`, the response is closed after `consume`; with it, the result owns the response.
        """
        check_name(repo.name)  # defence in depth: nothing unvalidated goes into a URL
        base = self._settings.upstream_url(repo.ns)
        url = f"{base}/v2/{repo.name}/{path}"
        attempt = 0
        while True:
            try:
                resp = await self._send_authenticated(method, repo, base, url, headers, kind)
                if resp.status_code >= 500:
                    await resp.aclose()
                    raise _Retry(f"HTTP {resp.status_code}")
                if resp.status_code >= 300:
                    await self._raise_for_status(resp, kind, path)
                try:
                    result = await consume(resp)
                except BaseException:
                    await resp.aclose()
                    raise
                if not keep_open:
                    await resp.aclose()
                return result
            except (httpx.TransportError, _Retry) as e:
                problem = e
                if _certificate_failure(e) is not None:
                    # The same certificate fails the same way on a retry: say why at once, and only once.
                    host = httpx.URL(base).netloc.decode("ascii")
                    log.warning("upstream %s for %s: %s; not retried (a private CA is trusted with --upstream-ca)",
                                host, repo.ns, _describe(e))
                    raise UpstreamUnavailable(f"{method} {repo}/{path}: {_describe(e)}") from None
            if attempt >= self._retries:
                raise UpstreamUnavailable(
                    f"{method} {repo}/{path}: {_describe(problem)} (after {attempt + 1} attempts)"
                ) from None
            log.info("upstream %s %s/%s failed (%s), retrying", method, repo, path, _describe(problem))
            await trio.sleep(self._backoff(attempt))
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        # Exponential with jitter, so N nodes that saw the same outage do not retry in lockstep.
        return min(MAX_BACKOFF, self._retry_backoff * (2**attempt)) * (0.5 + random.random() / 2)

    async def _raise_for_status(self, resp: httpx.Response, kind: str, path: str) -> None:
        status = resp.status_code
        headers: dict[str, str] = {}
        code = await self._error_code(resp)
        await resp.aclose()
        what = f"{kind} {path.split('?', 1)[0].split('/', 1)[-1]}"
        if status == 404:
            code = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN"}.get(kind, "NAME_UNKNOWN")
            raise OciError(code, f"{what} not found upstream")
        if status == 401:
            raise OciError("UNAUTHORIZED", f"upstream refused {what}: authentication required")
        if status == 403:
            raise OciError("DENIED", f"upstream denied access to {what}")
        if status == 429:
            if "retry-after" in resp.headers:
                headers["Retry-After"] = resp.headers["retry-after"]
            raise OciError("TOOMANYREQUESTS", "upstream rate limit reached", headers=headers)
        if status == 416:
            if "content-range" in resp.headers:
                headers["Content-Range"] = resp.headers["content-range"]
            raise OciError("RANGE_INVALID", f"upstream cannot satisfy the range of {what}", headers=headers)
        if 300 <= status < 400:
            raise UpstreamProtocolError(f"{what}: redirect without a usable Location, or too many")
        # Another 4xx: pass the upstream's OCI code on when it is one we know (NAME_INVALID, ...).
        raise OciError(code or "UNKNOWN", f"upstream answered {status} for {what}", status=status if code else 502)

    async def _error_code(self, resp: httpx.Response) -> str | None:
        try:
            body = await self._read_capped(resp, MAX_ERROR_BODY)
            doc = json.loads(body or b"")
            code = doc["errors"][0]["code"]
        except (httpx.TransportError, ValueError, KeyError, IndexError, TypeError, RecursionError):
            return None
        return code if isinstance(code, str) and code in STATUS_OF_CODE else None

    async def _read_capped(self, resp: httpx.Response, limit: int) -> bytes | None:
        """The body, or None if it is longer than `limit` (then it is not read further)."""
        parts: list[bytes] = []
        total = 0
        async for chunk in resp.aiter_raw():
            total += len(chunk)
            if total > limit:
                return None
            parts.append(chunk)
        self._count_bytes(total)
        return b"".join(parts)

    async def _send_authenticated(
        self, method: str, repo: Repo, base: str, url: str, headers: dict[str, str], kind: str
    ) -> httpx.Response:
        """One request through the auth dance: cached credentials, else the 401 challenge, then once more."""
        registry = base
        scope = repo.pull_scope
        credentials = self._credentials.get(repo.ns, httpx.URL(base).netloc.decode("ascii"))
        authorization = self._known_authorization(registry, scope, credentials)
        resp, at_registry = await self._send_following_redirects(method, url, headers, authorization, base, kind)
        if resp.status_code != 401 or not at_registry:
            return resp
        challenge = pick_challenge(parse_www_authenticate(resp.headers.get("www-authenticate", "")))
        await resp.aclose()
        if challenge is None:
            raise OciError("UNAUTHORIZED", "upstream requires an authentication scheme we do not support")
        if challenge.scheme == "bearer":
            refused = authorization[len("Bearer "):] if authorization and authorization.startswith("Bearer ") else None
            token = await self._token(registry, scope, challenge, credentials, refused)
            authorization = f"Bearer {token}"
        else:
            if credentials is None:
                raise OciError("UNAUTHORIZED", f"upstream {repo.ns} needs credentials and none are configured")
            if authorization is not None and authorization.startswith("Basic "):
                raise OciError("UNAUTHORIZED", f"upstream {repo.ns} rejected the configured credentials")
            self._basic_registries.add(registry)
            authorization = credentials.basic_header()
        resp, at_registry = await self._send_following_redirects(method, url, headers, authorization, base, kind)
        if resp.status_code == 401 and at_registry:
            await resp.aclose()
            if challenge.scheme == "basic":
                self._basic_registries.discard(registry)
            else:
                self._tokens.forget(registry, scope)
            raise OciError("UNAUTHORIZED", f"upstream {repo.ns} rejected our credentials for {repo.name}")
        return resp

    def _known_authorization(self, registry: str, scope: str, credentials: Any) -> str | None:
        token = self._tokens.get(registry, scope)
        if token is not None:
            return f"Bearer {token}"
        if credentials is not None and registry in self._basic_registries:
            return credentials.basic_header()
        return None

    async def _token(
        self, registry: str, scope: str, challenge: Challenge, credentials: Any, refused: str | None
    ) -> str:
        """A bearer token for (registry, scope): from the cache, else from the challenge's realm.

        One fetch per key at a time: concurrent requests that all got a 401 wait for the first one's token.
        """
        lock = self._token_locks.setdefault((registry, scope), trio.Lock())
        async with lock:
            cached = self._tokens.get(registry, scope)
            if cached is not None and cached != refused:
                return cached
            if refused is not None:
                self._tokens.forget(registry, scope)
            try:
                realm = httpx.URL(challenge.params["realm"])
            except httpx.InvalidURL:
                raise OciError("UNAUTHORIZED", "upstream token realm is not a valid URL") from None
            if realm.scheme not in ("http", "https") or not realm.host:
                raise OciError("UNAUTHORIZED", "upstream token realm is not an http(s) URL")
            params = {"scope": scope}
            if challenge.params.get("service"):
                params["service"] = challenge.params["service"]
            identity = getattr(credentials, "identity_token", None)
            resp = None
            if identity:
                # OAuth2, as docker does with an identity token: trade the refresh token for an access token.
                form = {**params, "grant_type": "refresh_token", "refresh_token": identity, "client_id": "p2pcache"}
                resp, body = await self._send_token_request("POST", realm, data=form)
                if resp.status_code in (404, 405):
                    resp = None  # a token server without OAuth2: the GET below, which has no password to send
            if resp is None:
                basic = credentials.basic_header() if credentials is not None and not identity else None
                # Added to the realm's own query, never in place of it: a token server may need parameters of
                # its own there (realm="https://h/token?account=acme"), as Docker and containers/image keep them.
                # (httpx's `params=` would replace that query.)
                url = realm
                for key, value in params.items():
                    url = url.copy_add_param(key, value)
                resp, body = await self._send_token_request("GET", url, basic=basic)
            if resp.status_code >= 500:
                raise _Retry(f"token server answered {resp.status_code}")
            if resp.status_code == 429:
                retry = {"Retry-After": resp.headers["retry-after"]} if "retry-after" in resp.headers else {}
                raise OciError("TOOMANYREQUESTS", "upstream token server rate limit reached", headers=retry)
            if resp.status_code != 200:
                who = "the configured credentials" if credentials is not None else "an anonymous token request"
                raise OciError("UNAUTHORIZED", f"upstream token server refused {who} ({resp.status_code})")
            if body is None:
                raise OciError("UNAUTHORIZED", f"upstream token server answered with more than {MAX_TOKEN_BODY} bytes")
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: "[" * 15000 (found in review: a 500)
                doc = None
            token = self._tokens.put(registry, scope, doc) if isinstance(doc, dict) else None
            if token is None:
                raise OciError("UNAUTHORIZED", "upstream token server answered without a token")
            return token

    async def _send_token_request(self, method: str, realm: httpx.URL, *, basic: str | None = None,
                                  data: dict[str, str] | None = None) -> tuple[httpx.Response, bytes | None]:
        """A token request, following up to MAX_REDIRECTS redirects (a moved token endpoint, http -> https), as
        Docker's and containers/image's clients do. Returns the final response (closed) and its body, or None
        for a body over MAX_TOKEN_BODY (read no further: a 400 MiB answer once took the node to 935 MB).

        The credentials go only where the realm is (`_carries_credentials`): Basic is left off a GET
        redirected to another host. A POST's body holds the refresh token, so it is followed only with 307/308
        (which keep method and body) to the realm itself; any other redirect of a POST is returned as the
        answer, which the caller takes as a refusal.
        """
        target = realm
        for _ in range(MAX_REDIRECTS + 1):
            trusted = _carries_credentials(realm, target)
            if method == "POST":
                request = self._client.build_request("POST", target, data=data)
            else:
                request = self._client.build_request(
                    "GET", target, headers={"Authorization": basic} if basic is not None and trusted else {})
            resp = await self._client.send(request, stream=True)
            try:
                self._count_request(method, "token", resp.status_code)
                location = resp.headers.get("location")
                if resp.status_code not in REDIRECT_STATUSES or not location:
                    return resp, await self._read_capped(resp, MAX_TOKEN_BODY)
            finally:
                await resp.aclose()
            try:
                following = resp.url.join(location)
            except httpx.InvalidURL:
                raise UpstreamProtocolError(f"token server {target.host} redirected to an invalid URL") from None
            if following.scheme not in ("http", "https") or not following.host:
                raise UpstreamProtocolError(f"token server {target.host} redirected to a non-HTTP URL")
            if method == "POST" and (resp.status_code not in (307, 308) or not _carries_credentials(realm, following)):
                return resp
            target = following
        raise UpstreamProtocolError(f"more than {MAX_REDIRECTS} redirects from token server {realm.host}")

    async def _send_following_redirects(
        self, method: str, url: str, headers: dict[str, str], authorization: str | None, base: str, kind: str
    ) -> tuple[httpx.Response, bool]:
        """Send, following redirects; Authorization only to the registry's origin.

        Returns the final response (streaming, open) and whether it came from the registry's origin.
        """
        registry_origin = _origin(httpx.URL(base))
        target = httpx.URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            at_registry = _origin(target) == registry_origin
            h = dict(headers)
            if authorization is not None and at_registry:
                h["Authorization"] = authorization
            request = self._client.build_request(method, target, headers=h)
            try:
                resp = await self._client.send(request, stream=True)
            except httpx.TransportError:
                self._count_request(method, kind, "error")
                raise
            self._count_request(method, kind, resp.status_code)
            location = resp.headers.get("location")
            if resp.status_code not in REDIRECT_STATUSES or not location:
                return resp, at_registry
            await resp.aclose()
            try:
                target = resp.url.join(location)
            except httpx.InvalidURL:
                raise UpstreamProtocolError(f"redirect to an invalid URL from {target.host}") from None
            if target.scheme not in ("http", "https"):
                raise UpstreamProtocolError(f"redirect to a non-HTTP URL from {resp.url.host}")
        raise UpstreamProtocolError(f"more than {MAX_REDIRECTS} redirects for {_for_log(url)}")

    # --- metrics ---

    def _count_request(self, method: str, kind: str, status: int | str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_requests.labels(method=method, kind=kind, status=str(status)).inc()

    def _count_bytes(self, n: int) -> None:
        if self._metrics is not None and n:
            self._metrics.upstream_bytes.inc(n)


class BlobResponse:
    """A blob streaming from upstream, from `offset` to its end, in chunks of up to 1 MiB.

    Yields exactly `size - offset` bytes in order, or raises: a body that breaks, stalls or ends early is
    resumed from the next byte with a Range request; when the retries are spent, UpstreamUnavailable. A body
    that goes on past the blob's size is an UpstreamProtocolError, raised before its last bytes are yielded.
    """

    def __init__(
        self, upstream: Upstream, repo: Repo, digest: str, offset: int, size: int, resp: httpx.Response, skip: int,
        end: int | None = None,
    ) -> None:
        self.size = size  # total blob size
        self.offset = offset  # first byte this response yields
        self.end = size if end is None else min(end, size)  # first byte it does not yield
        self._upstream = upstream
        self._repo = repo
        self._digest = digest
        self._pos = offset  # next byte to yield
        self._resumes = 0
        self._attach(resp, skip)

    def _attach(self, resp: httpx.Response, skip: int) -> None:
        self._resp = resp
        self._skip = skip  # bytes of this response before self._pos (the upstream ignored our Range)
        # Fast path: the body read straight from the connection, past h11's buffer (see rawbody.py). Else no
        # chunk_size: httpx would re-buffer every byte through a BytesIO (three copies). With 1 MiB socket
        # reads each chunk already is one read of up to 1 MiB (measured: ~1010 KiB on average, and faster).
        length = _content_length(resp)
        # Without a Content-Length nothing but the size says where the body should end (see __anext__).
        self._unsized = length is None
        raw = None if length is None else detach_body(resp, length, CHUNK_SIZE)
        self._raw = raw
        self._chunks: AsyncIterator[bytes] = resp.aiter_raw() if raw is None else raw

    def detach_socket(self) -> SocketBody | None:
        """The rest of this response's body for a reader in a worker thread (`fetch.Download._pump`), when it
        is a body read past h11 (TCP, or TLS whose session we can reach) from the first byte asked for; else None
        (iterate instead). The reader counts the bytes it receives with `count_bytes` and stops at `end`; this
        response yields nothing more and does not resume: a short body is the reader's to resume with a new
        request."""
        if self._raw is None or self._skip:
            return None
        body = self._raw.detach_socket()
        if body is not None:
            self._pos = self.end
        return body

    def count_bytes(self, n: int) -> None:
        """Count `n` body bytes received by a detached reader in the upstream metrics (thread-safe)."""
        self._upstream._count_bytes(n)

    def __aiter__(self) -> BlobResponse:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._pos >= self.end:
                raise StopAsyncIteration
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                problem: object = f"body ended at byte {self._pos} of {self.size}"
            except httpx.TimeoutException as e:
                # A stall already cost the whole read timeout: no resume here, the caller's (fetch.py) decides.
                # Resumed at both levels, one silent upstream held a client 16 timeouts, 8.7 minutes (found in
                # review); now at most the caller's idle resumes plus one, about 2 minutes.
                await self._close_current()
                raise UpstreamUnavailable(f"blob {self._digest}: {_describe(e)} at byte {self._pos}") from None
            except httpx.TransportError as e:
                problem = _describe(e)
            else:
                self._upstream._count_bytes(len(chunk))
                if self._skip:
                    dropped = min(self._skip, len(chunk))
                    self._skip -= dropped
                    chunk = chunk[dropped:]
                    if not chunk:
                        continue
                if self._pos + len(chunk) > self.size:
                    raise UpstreamProtocolError(f"blob {self._digest}: more bytes than its size {self.size}")
                if self._unsized and self._pos + len(chunk) == self.size == self.end:
                    # The last bytes of a body without a length: it must end here. Read on before handing
                    # them over, so a longer body fails the download rather than completing it.
                    try:
                        await self._expect_end()
                    except httpx.TransportError as e:
                        problem = _describe(e)  # the end was not seen: these bytes come again after the resume
                        await self._resume(problem)
                        continue
                if self._pos + len(chunk) > self.end:  # a registry that ignored our Range end
                    chunk = chunk[: self.end - self._pos]
                self._pos += len(chunk)
                return chunk
            await self._resume(problem)

    async def _expect_end(self) -> None:
        async for extra in self._chunks:
            if extra:
                self._upstream._count_bytes(len(extra))
                raise UpstreamProtocolError(f"blob {self._digest}: more bytes than its size {self.size}")

    async def _resume(self, problem: object) -> None:
        await self._close_current()
        if self._resumes >= self._upstream._retries:
            raise UpstreamUnavailable(f"blob {self._digest}: {problem}; gave up after {self._resumes} resumes")
        self._resumes += 1
        log.info("blob %s: %s; resuming at byte %d", self._digest, problem, self._pos)
        await trio.sleep(self._upstream._backoff(self._resumes - 1))
        resp, size, skip = await self._upstream._open_blob_response(
            self._repo, self._digest, self._pos, None if self.end == self.size else self.end)
        if size != self.size:
            await resp.aclose()
            raise UpstreamProtocolError(f"blob {self._digest}: size changed from {self.size} to {size}")
        self._attach(resp, skip)

    async def _close_current(self) -> None:
        try:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            await self._resp.aclose()

    async def aclose(self) -> None:
        await self._close_current()


def _next_page(link: str) -> tuple[int | None, str] | None:
    """(n, last) of a Link header's rel="next" target (`</v2/x/tags/list?n=2&last=b>; rel="next"`), else None."""
    for part in link.split(","):
        target, _, params = part.partition(";")
        if re.search(r'\brel\s*=\s*"?next\b', params) is None:
            continue
        target = target.strip()
        if not (target.startswith("<") and target.endswith(">")):
            return None
        q = httpx.URL(target[1:-1]).params
        last = q.get("last")
        if not last or TAG_RE.fullmatch(last) is None:
            return None
        return page_size(q.get("n"), 10**9), last
    return None


def _media_type_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    value = doc.get("mediaType") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and _HEADER_VALUE.fullmatch(value) else ""


def _for_log(url: str | httpx.URL) -> str:
    """`url` for a log line or an error message: without userinfo (a password) and query (a CDN's signature)."""
    try:
        return str(httpx.URL(url).copy_with(userinfo=b"", query=None))
    except httpx.InvalidURL:
        return "(an invalid URL)"


def _describe(e: BaseException) -> str:
    """`e` for a log line, with the cause httpx keeps out of its own text: over trio a refused certificate is
    a bare `ConnectError` whose reason sits three exceptions down the chain."""
    name = type(e).__name__
    bad_certificate = _certificate_failure(e)
    if bad_certificate is not None:
        return f"{name}: certificate verify failed: {bad_certificate.verify_message or bad_certificate.reason}"
    for cause in _causes(e):
        if str(cause):
            return f"{name}: {cause}"
    return name


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from or while handling, outermost first (cycles cut)."""
    chain: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _certificate_failure(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind `e`, if that is what it is. Not an outage: the same
    certificate fails the same way on every retry until someone trusts its CA (`--upstream-ca`)."""
    return next((c for c in _causes(e) if isinstance(c, ssl.SSLCertVerificationError)), None)
