"""Upstream pulls from the real docker-registry behind Basic (htpasswd) and Bearer (token server) auth.

Credentials come from a file in both supported formats, as a user would configure them; wrong or missing
credentials must come out as OciError UNAUTHORIZED, not as a crash or an "upstream unavailable".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pcache.config import Settings
from p2pcache.metrics import Metrics
from p2pcache.oci.errors import OciError
from p2pcache.oci.reference import Repo
from p2pcache.oci.upstream import Upstream

from .auth_registry import AuthRegistry, htpasswd_registry, token_registry
from .harness import images as im

pytestmark = pytest.mark.integration

NAME = "library/authtest"
REPO = Repo("docker.io", NAME)


@dataclass
class Pushed:
    reg: AuthRegistry
    image: im.Image
    dir: Path


def _image() -> im.Image:
    # A layer of a few MiB, so the blob streams in several 1 MiB chunks and Range has room to work.
    return im.make_image([im.random_layer(3 << 20)])


@pytest.fixture(scope="module")
def basic_reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    d = tmp_path_factory.mktemp("basic")
    with htpasswd_registry(d) as reg:
        image = _image()
        reg.push(NAME, "1", image)
        yield Pushed(reg, image, d)


@pytest.fixture(scope="module")
def token_reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    d = tmp_path_factory.mktemp("token")
    with token_registry(d) as reg:
        image = _image()
        reg.push(NAME, "1", image)
        yield Pushed(reg, image, d)


def upstream_for(reg: AuthRegistry, credentials: Path | None, metrics: Metrics | None = None) -> Upstream:
    settings = Settings(upstreams={"docker.io": reg.url}, credentials=credentials, upstream_retries=1)
    return Upstream(settings, metrics)


async def pull_and_check(up: Upstream, image: im.Image) -> None:
    accept = [im.OCI_MANIFEST, im.OCI_INDEX]
    info, body = await up.get_manifest(REPO, "1", accept)
    assert body == image.manifest.data
    assert info.digest == image.digest and info.media_type == im.OCI_MANIFEST and info.size == len(body)
    head = await up.head_manifest(REPO, "1", accept)
    assert head == info
    by_digest, body2 = await up.get_manifest(REPO, image.digest, accept)
    assert body2 == body and by_digest.digest == image.digest
    layer = image.layers[0]
    assert await up.head_blob(REPO, layer.digest) == layer.size
    async with up.open_blob(REPO, layer.digest) as blob:
        assert blob.size == layer.size and blob.offset == 0
        data = b"".join([chunk async for chunk in blob])
    assert data == layer.data
    offset = layer.size // 3 + 7
    async with up.open_blob(REPO, layer.digest, offset) as blob:
        assert blob.offset == offset
        assert b"".join([chunk async for chunk in blob]) == layer.data[offset:]


# --- Basic (htpasswd) ---


async def test_basic_auth_pull_with_toml_credentials(basic_reg: Pushed) -> None:
    creds = basic_reg.reg.write_credentials(basic_reg.dir / "creds.toml")  # filed under host:port
    metrics = Metrics()
    up = upstream_for(basic_reg.reg, creds, metrics)
    try:
        await pull_and_check(up, basic_reg.image)
    finally:
        await up.aclose()
    # the first request met the challenge; after that Basic went along at once
    counts = basic_reg.reg.registry.counts()
    assert counts[("GET", f"/v2/{NAME}/manifests/1")] >= 1
    got = metrics.registry.get_sample_value
    assert got("p2pcache_upstream_requests_total", {"method": "GET", "kind": "manifest", "status": "401"}) == 1
    assert got("p2pcache_upstream_bytes_total") >= basic_reg.image.layers[0].size


async def test_basic_auth_wrong_or_missing_credentials(basic_reg: Pushed) -> None:
    creds = basic_reg.reg.write_credentials(basic_reg.dir / "wrong.json", fmt="docker", password="nope")
    for path in (creds, None):
        up = upstream_for(basic_reg.reg, path)
        try:
            with pytest.raises(OciError) as e:
                await up.get_manifest(REPO, "1", [im.OCI_MANIFEST])
            assert e.value.code == "UNAUTHORIZED"
            with pytest.raises(OciError) as e:
                async with up.open_blob(REPO, basic_reg.image.layers[0].digest):
                    pass
            assert e.value.code == "UNAUTHORIZED"
        finally:
            await up.aclose()


# --- Bearer (token server) ---


async def test_token_auth_pull_with_docker_config_credentials(token_reg: Pushed) -> None:
    # Docker's config.json, with Hub's historical key: it must apply to the namespace "docker.io".
    creds = token_reg.reg.write_credentials(token_reg.dir / "config.json", fmt="docker",
                                            key="https://index.docker.io/v1/")
    tokens = token_reg.reg.token_server
    assert tokens is not None
    before = len(tokens.requests)
    up = upstream_for(token_reg.reg, creds)
    try:
        await pull_and_check(up, token_reg.image)
    finally:
        await up.aclose()
    issued = tokens.requests[before:]
    # one token for the whole pull: cached per (registry, scope) and reused by every later request
    assert [(r.user, r.scopes, r.status) for r in issued] == [("bob", [f"repository:{NAME}:pull"], 200)]


async def test_token_auth_wrong_or_missing_credentials(token_reg: Pushed) -> None:
    wrong = token_reg.reg.write_credentials(token_reg.dir / "wrong.toml", password="nope")
    for path in (wrong, None):  # the token server refuses both (no anonymous pulls here)
        up = upstream_for(token_reg.reg, path)
        try:
            with pytest.raises(OciError) as e:
                await up.head_manifest(REPO, "1", [im.OCI_MANIFEST])
            assert e.value.code == "UNAUTHORIZED"
        finally:
            await up.aclose()


async def test_token_auth_anonymous_pull(tmp_path: Path) -> None:
    """Like Docker Hub: no credentials configured, the token server hands out pull-only tokens."""
    with token_registry(tmp_path, allow_anonymous=True) as reg:
        image = im.small_image("anon")
        for blob in image.blobs:  # the piecewise helpers, as a fixture would push odd things
            assert reg.push_blob(NAME, blob.data) == blob.digest
        assert reg.push_manifest(NAME, "2", image.manifest.data, im.OCI_MANIFEST) == image.digest
        up = upstream_for(reg, None)
        try:
            info, body = await up.get_manifest(REPO, "2", [im.OCI_MANIFEST])
            assert info.digest == image.digest
            async with up.open_blob(REPO, image.config.digest) as blob:
                assert hashlib.sha256(b"".join([c async for c in blob])).hexdigest() == image.config.digest[7:]
        finally:
            await up.aclose()
        assert reg.token_server is not None
        assert [(r.user, r.status) for r in reg.token_server.requests if r.user is None] == [(None, 200)]


async def test_token_realm_with_a_query_of_its_own(tmp_path: Path) -> None:
    """The registry announces realm="http://…/token?account=acme": the token request keeps `account` and adds
    scope and service to it (Docker's and containers/image's behaviour); without `account` the token server
    answers 400."""
    with token_registry(tmp_path, realm_params={"account": "acme"}) as reg:
        image = im.small_image("realmq")
        reg.push(NAME, "1", image)
        creds = reg.write_credentials(tmp_path / "creds.toml")
        up = upstream_for(reg, creds)
        try:
            info, body = await up.get_manifest(REPO, "1", [im.OCI_MANIFEST])
            assert info.digest == image.digest and body == image.manifest.data
        finally:
            await up.aclose()
        assert reg.token_server is not None
        assert [(r.user, r.scopes, r.status) for r in reg.token_server.requests] == [
            ("bob", [f"repository:{NAME}:pull"], 200)]


@pytest.mark.parametrize("fmt", ["toml", "docker-identitytoken"])
async def test_a_token_realm_that_redirects_is_followed(tmp_path: Path, fmt: str) -> None:
    """The registry announces realm="http://…/oldtoken", which answers 307 to /token (a moved endpoint): both the
    GET with Basic credentials and the OAuth2 POST with a refresh token follow it to the same server."""
    with token_registry(tmp_path, realm_path="/oldtoken") as reg:
        image = im.small_image("moved")
        reg.push(NAME, "1", image)
        creds = reg.write_credentials(tmp_path / "creds", fmt=fmt)
        up = upstream_for(reg, creds)
        try:
            info, _ = await up.get_manifest(REPO, "1", [im.OCI_MANIFEST])
            assert info.digest == image.digest
        finally:
            await up.aclose()
        assert reg.token_server is not None
        assert [(r.user, r.status) for r in reg.token_server.requests] == [("bob", 200)]
