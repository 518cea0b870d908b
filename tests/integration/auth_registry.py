"""The real docker-registry behind authentication: `auth: htpasswd` (Basic) and `auth: token` (Bearer).

Reusable from any fixture (plain context managers, synchronous, nothing trio-specific):

    with htpasswd_registry(tmp_path) as reg:          # or token_registry(tmp_path, allow_anonymous=False)
        reg.push("library/x", "1", image)             # pushes with the right credentials
        creds = reg.write_credentials(tmp_path / "creds.toml")   # or fmt="docker" for config.json
        ... Settings(upstreams={"docker.io": reg.url}, credentials=creds) ...

The token server is a tiny threading HTTP server on loopback that checks Basic credentials (or lets anonymous
users pull, if asked to) and issues JWTs signed RS256 by a self-made certificate; the registry trusts that
certificate through `rootcertbundle`, and each token carries it in its `x5c` header, which is how distribution's
token auth finds the signing key. Everything listens on 127.0.0.1 only and is stopped on exit; nothing here
talks to any other address.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import bcrypt
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from .harness import images as im
from .harness.registry import Registry

SERVICE = "p2pcache-test-registry"
ISSUER = "p2pcache-test-token-issuer"
TOKEN_LIFETIME = 300  # seconds; long enough for any test, short enough to be a real expiry


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- the signing certificate ---


@dataclass
class SigningCert:
    key: rsa.RSAPrivateKey
    der: bytes  # the certificate, DER (goes into the JWT's x5c)
    pem_path: Path  # the registry's rootcertbundle


@functools.cache
def _signing_key() -> rsa.RSAPrivateKey:
    # One key per test process: generating RSA keys is the slowest part of starting a token registry.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_signing_cert(directory: Path) -> SigningCert:
    """A self-signed RSA certificate that signs tokens and is the registry's only trusted root."""
    key = _signing_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, crl_sign=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem_path = directory / "token-root.pem"
    pem_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return SigningCert(key, cert.public_bytes(serialization.Encoding.DER), pem_path)


def sign_jwt(cert: SigningCert, claims: dict[str, Any]) -> str:
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert.der).decode("ascii")]}
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    signature = cert.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


# --- the token server ---


def _pull_only(scope: str) -> str:
    """'repository:a/b:pull,push' -> 'repository:a/b:pull'."""
    return scope.rpartition(":")[0] + ":pull"


@dataclass
class TokenRequest:
    """What the token server saw: who asked (None = anonymous), for what, and what it answered."""

    user: str | None
    scopes: list[str]
    status: int


@dataclass
class TokenServer:
    cert: SigningCert
    users: dict[str, str]
    allow_anonymous: bool = False
    lifetime: int = TOKEN_LIFETIME
    # OAuth2 refresh tokens (what `docker login` stores as "identitytoken") -> their user; POST /token takes them
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    # Query parameters the realm itself carries (realm="…/token?account=acme"): a GET without them gets 400,
    # as a token server that serves several accounts would answer.
    realm_params: dict[str, str] = field(default_factory=dict)
    # The path the realm names; when not /token, requests there are redirected (307) to /token with their query,
    # as a token endpoint that moved answers.
    realm_path: str = "/token"
    requests: list[TokenRequest] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        assert self._httpd is not None, "token server not started"
        host, port = self._httpd.server_address[:2]
        query = urlencode(self.realm_params)
        return f"http://{host}:{port}{self.realm_path}" + (f"?{query}" if query else "")

    def issue(self, subject: str | None, scopes: list[str]) -> str:
        """A signed token granting `scopes` ("repository:<name>:<actions>"), without any checks."""
        now = int(time.time())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        claims = {
            "iss": ISSUER, "sub": subject or "", "aud": SERVICE, "exp": now + self.lifetime,
            "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        }
        return sign_jwt(self.cert, claims)

    def start(self) -> TokenServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _moved(self) -> bool:
                url = urlsplit(self.path)
                if server.realm_path == "/token" or url.path != server.realm_path:
                    return False
                self.send_response(307)
                self.send_header("Location", "/token" + (f"?{url.query}" if url.query else ""))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            def do_GET(self) -> None:  # noqa: N802 - the http.server naming
                if self._moved():
                    return
                url = urlsplit(self.path)
                if url.path != "/token":
                    self._answer(404, {"error": "not found"})
                    return
                query = parse_qs(url.query)
                if any(query.get(k) != [v] for k, v in server.realm_params.items()):
                    self._answer(400, {"details": "the realm's own query parameters are missing"})
                    return
                scopes = [s for v in query.get("scope", []) for s in v.split(" ") if s]
                user = self._user()
                if user is False or (user is None and not server.allow_anonymous):
                    server.requests.append(TokenRequest(None if user is False else user, scopes, 401))
                    self._answer(401, {"details": "invalid credentials"},
                                 {"WWW-Authenticate": 'Basic realm="p2pcache test token server"'})
                    return
                if user is None:  # anonymous users may only pull
                    scopes = [_pull_only(s) for s in scopes if "pull" in s.rpartition(":")[2].split(",")]
                token = server.issue(user, scopes)
                issued_at = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
                server.requests.append(TokenRequest(user, scopes, 200))
                self._answer(200, {"token": token, "access_token": token, "expires_in": server.lifetime,
                                   "issued_at": issued_at})

            def do_POST(self) -> None:  # noqa: N802 - OAuth2 (grant_type=refresh_token), as docker sends it
                if self._moved():
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    return
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
                user = server.refresh_tokens.get((form.get("refresh_token") or [""])[0])
                if urlsplit(self.path).path != "/token" or form.get("grant_type") != ["refresh_token"] or \
                        user is None:
                    server.requests.append(TokenRequest(None, scopes, 401))
                    self._answer(401, {"error": "invalid_grant"})
                    return
                token = server.issue(user, scopes)
                server.requests.append(TokenRequest(user, scopes, 200))
                self._answer(200, {"access_token": token, "expires_in": server.lifetime, "scope": " ".join(scopes)})

            def _user(self) -> str | None | bool:
                """The authenticated user, None when anonymous, False when the credentials are wrong."""
                header = self.headers.get("Authorization")
                if header is None:
                    return None
                try:
                    scheme, _, value = header.partition(" ")
                    user, _, password = base64.b64decode(value).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    return False
                if scheme.lower() != "basic" or server.users.get(user) != password:
                    return False
                return user

            def _answer(self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


# --- the registries ---


@dataclass
class AuthRegistry:
    """A running docker-registry that demands credentials, with what a fixture needs to use it."""

    registry: Registry  # the harness Registry: url, host, access log, stop/start
    kind: str  # "htpasswd" or "token"
    username: str
    password: str
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def host(self) -> str:
        return self.registry.host

    def client_kwargs(self, name: str) -> dict[str, Any]:
        """httpx.Client keyword arguments that authenticate pulls and pushes to repository `name`."""
        if self.token_server is not None:
            token = self.token_server.issue(self.username, [f"repository:{name}:pull,push"])
            return {"headers": {"Authorization": f"Bearer {token}"}}
        return {"auth": (self.username, self.password)}

    def push(self, name: str, tag: str, thing: im.Image | im.Index) -> None:
        """Push an image or index built with harness.images, authenticated."""
        im.push(self.url, name, tag, thing, **self.client_kwargs(name))

    def push_blob(self, name: str, data: bytes, media_type: str = "application/octet-stream") -> str:
        """Push one blob; returns its digest."""

        blob = im.Blob(data, media_type)
        with httpx.Client(base_url=self.url, timeout=300, **self.client_kwargs(name)) as c:
            im.push_blob(c, name, blob)
        return blob.digest

    def push_manifest(self, name: str, ref: str, body: bytes, media_type: str) -> str:
        """Push manifest bytes under a tag or digest `ref`; returns their digest."""

        manifest = im.Blob(body, media_type)
        with httpx.Client(base_url=self.url, timeout=60, **self.client_kwargs(name)) as c:
            im.push_manifest(c, name, ref, manifest)
        return manifest.digest

    def write_credentials(
        self,
        path: Path,
        *,
        fmt: str = "toml",
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> Path:
        """Write a credentials file for this registry (TOML, or Docker's config.json with fmt="docker").

        `key` is the registry name the entry is filed under (default: this registry's host:port);
        `username`/`password` override the right ones, to test refusal.
        """
        key = key or self.host
        user = self.username if username is None else username
        password = self.password if password is None else password
        if fmt == "docker":
            auth = base64.b64encode(f"{user}:{password}".encode()).decode()
            path.write_text(json.dumps({"auths": {key: {"auth": auth}}}))
        elif fmt == "docker-identitytoken":  # what `docker login` writes for an OAuth2 token server
            assert self.token_server is not None, "identity tokens need the token server"
            refresh = f"refresh-{secrets.token_hex(8)}"
            self.token_server.refresh_tokens[refresh] = user
            auth = base64.b64encode(f"{user}:".encode()).decode()
            path.write_text(json.dumps({"auths": {key: {"auth": auth, "identitytoken": refresh}}}))
        elif fmt == "toml":
            path.write_text(f'["{key}"]\nusername = {json.dumps(user)}\npassword = {json.dumps(password)}\n')
        else:
            raise ValueError(f"fmt must be 'toml', 'docker' or 'docker-identitytoken', not {fmt!r}")
        return path


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    # bcrypt cost 5: the registry checks the hash on every request; the default cost 12 would cost ~250 ms each.
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}" for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def htpasswd_registry(
    workdir: Path, username: str = "alice", password: str = "wonderland-pw"
) -> Iterator[AuthRegistry]:
    """docker-registry with `auth: htpasswd` (Basic) on a free loopback port; stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd = write_htpasswd(workdir / "htpasswd", {username: password})
    reg = Registry(workdir / "registry", config_extra={
        "auth": {"htpasswd": {"realm": "p2pcache-test", "path": str(htpasswd)}},
    })
    reg.start()
    try:
        yield AuthRegistry(reg, "htpasswd", username, password)
    finally:
        reg.stop()


@contextmanager
def token_registry(
    workdir: Path,
    username: str = "bob",
    password: str = "token-pw",
    *,
    allow_anonymous: bool = False,
    lifetime: int = TOKEN_LIFETIME,
    realm_params: dict[str, str] | None = None,
    realm_path: str = "/token",
) -> Iterator[AuthRegistry]:
    """docker-registry with `auth: token` and its token server, both on free loopback ports; stopped on exit.

    With `allow_anonymous`, the token server gives pull-only tokens to anyone (like Docker Hub). With
    `realm_params`, the realm the registry announces carries them as its query, and the token server needs them.
    With another `realm_path`, the realm names that path and the token server redirects it (307) to /token.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cert = make_signing_cert(workdir)
    tokens = TokenServer(cert, {username: password}, allow_anonymous=allow_anonymous, lifetime=lifetime,
                         realm_params=dict(realm_params or {}), realm_path=realm_path).start()
    try:
        reg = Registry(workdir / "registry", config_extra={
            "auth": {"token": {"realm": tokens.realm, "service": SERVICE, "issuer": ISSUER,
                               "rootcertbundle": str(cert.pem_path)}},
        })
        reg.start()
        try:
            yield AuthRegistry(reg, "token", username, password, tokens)
        finally:
            reg.stop()
    finally:
        tokens.stop()
