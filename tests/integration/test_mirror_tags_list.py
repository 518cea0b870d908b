"""`/v2/<name>/tags/list` through the node: the upstream's list (the real docker-registry's), page by page, to real
skopeo and to a plain HTTP client, with the node's own names in every Link."""

from __future__ import annotations

import json

import httpx
import pytest

from .harness import images as im
from .harness.clients import run
from .harness.util import require_binary

pytestmark = pytest.mark.integration

TAGS = ["1", "1.1", "2", "latest", "v3-rc_1"]


@pytest.fixture
def tagged(reg, ghcr_upstream, make_node):
    """A registry holding library/app under five tags, and a node in front of it (ghcr.io: the session's)."""
    image = im.small_image("tags-app")
    for tag in TAGS:
        im.push(reg.url, "library/app", tag, image)
    return reg, make_node({"docker.io": reg.url, "ghcr.io": ghcr_upstream.url})


def test_skopeo_lists_the_upstreams_tags_through_the_node(tagged):
    reg, node = tagged
    mark = reg.log_mark()
    out = run([require_binary("skopeo"), "list-tags", "--tls-verify=false",
               f"docker://{node.host}/library/app"]).stdout
    assert sorted(json.loads(out)["Tags"]) == sorted(TAGS)
    assert reg.count("GET", "/v2/library/app/tags/list", since=mark) >= 1  # asked upstream, not made up


def test_pages_follow_the_nodes_own_links(tagged):
    reg, node = tagged
    seen: list[str] = []
    target: str | None = "/v2/docker.io/library/app/tags/list?n=2"
    pages = 0
    with httpx.Client(base_url=node.url, timeout=30) as c:
        while target is not None:
            r = c.get(target)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/json"
            doc = r.json()
            assert doc["name"] == "docker.io/library/app" and len(doc["tags"]) <= 2
            seen += doc["tags"]
            pages += 1
            link = r.headers.get("link")
            if link is None:
                target = None
            else:
                assert link.startswith("</v2/docker.io/library/app/tags/list?") and link.endswith('>; rel="next"')
                target = link[1:link.index(">")]
    assert seen == sorted(TAGS) and pages == 3
    # The whole list in one page without n, and the rest of it after `last`.
    with httpx.Client(base_url=node.url, timeout=30) as c:
        assert c.get("/v2/library/app/tags/list").json()["tags"] == sorted(TAGS)
        assert c.get("/v2/library/app/tags/list", params={"last": "2"}).json()["tags"] == ["latest", "v3-rc_1"]


def test_other_namespaces_and_errors(tagged, ghcr_upstream):
    _, node = tagged
    with httpx.Client(base_url=node.url, timeout=30) as c:
        r = c.get("/v2/org/app/tags/list", params={"ns": "ghcr.io"})  # containerd's form: the ghcr.io upstream's
        assert r.status_code == 200 and r.json()["tags"] == ["1"]
        r = c.get("/v2/library/nothing/tags/list")
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        for bad in ({"n": "0"}, {"n": "-1"}, {"n": "x"}, {"n": "100001"}, {"n": "²"}):
            r = c.get("/v2/library/app/tags/list", params=bad)
            assert r.status_code == 400 and r.json()["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID", bad
        r = c.get("/v2/library/app/tags/list", params={"last": "../x"})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "NAME_INVALID"
        r = c.get("/v2/UPPER/app/tags/list")
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "NAME_INVALID"
        r = c.get("/v2/_catalog")
        assert r.status_code == 405 and r.json()["errors"][0]["code"] == "UNSUPPORTED"


def test_upstream_down_is_503(tagged):
    reg, node = tagged
    reg.stop()
    r = httpx.get(node.url + "/v2/library/app/tags/list", timeout=60)
    assert r.status_code == 503 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
