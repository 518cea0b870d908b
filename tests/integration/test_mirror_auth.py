"""A node whose upstream demands credentials (Bearer tokens from a token server, or Basic): clients pull through
the node without credentials of their own; wrong or missing credentials reach the client as UNAUTHORIZED.
The registries come from auth_registry.py."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from .auth_registry import AuthRegistry, htpasswd_registry, token_registry
from .harness import images as im
from .harness.clients import verify_dir_blobs

pytestmark = pytest.mark.integration

NAME = "library/private"


@pytest.fixture(scope="module", params=["token", "basic"])
def auth_upstream(request, tmp_path_factory) -> Iterator[tuple[AuthRegistry, im.Image]]:
    d = tmp_path_factory.mktemp(f"auth-{request.param}")
    cm = token_registry(d) if request.param == "token" else htpasswd_registry(d)
    with cm as reg:
        image = im.small_image(f"private-{request.param}", docker=request.param == "basic")
        reg.push(NAME, "1", image)
        yield reg, image


def test_pull_through_node_with_credentials(auth_upstream, make_node, skopeo_via, tmp_path):
    reg, image = auth_upstream
    # Token: Docker's config.json filed under the namespace; Basic: TOML filed under the upstream's host:port.
    if reg.kind == "token":
        creds = reg.write_credentials(tmp_path / "config.json", fmt="docker", key="docker.io")
    else:
        creds = reg.write_credentials(tmp_path / "creds.toml")
    node = make_node({"docker.io": reg.url}, args=["--credentials", str(creds)])
    out = tmp_path / "out"
    skopeo_via(node).copy(f"docker://docker.io/{NAME}:1", out)
    assert {b.digest for b in image.blobs} <= set(verify_dir_blobs(out))
    assert (out / "manifest.json").read_bytes() == image.manifest.data
    if reg.token_server is not None:
        assert any(r.user == reg.username and r.status == 200 for r in reg.token_server.requests)
    # The tag list goes through the same credentials (its own request, same pull scope).
    r = httpx.get(f"{node.url}/v2/{NAME}/tags/list", timeout=30)
    assert r.status_code == 200 and r.json() == {"name": NAME, "tags": ["1"]}, r.text


def test_an_identity_token_from_docker_login_is_traded_for_access_tokens(make_node, skopeo_via, tmp_path):
    """config.json's "identitytoken" (an OAuth2 refresh token): the node POSTs it to the realm, as docker does;
    it was ignored, and the GET with the empty password that came with it was refused (found in review)."""
    with token_registry(tmp_path / "reg") as reg:
        image = im.small_image("private-identity")
        reg.push(NAME, "1", image)
        creds = reg.write_credentials(tmp_path / "config.json", fmt="docker-identitytoken", key="docker.io")
        node = make_node({"docker.io": reg.url}, args=["--credentials", str(creds)])
        out = tmp_path / "out"
        skopeo_via(node).copy(f"docker://docker.io/{NAME}:1", out)
        assert {b.digest for b in image.blobs} <= set(verify_dir_blobs(out))
        assert reg.token_server is not None
        assert any(r.user == reg.username and r.status == 200 for r in reg.token_server.requests)


@pytest.mark.parametrize("which", ["wrong", "none"])
def test_wrong_or_missing_credentials_are_unauthorized(auth_upstream, make_node, skopeo_via, tmp_path, which):
    reg, image = auth_upstream
    args = []
    if which == "wrong":
        creds = reg.write_credentials(tmp_path / "wrong.toml", password="not-the-password")
        args = ["--credentials", str(creds)]
    node = make_node({"docker.io": reg.url}, args=args)
    with httpx.Client(base_url=node.url, timeout=30) as c:
        r = c.get(f"/v2/{NAME}/manifests/1", headers={"Accept": ",".join(im.ALL_MANIFEST_TYPES)})
        assert r.status_code == 401, (r.status_code, r.text)
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        r = c.get(f"/v2/{NAME}/blobs/{image.layers[0].digest}")
        assert r.status_code == 401 and r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        r = c.get(f"/v2/{NAME}/tags/list")
        assert r.status_code == 401 and r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    p = skopeo_via(node).copy(f"docker://docker.io/{NAME}:1", tmp_path / "out", check=False)
    assert p.returncode != 0
    assert b"unauthorized" in p.stderr.lower(), p.stderr  # what the user is told
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert node.store_files(image.layers[0].digest) == []
