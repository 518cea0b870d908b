"""Upstream against an in-process fake registry (httpx.MockTransport): auth, redirects, retries, Range checks."""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import trio

from p2pcache.config import Settings
from p2pcache.metrics import Metrics
from p2pcache.oci.auth import Credentials, CredentialStore, TokenCache
from p2pcache.oci.errors import OciError, UpstreamUnavailable
from p2pcache.oci.reference import Repo
from p2pcache.oci.upstream import CHUNK_SIZE, Upstream, UpstreamProtocolError, _media_type_of

REGISTRY = "http://registry.test"
REPO = Repo("docker.io", "library/alpine")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BLOB = bytes(range(256)) * 10_000  # 2.56 MB: several 1 MiB chunks
BLOB_DIGEST = sha(BLOB)
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
MANIFEST_DIGEST = sha(MANIFEST)


class BreakingStream(httpx.AsyncByteStream):
    """A body that sends `n` bytes of `data` and then breaks the connection."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n = data, n

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[: self.n]
        raise httpx.ReadError("connection reset")


class StallingStream(BreakingStream):
    """A body that sends `n` bytes and then nothing: what the read timeout reports."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[: self.n]
        raise httpx.ReadTimeout("timed out")


class Body(httpx.AsyncByteStream):
    """A response body that really streams (MockTransport pre-reads `content=`), in 300 kB pieces."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 300_000):
            yield self.data[i : i + 300_000]


class Pieces(httpx.AsyncByteStream):
    """A body of exactly these pieces, each one read."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def respond(status: int, headers: dict[str, str] | None = None, content: bytes = b"", json_doc: object = None,
            ) -> httpx.Response:
    if json_doc is not None:
        content = json.dumps(json_doc).encode()
    h = {"Content-Length": str(len(content)), **(headers or {})}
    return httpx.Response(status, headers=h, stream=Body(content))


@dataclass
class FakeRegistry:
    """Just enough of the distribution API, with switches for each misbehaviour we must survive."""

    auth: str | None = None  # None, "bearer" or "basic"
    realm: str = "http://auth.test/token"  # the Bearer challenge's token server
    user: tuple[str, str] = ("alice", "wonderland")
    anonymous_tokens: bool = True  # token server issues tokens without credentials
    expires_in: int | None = None
    range_mode: str = "honour"  # honour | ignore | wrong | no-total
    redirect_blobs_to: str | None = None  # e.g. "http://cdn.test" (another host), or REGISTRY itself
    failures: list[object] = field(default_factory=list)  # statuses / exceptions for the next requests
    break_body_at: list[int] = field(default_factory=list)  # break the next blob bodies after n bytes
    stall_body: bool = False  # the bodies broken with break_body_at stall (read timeout) instead
    redirect_loop: bool = False  # every request is redirected to itself
    lie_about_manifest: bool = False
    gzip_manifest: bool = False  # encodes the manifest although we asked for identity
    manifest_header_digest: str | None = None
    rate_limited: bool = False
    # the next blob GETs answer without Content-Length (chunked or HTTP/1.0 to the close): "whole" the blob,
    # "cut" its first 600 kB only, "long" the blob and then more bytes
    unsized: list[str] = field(default_factory=list)
    moved_token_to: str | None = None  # the token server's /moved answers 307 to this URL (plus the query)
    token_body: bytes | None = None  # the token server answers 200 with these bytes instead of its JSON
    requests: list[httpx.Request] = field(default_factory=list)
    tokens_issued: int = 0
    valid_tokens: set[str] = field(default_factory=set)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failures:
            f = self.failures.pop(0)
            if isinstance(f, Exception):
                raise f
            return respond(int(f))
        if self.redirect_loop:
            return respond(302, headers={"Location": str(request.url)})
        host = request.url.host
        if host in ("auth.test", "other.test"):
            if request.url.path == "/moved" and self.moved_token_to is not None:
                query = request.url.query.decode()
                return respond(307, headers={"Location": self.moved_token_to + (f"?{query}" if query else "")})
            return self._token(request)
        if host == "cdn.test":
            return self._blob(request)
        if self.rate_limited:
            return respond(429, headers={"Retry-After": "17"}, json_doc={"errors": [{"code": "TOOMANYREQUESTS"}]})
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        path = request.url.path
        if path.startswith("/v2/library/alpine/manifests/"):
            ref = path.rsplit("/", 1)[1]
            if ref not in ("latest", MANIFEST_DIGEST):
                return respond(404, json_doc={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            if "oci" not in request.headers.get("accept", ""):
                return respond(404, json_doc={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            body = MANIFEST + (b" " if self.lie_about_manifest else b"")
            headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": self.manifest_header_digest or sha(body)}
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(body))
                return respond(200, headers=headers)
            if self.gzip_manifest:
                headers["Content-Encoding"] = "gzip"
                body = gzip.compress(body)
            return respond(200, headers=headers, content=body)
        if path == f"/v2/library/alpine/blobs/{BLOB_DIGEST}":
            if self.redirect_blobs_to:
                return respond(307, headers={"Location": f"{self.redirect_blobs_to}/signed/{BLOB_DIGEST}?x=1"})
            return self._blob(request)
        if path.startswith("/signed/"):  # a same-host redirect target
            return self._blob(request)
        return respond(404, json_doc={"errors": [{"code": "BLOB_UNKNOWN"}]})

    def _check_auth(self, request: httpx.Request) -> httpx.Response | None:
        got = request.headers.get("authorization", "")
        if self.auth == "bearer":
            if got.startswith("Bearer ") and got[7:] in self.valid_tokens:
                return None
            return respond(401, headers={
                "WWW-Authenticate": f'Bearer realm="{self.realm}",service="registry.test",'
                                    'scope="repository:library/alpine:pull"'})
        if self.auth == "basic":
            want = "Basic " + base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            if got == want:
                return None
            return respond(401, headers={"WWW-Authenticate": 'Basic realm="Registry Realm"'})
        return None

    def _token(self, request: httpx.Request) -> httpx.Response:
        got = request.headers.get("authorization")
        if got is None and not self.anonymous_tokens:
            return respond(401)
        if got is not None:
            want = "Basic " + base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            if got != want:
                return respond(401)
        assert request.url.params["scope"] == "repository:library/alpine:pull"
        assert request.url.params["service"] == "registry.test"
        if self.token_body is not None:
            return respond(200, content=self.token_body)
        self.tokens_issued += 1
        token = f"tok{self.tokens_issued}"
        self.valid_tokens.add(token)
        doc: dict[str, object] = {"token": token}
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        return respond(200, json_doc=doc)

    def _blob(self, request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return respond(200, headers={"Content-Length": str(len(BLOB))})
        rng = request.headers.get("range")
        if self.unsized:
            start = int(rng.removeprefix("bytes=").partition("-")[0]) if rng else 0
            pieces = [BLOB[i:i + 300_000] for i in range(start, len(BLOB), 300_000)]
            kind = self.unsized.pop(0)
            if kind == "cut":
                pieces = pieces[:2]
            elif kind == "long":
                pieces.append(b"more")  # a piece of its own: the body is exactly right up to the blob's end
            headers = {"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"} if rng else {}
            return httpx.Response(206 if rng else 200, headers=headers, stream=Pieces(pieces))
        if self.break_body_at:
            n = self.break_body_at.pop(0)
            start = int(rng.removeprefix("bytes=").partition("-")[0]) if rng else 0
            headers = {"Content-Length": str(len(BLOB) - start)}
            if rng:
                headers["Content-Range"] = f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"
            kind = StallingStream if self.stall_body else BreakingStream
            return httpx.Response(206 if rng else 200, headers=headers, stream=kind(BLOB[start:], n))
        if rng is None or self.range_mode == "ignore":
            return respond(200, content=BLOB)
        first, _, last = rng.removeprefix("bytes=").partition("-")
        start, stop = int(first), min(len(BLOB), int(last) + 1) if last else len(BLOB)
        if start >= len(BLOB):
            return respond(416, headers={"Content-Range": f"bytes */{len(BLOB)}"})
        if self.range_mode == "wrong":  # answers a different range than asked
            start = max(0, start - 10)
        total = "*" if self.range_mode == "no-total" else str(len(BLOB))
        return respond(206, headers={"Content-Range": f"bytes {start}-{stop - 1}/{total}"},
                              content=BLOB[start:stop])

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.host}{r.url.path}" for r in self.requests]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    reg: FakeRegistry,
    creds: Credentials | None = None,
    retries: int = 2,
    **kw: object,
) -> Upstream:
    settings = Settings(upstreams={"docker.io": REGISTRY}, upstream_retries=retries)
    store = CredentialStore({"docker.io": creds} if creds else {})
    return Upstream(settings, transport=httpx.MockTransport(reg.handler), credentials=store,
                    retry_backoff=0.001, **kw)  # type: ignore[arg-type]


async def read_all(up: Upstream, offset: int = 0) -> bytes:
    async with up.open_blob(REPO, BLOB_DIGEST, offset) as blob:
        assert blob.size == len(BLOB) and blob.offset == offset
        chunks = [c async for c in blob]
    assert all(len(c) <= CHUNK_SIZE for c in chunks)
    return b"".join(chunks)


# --- token flow ---


async def test_anonymous_bearer_flow_and_token_reuse() -> None:
    reg = FakeRegistry(auth="bearer")
    up = make(reg)
    info, body = await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert body == MANIFEST and info.digest == MANIFEST_DIGEST and info.media_type == OCI_MANIFEST
    token_request = next(r for r in reg.requests if r.url.host == "auth.test")
    assert "authorization" not in token_request.headers  # anonymous: no credentials configured
    assert reg.tokens_issued == 1
    n = len(reg.requests)
    assert await read_all(up) == BLOB
    assert len(reg.requests) == n + 1  # the cached token went along at once: no 401, no token request
    assert reg.requests[-1].headers["authorization"] == "Bearer tok1"
    await up.aclose()


async def test_credentialed_bearer_flow() -> None:
    reg = FakeRegistry(auth="bearer", anonymous_tokens=False)
    up = make(reg, Credentials("alice", "wonderland"))
    assert (await up.head_manifest(REPO, "latest", [OCI_MANIFEST])).digest == MANIFEST_DIGEST
    token_request = next(r for r in reg.requests if r.url.host == "auth.test")
    assert token_request.headers["authorization"].startswith("Basic ")


async def test_wrong_credentials_are_unauthorized() -> None:
    reg = FakeRegistry(auth="bearer", anonymous_tokens=False)
    up = make(reg, Credentials("alice", "wrong"))
    with pytest.raises(OciError) as e:
        await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert e.value.code == "UNAUTHORIZED"
    assert "wrong" not in str(e.value)
    up2 = make(reg)  # no credentials, token server wants some
    with pytest.raises(OciError, match="anonymous"):
        await up2.get_manifest(REPO, "latest", [OCI_MANIFEST])


async def test_the_realms_own_query_is_kept_in_the_token_request() -> None:
    """realm="http://auth.test/token?account=acme": the token server needs `account`; scope and service are
    added to it (as Docker and containers/image do), not put in its place."""
    reg = FakeRegistry(auth="bearer", realm="http://auth.test/token?account=acme")
    up = make(reg)
    info, _ = await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert info.digest == MANIFEST_DIGEST
    token_request = next(r for r in reg.requests if r.url.host == "auth.test")
    assert token_request.url.path == "/token"
    assert dict(token_request.url.params) == {
        "account": "acme", "scope": "repository:library/alpine:pull", "service": "registry.test"}


@pytest.mark.parametrize("moved_to", ["/token", "https://auth.test/token", "https://auth.test:8443/token"])
async def test_a_redirect_from_the_realm_is_followed_with_the_credentials_to_its_host(moved_to: str) -> None:
    """The token endpoint moved (a path, or http -> https on the same host): followed, and Basic goes along."""
    reg = FakeRegistry(auth="bearer", anonymous_tokens=False, realm="http://auth.test/moved?account=acme",
                       moved_token_to=moved_to)
    up = make(reg, Credentials("alice", "wonderland"))
    info, _ = await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert info.digest == MANIFEST_DIGEST
    moved, token = [r for r in reg.requests if r.url.host == "auth.test"]
    assert moved.url.path == "/moved" and token.url.path == "/token"
    assert token.url.params["account"] == "acme"
    assert token.headers["authorization"].startswith("Basic ") and reg.tokens_issued == 1


@pytest.mark.parametrize("moved_to", ["http://other.test/token", "http://auth.test:8080/token"])
async def test_a_redirect_from_the_realm_to_another_origin_gets_no_credentials(moved_to: str) -> None:
    """Redirected to another host (or another port over plain http): followed, but without the password, so
    this token server refuses (it wants credentials)."""
    reg = FakeRegistry(auth="bearer", anonymous_tokens=False, realm="http://auth.test/moved",
                       moved_token_to=moved_to)
    up = make(reg, Credentials("alice", "wonderland"))
    with pytest.raises(OciError) as e:
        await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert e.value.code == "UNAUTHORIZED"
    followed = [r for r in reg.requests if r.url.path == "/token"]
    assert followed and all("authorization" not in r.headers for r in followed)


async def test_a_token_redirect_loop_is_an_error() -> None:
    reg = FakeRegistry(auth="bearer", realm="http://auth.test/moved", moved_token_to="http://auth.test/moved")
    with pytest.raises(UpstreamProtocolError, match="redirects from token server"):
        await make(reg).get_manifest(REPO, "latest", [OCI_MANIFEST])


@pytest.mark.parametrize("realm", ["http://[::1", "ftp://auth.test/token", "http://999.1.1.1/token"])
async def test_a_realm_that_is_no_usable_url_is_unauthorized(realm: str) -> None:
    up = make(FakeRegistry(auth="bearer", realm=realm))
    with pytest.raises(OciError) as e:
        await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert e.value.code == "UNAUTHORIZED"


DEEP_JSON = b"[" * 15000 + b"]" * 15000


@pytest.mark.parametrize("body, needle", [
    (DEEP_JSON, "without a token"),  # json.loads raised RecursionError: a 500 to the client
    (b" " * (2 << 20), "more than"),  # read whole: a 400 MiB answer took the node to 935 MB
])
async def test_a_token_answer_that_is_no_token_is_unauthorized(body: bytes, needle: str) -> None:
    """Found in review (a live node against a misbehaving token server)."""
    up = make(FakeRegistry(auth="bearer", token_body=body))
    with pytest.raises(OciError, match=needle) as e:
        await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert e.value.code == "UNAUTHORIZED"
    await up.aclose()


async def test_a_token_lifetime_too_big_for_a_float_is_capped() -> None:
    """expires_in of 400 digits raised OverflowError in float(): a 500 (found in review)."""
    up = make(FakeRegistry(auth="bearer", expires_in=10**400))
    info, body = await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert body == MANIFEST
    await up.aclose()


async def test_an_error_body_nested_too_deep_is_just_an_error() -> None:
    """A 400 whose JSON nests 15,000 deep raised RecursionError past the error-code reader: a 500 for a tag
    list, a crashed download for a blob (found in review). Now it is an upstream error like any other."""
    up = Upstream(Settings(upstreams={"docker.io": REGISTRY}, upstream_retries=0),
                  transport=httpx.MockTransport(lambda request: respond(400, content=DEEP_JSON)),
                  credentials=CredentialStore({}), retry_backoff=0.001)
    with pytest.raises(OciError) as e:
        await up.get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert e.value.status == 502
    assert _media_type_of(DEEP_JSON) == ""  # the manifest's own media type, read when a HEAD had none
    await up.aclose()


async def test_token_expiry_fetches_a_new_token() -> None:
    reg = FakeRegistry(auth="bearer", expires_in=300)
    clock = FakeClock()
    up = make(reg, token_cache=TokenCache(clock=clock))
    await up.head_blob(REPO, BLOB_DIGEST)
    await up.head_blob(REPO, BLOB_DIGEST)
    assert reg.tokens_issued == 1
    clock.now += 301
    await up.head_blob(REPO, BLOB_DIGEST)
    assert reg.tokens_issued == 2
    # the expired token was not even tried: the request went out with the new one straight after the 401
    assert [r.headers.get("authorization") for r in reg.requests if r.url.host == "registry.test"][-1] == "Bearer tok2"


async def test_revoked_token_is_replaced_once() -> None:
    reg = FakeRegistry(auth="bearer")
    up = make(reg)
    await up.head_blob(REPO, BLOB_DIGEST)
    reg.valid_tokens.clear()  # the registry forgets it before its expiry
    assert await up.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
    assert reg.tokens_issued == 2


# --- Basic ---


async def test_basic_auth() -> None:
    reg = FakeRegistry(auth="basic")
    up = make(reg, Credentials("alice", "wonderland"))
    assert await up.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
    assert [r.headers.get("authorization") is not None for r in reg.requests] == [False, True]
    await up.head_blob(REPO, BLOB_DIGEST)  # Basic is now sent at once
    assert len(reg.requests) == 3
    with pytest.raises(OciError) as e:
        await make(reg, Credentials("alice", "nope")).head_blob(REPO, BLOB_DIGEST)
    assert e.value.code == "UNAUTHORIZED"
    with pytest.raises(OciError, match="none are configured"):
        await make(reg).head_blob(REPO, BLOB_DIGEST)


# --- redirects ---


async def test_redirect_to_another_host_drops_authorization() -> None:
    reg = FakeRegistry(auth="bearer", redirect_blobs_to="http://cdn.test")
    up = make(reg)
    assert await read_all(up) == BLOB
    cdn = [r for r in reg.requests if r.url.host == "cdn.test"]
    assert len(cdn) == 1 and "authorization" not in cdn[0].headers
    assert cdn[0].url.params["x"] == "1"
    assert reg.requests[-2].headers["authorization"].startswith("Bearer ")  # the registry did get it


async def test_redirect_to_the_same_host_keeps_authorization() -> None:
    reg = FakeRegistry(auth="basic", redirect_blobs_to=REGISTRY)
    up = make(reg, Credentials("alice", "wonderland"))
    assert await read_all(up) == BLOB
    assert reg.requests[-1].url.path.startswith("/signed/")
    assert "authorization" in reg.requests[-1].headers


async def test_redirect_loop_is_an_error() -> None:
    reg = FakeRegistry(redirect_loop=True)
    with pytest.raises(UpstreamProtocolError, match="redirects"):
        await read_all(make(reg))


async def test_a_url_in_an_error_carries_no_userinfo() -> None:
    """The CLI refuses credentials in an upstream URL; a URL that has them anyway (Settings built in code) still
    never reaches a message with its password."""
    reg = FakeRegistry(redirect_loop=True)
    settings = Settings(upstreams={"docker.io": "http://alice:pw-s3cret@registry.test"}, upstream_retries=0)
    up = Upstream(settings, transport=httpx.MockTransport(reg.handler), credentials=CredentialStore())
    with pytest.raises(UpstreamProtocolError, match="redirects for http://registry.test/v2/") as e:
        await read_all(up)
    assert "s3cret" not in str(e.value) and "alice" not in str(e.value)


# --- retries and errors ---


async def test_retries_on_5xx_and_connection_errors() -> None:
    reg = FakeRegistry(failures=[503, httpx.ConnectError("refused")])
    metrics = Metrics()
    up = make(reg, retries=2, metrics=metrics)
    assert (await up.get_manifest(REPO, "latest", [OCI_MANIFEST]))[1] == MANIFEST
    assert len(reg.requests) == 3
    value = metrics.registry.get_sample_value
    assert value("p2pcache_upstream_requests_total", {"method": "GET", "kind": "manifest", "status": "503"}) == 1
    assert value("p2pcache_upstream_requests_total", {"method": "GET", "kind": "manifest", "status": "error"}) == 1
    assert value("p2pcache_upstream_requests_total", {"method": "GET", "kind": "manifest", "status": "200"}) == 1


async def test_retries_give_up_with_upstream_unavailable() -> None:
    reg = FakeRegistry(failures=[500, 502, 503, 504])
    with pytest.raises(UpstreamUnavailable, match="after 3 attempts"):
        await make(reg, retries=2).head_blob(REPO, BLOB_DIGEST)
    assert len(reg.requests) == 3


async def test_429_is_passed_through_not_retried() -> None:
    reg = FakeRegistry(rate_limited=True)
    with pytest.raises(OciError) as e:
        await make(reg).get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert e.value.code == "TOOMANYREQUESTS" and e.value.status == 429
    assert e.value.headers["Retry-After"] == "17"
    assert len(reg.requests) == 1


async def test_not_found_and_denied() -> None:
    reg = FakeRegistry()
    up = make(reg)
    with pytest.raises(OciError) as e:
        await up.get_manifest(REPO, "nope", [OCI_MANIFEST])
    assert e.value.code == "MANIFEST_UNKNOWN"
    with pytest.raises(OciError) as e:
        await up.head_blob(REPO, sha(b"other"))
    assert e.value.code == "BLOB_UNKNOWN"
    reg.failures = [403]
    with pytest.raises(OciError) as e:
        await up.head_blob(REPO, BLOB_DIGEST)
    assert e.value.code == "DENIED"


async def test_accept_is_forwarded() -> None:
    reg = FakeRegistry()
    up = make(reg)
    # the fake, like the distribution registry, 404s an OCI manifest when Accept does not admit it
    with pytest.raises(OciError):
        await up.get_manifest(REPO, "latest", ["application/vnd.docker.distribution.manifest.v2+json"])
    await up.get_manifest(REPO, "latest", ["application/vnd.docker.distribution.manifest.v2+json", OCI_MANIFEST])
    assert reg.requests[-1].headers["accept"] == f"application/vnd.docker.distribution.manifest.v2+json, {OCI_MANIFEST}"
    await up.get_manifest(REPO, "latest", [])  # none given: a default list that includes OCI
    await up.get_manifest(REPO, "latest", ["bad\r\nX-Injected: 1"])  # unusable items are dropped
    assert "X-Injected" not in reg.requests[-1].headers


# --- manifests are verified ---


async def test_manifest_digest_mismatch() -> None:
    reg = FakeRegistry(lie_about_manifest=True)
    up = make(reg)
    with pytest.raises(OciError) as e:
        await up.get_manifest(REPO, MANIFEST_DIGEST, [OCI_MANIFEST])
    assert e.value.code == "DIGEST_INVALID"
    reg2 = FakeRegistry(manifest_header_digest=sha(b"something else"))
    with pytest.raises(OciError) as e:
        await make(reg2).get_manifest(REPO, "latest", [OCI_MANIFEST])  # by tag: header contradicts body
    assert e.value.code == "DIGEST_INVALID"


async def test_encoded_manifest_is_refused() -> None:
    reg = FakeRegistry(gzip_manifest=True)
    with pytest.raises(UpstreamProtocolError, match="Content-Encoding"):
        await make(reg).get_manifest(REPO, "latest", [OCI_MANIFEST])
    assert reg.requests[0].headers["accept-encoding"] == "identity"


async def test_head_manifest() -> None:
    up = make(FakeRegistry())
    info = await up.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert (info.digest, info.media_type, info.size) == (MANIFEST_DIGEST, OCI_MANIFEST, len(MANIFEST))


async def test_invalid_refs_never_reach_the_network() -> None:
    reg = FakeRegistry()
    up = make(reg)
    for call in (
        lambda: up.get_manifest(REPO, "../x", []),
        lambda: up.get_manifest(REPO, "sha256:xyz", []),
        lambda: up.head_blob(REPO, "sha256:../../etc"),
        lambda: up.head_blob(Repo("docker.io", "../x"), BLOB_DIGEST),
    ):
        with pytest.raises(OciError):
            await call()
    assert reg.requests == []


# --- Range ---


@pytest.mark.parametrize("mode", ["honour", "ignore"])
async def test_range_honoured_or_ignored(mode: str) -> None:
    reg = FakeRegistry(range_mode=mode)
    metrics = Metrics()
    up = make(reg, metrics=metrics)
    offset = 1_500_000
    assert await read_all(up, offset) == BLOB[offset:]
    assert reg.requests[-1].headers["range"] == f"bytes={offset}-"
    received = metrics.registry.get_sample_value("p2pcache_upstream_bytes_total")
    assert received == (len(BLOB) - offset if mode == "honour" else len(BLOB))


@pytest.mark.parametrize("mode", ["honour", "ignore"])
async def test_range_end_is_asked_for_and_kept(mode: str) -> None:
    # A swarm node fetching only the pieces nobody else has asks for them alone; a registry that ignores the
    # Range is cut off at the end by us.
    reg = FakeRegistry(range_mode=mode)
    metrics = Metrics()
    up = make(reg, metrics=metrics)
    offset, end = 1_500_000, 2_000_000
    async with up.open_blob(REPO, BLOB_DIGEST, offset, end) as blob:
        assert (blob.size, blob.offset, blob.end) == (len(BLOB), offset, end)
        got = b"".join([c async for c in blob])
    assert got == BLOB[offset:end]
    assert reg.requests[-1].headers["range"] == f"bytes={offset}-{end - 1}"
    if mode == "honour":
        assert metrics.registry.get_sample_value("p2pcache_upstream_bytes_total") == end - offset
    async with up.open_blob(REPO, BLOB_DIGEST, offset, len(BLOB) + 10) as blob:  # beyond the blob: its end
        assert b"".join([c async for c in blob]) == BLOB[offset:]
    with pytest.raises(ValueError):
        async with up.open_blob(REPO, BLOB_DIGEST, offset, offset):
            pass


@pytest.mark.parametrize("mode", ["wrong", "no-total"])
async def test_inconsistent_content_range_is_an_error(mode: str) -> None:
    reg = FakeRegistry(range_mode=mode)
    with pytest.raises(UpstreamProtocolError):
        await read_all(make(reg), 1000)


async def test_offset_past_the_end() -> None:
    with pytest.raises(OciError) as e:
        await read_all(make(FakeRegistry()), len(BLOB) + 1)
    assert e.value.code == "RANGE_INVALID"
    with pytest.raises(ValueError):
        await read_all(make(FakeRegistry()), -1)


async def test_broken_body_is_resumed_with_range() -> None:
    reg = FakeRegistry(break_body_at=[1_000_000, 10])
    assert await read_all(make(reg, retries=2)) == BLOB
    blob_gets = [r for r in reg.requests if "/blobs/" in r.url.path]
    assert [r.headers.get("range") for r in blob_gets] == [None, "bytes=1000000-", "bytes=1000010-"]


async def test_broken_body_with_range_ignored_is_resumed() -> None:
    # The resume's answer ignores Range (200, whole blob): the bytes already handed out are skipped, not repeated.
    reg = FakeRegistry(break_body_at=[1_000_000], range_mode="ignore")
    up = make(reg, retries=2)
    assert await read_all(up) == BLOB
    blob_gets = [r for r in reg.requests if "/blobs/" in r.url.path]
    assert [r.headers.get("range") for r in blob_gets] == [None, "bytes=1000000-"]


async def test_a_stalled_body_is_left_to_the_caller_to_resume() -> None:
    """Resumed here and again by fetch.py's loop, one upstream that stalls after its headers held a client
    through 16 read timeouts, 8.7 minutes (found in review). A stall ends the response; fetch.py resumes."""
    reg = FakeRegistry(break_body_at=[1_000_000, 1_000_000], stall_body=True)
    with pytest.raises(UpstreamUnavailable, match="ReadTimeout: timed out at byte 1000000"):
        await read_all(make(reg, retries=3))
    assert sum(1 for r in reg.requests if "/blobs/" in r.url.path) == 1


async def test_broken_body_gives_up_after_retries() -> None:
    reg = FakeRegistry(break_body_at=[5, 5, 5])
    with pytest.raises(UpstreamUnavailable):
        await read_all(make(reg, retries=1))


async def test_a_body_without_content_length_takes_the_size_from_a_head() -> None:
    """Chunked or HTTP/1.0 to the close, as a proxy or CDN may answer (skopeo pulls these): the size comes
    from a HEAD of the blob."""
    reg = FakeRegistry(unsized=["whole", "whole"])
    assert await read_all(make(reg)) == BLOB
    # the first GET is closed before the HEAD (it must not hold a pooled connection meanwhile), then sent again
    assert reg.paths() == [f"GET registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}",
                           f"HEAD registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}",
                           f"GET registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}"]


async def test_a_body_without_content_length_that_ends_early_is_resumed() -> None:
    reg = FakeRegistry(unsized=["whole", "cut", "whole"])
    assert await read_all(make(reg)) == BLOB
    blob_gets = [r for r in reg.requests if r.method == "GET"]
    assert [r.headers.get("range") for r in blob_gets] == [None, None, "bytes=600000-"]


@pytest.mark.parametrize("plan", [["whole", "long"], ["whole", "cut", "long"]])
async def test_a_body_without_content_length_longer_than_the_blob_fails_before_its_last_bytes(
        plan: list[str]) -> None:
    """The bytes up to the size are right, more follow: an error, and the blob's last bytes are never handed
    on, so nothing downstream completes (and stores) a blob from such a body."""
    reg = FakeRegistry(unsized=plan)
    got = 0
    with pytest.raises(UpstreamProtocolError, match="more bytes than its size"):
        async with make(reg).open_blob(REPO, BLOB_DIGEST) as blob:
            async for chunk in blob:
                got += len(chunk)
    assert got < len(BLOB)


async def test_many_bodies_without_content_length_at_once_do_not_exhaust_the_connection_pool() -> None:
    """Each unsized GET asked its HEAD while it still held its pooled connection: 64 at once (the pool's size)
    held every connection, each HEAD waited for one for ever, and nothing reached the upstream any more (found
    in review, with a real node behind a chunked proxy)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    blobs = {}
    for i in range(65):
        b = (b"blob %d " % i) * 100
        blobs["sha256:" + hashlib.sha256(b).hexdigest()] = b

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(blobs[self.path.rsplit("/", 1)[-1]])))
            self.end_headers()

        def do_GET(self) -> None:
            b = blobs[self.path.rsplit("/", 1)[-1]]
            time.sleep(0.3)  # a streaming proxy's headers come a moment later: every GET is open at once
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(b), b))
            self.wfile.flush()

    class Server(ThreadingHTTPServer):
        # 64 connections at once: socketserver's backlog of 5 dropped SYNs under load, and the connects' retries
        # (1 s, 3 s, 7 s...) left two downloads unfinished at the 20 s mark (CI, a loaded machine).
        request_queue_size = 128

    srv = Server(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    up = Upstream(Settings(upstreams={"docker.io": f"http://127.0.0.1:{srv.server_address[1]}"},
                           upstream_retries=0))
    done = []

    async def one(digest: str) -> None:
        async with up.open_blob(REPO, digest) as blob:
            assert b"".join([c async for c in blob]) == blobs[digest]
        done.append(digest)

    try:
        with trio.move_on_after(20):
            async with trio.open_nursery() as nursery:
                for digest in list(blobs)[:64]:
                    nursery.start_soon(one, digest)
        assert len(done) == 64
    finally:
        await up.aclose()
        srv.shutdown()
        srv.server_close()


async def test_fast_path_is_enabled() -> None:
    from httpcore._async.http11 import AsyncHTTP11Connection

    make(FakeRegistry())
    assert AsyncHTTP11Connection.READ_NUM_BYTES >= 1 << 20


def test_missing_credentials_file_is_a_config_error(tmp_path) -> None:
    from p2pcache.config import ConfigError

    with pytest.raises(ConfigError, match="cannot read"):
        Upstream(Settings(credentials=tmp_path / "absent"))


_: Callable[..., object] = make  # keep the helper's signature visible to type checkers


# --- real sockets: the stall timeout (MockTransport has no timeouts) ---


async def test_stalled_body_times_out_over_real_sockets_and_is_left_to_the_caller(nursery) -> None:
    """The read timeout ends a stalled body within its time; the caller (fetch.py's download loop) resumes it.
    Resumed here as well, one stall cost up to 16 timeouts (found in review)."""
    import trio

    data = bytes(range(256)) * 4096  # 1 MiB
    seen: list[str] = []

    async def serve(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            got = await stream.receive_some(65536)
            if not got:
                return
            head += got
        rng = next((line.split(b"=", 1)[1].rstrip(b"-").decode() for line in head.split(b"\r\n")
                    if line.lower().startswith(b"range:")), None)
        seen.append(rng or "")
        if rng is None:  # the first answer sends half the body, then stalls
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
            await stream.send_all(data[: len(data) // 2])
            await trio.sleep(30)
            return
        start = int(rng)
        await stream.send_all(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n"
                              b"Content-Range: bytes %d-%d/%d\r\n\r\n" % (len(data) - start, start, len(data) - 1,
                                                                           len(data)))
        await stream.send_all(data[start:])

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    settings = Settings(upstreams={"docker.io": f"http://127.0.0.1:{port}"}, upstream_read_timeout=0.3,
                        upstream_retries=1)
    up = Upstream(settings, retry_backoff=0.001)
    digest = sha(data)
    got = bytearray()
    with trio.fail_after(10), pytest.raises(UpstreamUnavailable, match="ReadTimeout"):
        async with up.open_blob(REPO, digest) as blob:
            async for c in blob:
                got += c
    await up.aclose()
    assert got == data[: len(got)] and 0 < len(got) <= len(data) // 2
    assert seen == [""]


async def test_an_untrusted_certificate_is_reported_with_its_reason_and_not_retried(
        nursery, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """A certificate that fails verification is no outage: the log and the error say why (httpx over trio says
    only "ConnectError"), and it is not retried, since the same certificate fails the same way again."""
    import logging

    import trio

    from tests.selfsigned import self_signed_server

    server_tls, cert = self_signed_server(tmp_path)
    handshakes = 0

    async def serve(stream: trio.SSLStream) -> None:
        nonlocal handshakes
        handshakes += 1
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            pass  # the client refused the certificate

    listeners = await nursery.start(functools.partial(trio.serve_ssl_over_tcp, serve, 0, server_tls,
                                                      host="127.0.0.1"))
    port = listeners[0].transport_listener.socket.getsockname()[1]
    up = Upstream(Settings(upstreams={"docker.io": f"https://127.0.0.1:{port}"}, upstream_retries=3),
                  retry_backoff=0.001)
    caplog.set_level(logging.INFO, logger="p2pcache.oci.upstream")
    with trio.fail_after(10), pytest.raises(UpstreamUnavailable, match="certificate verify failed: self"):
        await up.head_blob(REPO, BLOB_DIGEST)
    await up.aclose()
    assert handshakes == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "p2pcache.oci.upstream"]
    assert len(lines) == 1 and "certificate verify failed" in lines[0] and "--upstream-ca" in lines[0], lines


# --- tag lists ---


def _paginating(tags: list[str], body: bytes | None = None):
    """A registry that pages its tag list as the distribution spec says (Docker Hub, distribution 3): sorted,
    `n` and `last` honoured, a Link to the next page."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v2/{REPO.name}/tags/list"
        if body is not None:
            return httpx.Response(200, stream=Body(body))
        n = int(request.url.params.get("n", len(tags)))
        last = request.url.params.get("last")
        rest = [t for t in sorted(tags) if last is None or t > last]
        page, headers = rest[:n], {}
        if len(rest) > n:
            headers["Link"] = f'</v2/{REPO.name}/tags/list?last={page[-1]}&n={n}>; rel="next"'
        return httpx.Response(200, stream=Body(json.dumps({"name": REPO.name, "tags": page}).encode()),
                              headers=headers)

    settings = Settings(upstreams={"docker.io": REGISTRY}, upstream_retries=0)
    return Upstream(settings, transport=httpx.MockTransport(handler), credentials=CredentialStore())


async def test_tag_list_pages_and_their_links() -> None:
    up = _paginating(["b", "a", "c", "d"])
    assert await up.list_tags(REPO) == (["a", "b", "c", "d"], None)
    assert await up.list_tags(REPO, 3) == (["a", "b", "c"], (3, "c"))
    assert await up.list_tags(REPO, 3, "c") == (["d"], None)


@pytest.mark.parametrize("body,problem", [
    (b"not json", "not a JSON object"), (b"[1, 2]", "not a JSON object"), (b'{"tags": "x"}', "no list of tags"),
    (b'{"tags": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "not a JSON object"),  # a RecursionError, uncaught
])
async def test_a_broken_tag_list_is_a_protocol_error(body: bytes, problem: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=problem):
        await _paginating([], body=body).list_tags(REPO)


async def test_tags_that_are_no_tags_are_left_out() -> None:
    body = b'{"tags": ["ok", "../etc", "", 7, null, "' + b"x" * 200 + b'"]}'
    assert await _paginating([], body=body).list_tags(REPO) == (["ok"], None)


async def test_a_link_with_a_page_size_of_thousands_of_digits_keeps_its_last_but_not_its_n() -> None:
    from p2pcache.oci.upstream import _next_page

    assert _next_page(f'</v2/x/tags/list?n={"9" * 4400}&last=b>; rel="next"') == (None, "b")
