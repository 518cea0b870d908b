"""Credentials files in both formats, challenge parsing, and the token cache's expiry rules."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcache.config import ConfigError
from p2pcache.oci.auth import (
    Credentials,
    CredentialsError,
    CredentialStore,
    TokenCache,
    load_credentials,
    normalize_registry_key,
    parse_www_authenticate,
    pick_challenge,
    token_lifetime,
)


def test_toml_credentials(tmp_path: Path) -> None:
    f = tmp_path / "creds.toml"
    f.write_text('["registry.example"]\nusername = "me"\npassword = "s3cret"\n'
                 '["127.0.0.1:5000"]\nusername = "u"\npassword = ""\n')
    store = load_credentials(f)
    assert store.get("registry.example") == Credentials("me", "s3cret")
    assert store.get("nope", "127.0.0.1:5000") == Credentials("u", "")
    assert store.get("other") is None


def test_docker_config_json(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text(json.dumps({
        "auths": {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:pa:ss").decode()},
            "ghcr.io": {"username": "gh", "password": "tok"},
            "helper.example": {},  # what docker login leaves with a credential helper
        },
        "credsStore": "desktop",
    }))
    store = load_credentials(f)
    assert store.get("docker.io") == Credentials("hubuser", "pa:ss")  # password may contain ':'
    assert store.get("registry-1.docker.io") == Credentials("hubuser", "pa:ss")
    assert store.get("https://ghcr.io") == Credentials("gh", "tok")
    assert store.get("helper.example") is None
    assert len(store) == 2


def test_docker_config_identity_tokens(tmp_path: Path) -> None:
    """The two forms `docker login` and `az acr login` write; the user name without a password, the node
    starting at all with the second (it refused: "needs string username and password")."""
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"auths": {
        "a.example": {"auth": base64.b64encode(b"bob:").decode(), "identitytoken": "R1"},
        "b.example": {"username": "00000000-0000-0000-0000-000000000000", "identitytoken": "R2"},
    }}))
    store = load_credentials(f)
    a, b = store.get("a.example"), store.get("b.example")
    assert a is not None and (a.username, a.identity_token) == ("bob", "R1")
    assert b is not None and (b.username, b.identity_token) == ("00000000-0000-0000-0000-000000000000", "R2")
    assert "R1" not in repr(a)


@pytest.mark.parametrize(
    "content",
    [
        '{"auths": {"x": {"auth": "!!!notbase64"}}}',
        '{"auths": {"x": {"identitytoken": 5}}}',
        '{"auths": {"x": {"auth": "' + base64.b64encode(b"nocolon").decode() + '"}}}',
        '{"auths": []}',
        '{"nothing": 1}',
        '{"auths": {"x": "str"}}',
        '{"auths": {"x": {"username": "u"}}}',
        "{not json",
        '["x"]\nusername = 1\npassword = "p"\n',
        'x = "not a table"\n',
        "[[[ not toml",
        '{"auths": ' + "[" * 100_000 + "]" * 100_000 + "}",  # a RecursionError traceback, found in review
    ],
)
def test_bad_credentials_files_are_clear_errors(tmp_path: Path, content: str) -> None:
    f = tmp_path / "creds"
    f.write_text(content)
    with pytest.raises(CredentialsError) as e:
        load_credentials(f)
    assert str(f) in str(e.value)
    assert isinstance(e.value, ConfigError)  # the CLI prints these and exits 2


def test_missing_file_and_secrets_never_in_messages(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        load_credentials(tmp_path / "absent")
    f = tmp_path / "c.toml"
    f.write_text('["r"]\nusername = "topsecretuser"\npassword = 5\n')
    with pytest.raises(CredentialsError) as e:
        load_credentials(f)
    assert "topsecret" not in str(e.value)
    assert "hunter2" not in repr(Credentials("u", "hunter2"))
    assert "hunter2" not in repr(CredentialStore({"r": Credentials("u", "hunter2")}))


def test_basic_header() -> None:
    assert Credentials("a", "b").basic_header() == "Basic " + base64.b64encode(b"a:b").decode()


def test_normalize_registry_key() -> None:
    assert normalize_registry_key("https://index.docker.io/v1/") == "docker.io"
    assert normalize_registry_key("http://127.0.0.1:5000/") == "127.0.0.1:5000"
    assert normalize_registry_key("GHCR.IO") == "ghcr.io"


def test_parse_bearer_challenge() -> None:
    (c,) = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull,push",
    }


def test_parse_several_challenges_and_odd_spacing() -> None:
    cs = parse_www_authenticate('Basic realm="Registry Realm" , Bearer  realm = "http://t/x" ,error=invalid_token')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].params == {"realm": "Registry Realm"}
    assert cs[1].params == {"realm": "http://t/x", "error": "invalid_token"}
    assert pick_challenge(cs) is cs[1]


def test_parse_escaped_quotes_and_garbage() -> None:
    (c,) = parse_www_authenticate(r'Bearer realm="a\"b", service=plain')
    assert c.params == {"realm": 'a"b', "service": "plain"}
    assert parse_www_authenticate("") == []
    assert pick_challenge(parse_www_authenticate("Bearer service=x")) is None  # no realm: unusable
    assert pick_challenge(parse_www_authenticate("Negotiate abc")) is None
    assert pick_challenge(parse_www_authenticate('Basic realm="r"'))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_challenge_parser_never_crashes(header: str) -> None:
    for c in parse_www_authenticate(header):
        assert c.scheme and isinstance(c.params, dict)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_cache_expiry_default_60s() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock, wall_clock=lambda: 1.7e9)
    assert cache.put("reg", "repository:a:pull", {"token": "T1"}) == "T1"
    assert cache.get("reg", "repository:a:pull") == "T1"
    assert cache.get("reg", "repository:b:pull") is None  # scopes do not share tokens
    assert cache.get("other", "repository:a:pull") is None
    clock.now += 50  # 60 s minus the safety margin of 6 s (10 % of 60)
    assert cache.get("reg", "repository:a:pull") == "T1"
    clock.now += 5
    assert cache.get("reg", "repository:a:pull") is None


def test_token_cache_expires_in_and_access_token() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock, wall_clock=lambda: 1.7e9)
    cache.put("reg", "s", {"access_token": "A", "expires_in": 300})
    clock.now += 289
    assert cache.get("reg", "s") == "A"
    clock.now += 2
    assert cache.get("reg", "s") is None
    assert cache.put("reg", "s", {"nothing": 1}) is None
    cache.put("reg", "s", {"token": "B"})
    cache.forget("reg", "s")
    assert cache.get("reg", "s") is None


def test_issued_at_counts() -> None:
    wall = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    # issued 100 s ago with 300 s of life: 200 s left
    assert token_lifetime({"expires_in": 300, "issued_at": "2023-11-14T22:11:40Z"}, wall) == pytest.approx(200)
    # nanosecond fractions and offsets as Go writes them
    assert token_lifetime(
        {"expires_in": 300, "issued_at": "2023-11-14T23:11:40.123456789+01:00"}, wall
    ) == pytest.approx(200.123456, abs=1e-3)
    # issued in our future (skew): never more than expires_in
    assert token_lifetime({"expires_in": 300, "issued_at": "2030-01-01T00:00:00Z"}, wall) == 300
    # long expired
    assert token_lifetime({"expires_in": 60, "issued_at": "2020-01-01T00:00:00Z"}, wall) == 0
    # garbage issued_at / expires_in: defaults
    assert token_lifetime({"expires_in": "x", "issued_at": "yesterday"}, wall) == 60
    assert token_lifetime({"expires_in": True}, wall) == 60
    clock = FakeClock()
    cache = TokenCache(clock=clock, wall_clock=lambda: wall)
    cache.put("r", "s", {"token": "old", "expires_in": 60, "issued_at": "2020-01-01T00:00:00Z"})
    assert cache.get("r", "s") is None  # an expired token is never cached
