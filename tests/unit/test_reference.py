"""The OCI grammars refuse traversal and junk, and resolve_repo maps request paths the way clients mean them."""

from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcache.oci.errors import OciError
from p2pcache.oci.reference import (
    Repo,
    check_name,
    check_ns,
    check_tag,
    is_digest,
    parse_digest,
    resolve_repo,
)

GOOD_DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "name",
    ["alpine", "library/alpine", "a/b/c", "my-org/my_app", "a__b", "a---b", "a.b/c.d", "x0/1y", "a" * 255],
)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "", "..", "a/..", "../etc/passwd", "a/../b", "%2e%2e/a", "a/%2e%2e", "Alpine", "library/Alpine",
        "a//b", "/a", "a/", "a b", "a\n", "a\x00b", "-a", "a-", "a___b", "a._b", ".a", "a.", "_a",
        "a" * 256, "ghcr.io:443/x", "a\\b", "é",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(OciError) as e:
        check_name(name)
    assert e.value.code == "NAME_INVALID"
    assert e.value.status == 400


def test_non_string_name_is_an_error_not_a_crash() -> None:
    with pytest.raises(OciError):
        check_name(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("tag", ["latest", "1.0", "v1.2.3-rc1", "_x", "A" * 128, "3.19"])
def test_valid_tags(tag: str) -> None:
    assert check_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "A" * 129, "a:b", "a/b", "..", "x\n", "a b"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(OciError) as e:
        check_tag(tag)
    assert e.value.code == "NAME_INVALID"


def test_digests() -> None:
    assert parse_digest(GOOD_DIGEST) == GOOD_DIGEST
    for bad in [
        "sha256:" + "AB" * 32,  # upper case hex
        "sha256:" + "ab" * 31,  # short
        "sha256:" + "ab" * 33,  # long
        "sha256:" + "ag" * 32,  # not hex
        GOOD_DIGEST + "\n",
        "sha512:" + "ab" * 64,  # other algorithm
        "ab" * 32,
        "sha256:../../etc",
        "",
    ]:
        with pytest.raises(OciError) as e:
            parse_digest(bad)
        assert e.value.code == "DIGEST_INVALID", bad
    assert "only sha256" in str(_err(parse_digest, "sha512:" + "ab" * 64))


def _err(fn, *args) -> OciError:
    with pytest.raises(OciError) as e:
        fn(*args)
    return e.value


def test_is_digest_tells_which_grammar_applies() -> None:
    assert is_digest(GOOD_DIGEST)
    assert is_digest("sha256:bad")  # still a digest reference: parse_digest gives the precise error
    assert not is_digest("latest")


def test_error_messages_are_short() -> None:
    e = _err(check_name, "A" * 10_000)
    assert len(e.message) < 200


@pytest.mark.parametrize(
    ("path", "ns_query", "want"),
    [
        ("alpine", None, Repo("docker.io", "library/alpine")),
        ("library/alpine", None, Repo("docker.io", "library/alpine")),
        ("org/app", None, Repo("docker.io", "org/app")),
        ("ghcr.io/org/app", None, Repo("ghcr.io", "org/app")),
        ("localhost:5000/app", None, Repo("localhost:5000", "app")),
        ("localhost/app", None, Repo("localhost", "app")),
        ("127.0.0.1:5000/a/b", None, Repo("127.0.0.1:5000", "a/b")),
        ("docker.io/alpine", None, Repo("docker.io", "library/alpine")),
        ("index.docker.io/alpine", None, Repo("docker.io", "library/alpine")),
        ("library/alpine", "docker.io", Repo("docker.io", "library/alpine")),
        ("alpine", "docker.io", Repo("docker.io", "library/alpine")),
        ("org/app", "ghcr.io", Repo("ghcr.io", "org/app")),
        ("app", "quay.io", Repo("quay.io", "app")),  # only Docker Hub has "library/"
        ("[::1]:5000/app", None, Repo("[::1]:5000", "app")),
    ],
)
def test_resolve_repo(path: str, ns_query: str | None, want: Repo) -> None:
    assert resolve_repo(path, ns_query, "docker.io") == want


def test_resolve_repo_default_ns() -> None:
    assert resolve_repo("app", None, "registry.local:5000") == Repo("registry.local:5000", "app")


@pytest.mark.parametrize(
    ("path", "ns_query"),
    [
        ("../x", None), ("ghcr.io/../x", None), ("ghcr.io/", None), ("%2e%2e/x", None),
        ("Alpine", None), ("a/b", "../x"), ("a/b", ""), ("a/b", "GHCR.io"), ("a/b", "ghcr.io/x"),
        ("a/b", "host:99999"), ("a/b", "host:0"), ("a/b", "-host"), ("a/b", "host:"), ("a/b", "a..b"),
        ("bad_host.io/app", None), ("", None), ("a/b", "host\n"),
        # the grammar's shape, but no URL can hold them (httpx raised InvalidURL: a 500)
        ("a/b", "[.]"), ("a/b", "[1:2]"), ("a/b", "999.1.1.1"), ("a/b", "01.2.3.4:5000"), ("999.1.1.1/x", None),
    ],
)
def test_resolve_repo_rejects(path: str, ns_query: str | None) -> None:
    with pytest.raises(OciError) as e:
        resolve_repo(path, ns_query, "docker.io")
    assert e.value.code == "NAME_INVALID"


def test_library_prefix_cannot_overflow_the_limit() -> None:
    with pytest.raises(OciError):
        resolve_repo("a" * 250, None, "docker.io")


def test_check_ns() -> None:
    for ok in ["docker.io", "127.0.0.1:5000", "a-b.example.com:443", "[::1]", "localhost", "[::ffff:1.2.3.4]:5000"]:
        assert check_ns(ok) == ok


# --- properties: whatever comes in, the result is safe to use in a path and a URL ---

_SAFE = re.compile(r"[a-z0-9._:\-\[\]/]+")


@settings(max_examples=300, deadline=None)
@given(path=st.text(max_size=80), ns=st.one_of(st.none(), st.text(max_size=30)))
def test_resolve_repo_never_crashes_and_never_yields_traversal(path: str, ns: str | None) -> None:
    try:
        repo = resolve_repo(path, ns, "docker.io")
    except OciError as e:
        assert e.code == "NAME_INVALID"
        return
    for part in [*repo.name.split("/"), repo.ns]:
        assert part not in ("", ".", "..")
    httpx.URL(f"https://{repo.ns}/v2/{repo.name}/")  # an upstream URL can be made of it (no InvalidURL)
    assert _SAFE.fullmatch(repo.name) and _SAFE.fullmatch(repo.ns)
    assert ".." not in repo.name and "%" not in repo.name and repo.name == repo.name.lower()


@settings(max_examples=300, deadline=None)
@given(ns=st.from_regex(r"(\[[0-9a-f:.]{0,12}\]|[0-9]{1,4}(\.[0-9]{1,4}){2,4}|[a-z0-9.]{1,12})(:[0-9]{1,5})?",
                        fullmatch=True))
def test_a_namespace_check_ns_accepts_makes_a_url(ns: str) -> None:
    """IP-like namespaces in particular: what check_ns lets through, httpx can make an upstream URL of."""
    try:
        check_ns(ns)
    except OciError as e:
        assert e.code == "NAME_INVALID"
        return
    httpx.URL(f"https://{ns}/v2/")


_component = st.from_regex(r"[a-z0-9]{1,4}((\.|_|__|-{1,2})[a-z0-9]{1,4}){0,2}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(_component, min_size=1, max_size=4))
def test_every_grammatical_name_is_accepted(parts: list[str]) -> None:
    name = "/".join(parts)
    assert check_name(name) == name


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_parse_digest_accepts_exactly_the_grammar(text: str) -> None:
    ok = re.fullmatch(r"sha256:[0-9a-f]{64}", text) is not None and not text.endswith("\n")
    try:
        parse_digest(text)
        assert ok
    except OciError as e:
        assert not ok and e.code == "DIGEST_INVALID"
