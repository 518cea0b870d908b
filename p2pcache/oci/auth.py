"""Registry credentials, WWW-Authenticate challenges and the bearer-token cache of the upstream client.

What lives here is pure bookkeeping: reading the credentials file once, parsing challenge headers, remembering
tokens until they expire. It never opens a network connection (oci/upstream.py does the HTTP), and it never
puts a password or a token into an exception message, a log line or a repr: those reach logs and clients.

Credentials file, either format (chosen by content: Docker's is a JSON object):

    # TOML: one table per registry (the namespace, or the upstream's host:port)
    ["registry.example"]
    username = "me"
    password = "secret"

    # Docker's config.json
    {"auths": {"registry.example": {"auth": "<base64 of user:pass>"},
               "https://index.docker.io/v1/": {"username": "me", "password": "secret"}}}

Keys are normalised to a bare `host[:port]` ("https://index.docker.io/v1/" -> "docker.io").
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from p2pcache.config import ConfigError
from p2pcache.oci.reference import DOCKER_HUB, DOCKER_HUB_ALIASES

# Token lifetime when the token server does not say (distribution token spec: "defaults to 60 seconds").
DEFAULT_TOKEN_LIFETIME = 60.0
MAX_TOKEN_LIFETIME = 365 * 86400.0
# Use a token only while it has this much life left, so a request does not start with a token that expires
# on the wire; capped at a fraction of the lifetime so short-lived tokens stay usable.
TOKEN_EXPIRY_MARGIN = 10.0


class CredentialsError(ConfigError):
    """The credentials file cannot be used; the message names the file and the entry, never a secret."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)  # never printed, not even by a debugging repr()
    # What `docker login` keeps for a registry whose token server speaks OAuth2 (config.json "identitytoken"):
    # a refresh token, traded for access tokens with a POST to the realm instead of a GET with Basic.
    identity_token: str | None = field(default=None, repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def normalize_registry_key(key: str) -> str:
    """'https://index.docker.io/v1/' -> 'docker.io'; 'http://127.0.0.1:5000/' -> '127.0.0.1:5000'."""
    k = key.strip().lower()
    for scheme in ("https://", "http://"):
        if k.startswith(scheme):
            k = k[len(scheme):]
    k = k.split("/", 1)[0]
    return DOCKER_HUB if k in DOCKER_HUB_ALIASES else k


class CredentialStore:
    """Credentials by registry (`host[:port]`, Docker Hub under "docker.io")."""

    def __init__(self, entries: Mapping[str, Credentials] | None = None) -> None:
        self._by_registry = {normalize_registry_key(k): v for k, v in (entries or {}).items()}

    def __len__(self) -> int:
        return len(self._by_registry)

    def __repr__(self) -> str:
        return f"CredentialStore({sorted(self._by_registry)})"

    def get(self, *keys: str) -> Credentials | None:
        """The first credentials found under any of `keys` (e.g. the namespace, then the upstream host)."""
        for key in keys:
            found = self._by_registry.get(normalize_registry_key(key))
            if found is not None:
                return found
        return None


def load_credentials(path: Path) -> CredentialStore:
    """Read a TOML or Docker config.json credentials file; raise CredentialsError on anything unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CredentialsError(f"credentials: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"credentials: {path} is not UTF-8 text") from None
    if text.lstrip().startswith("{"):
        return parse_docker_config(text, str(path))
    return parse_toml_credentials(text, str(path))


def parse_toml_credentials(text: str, source: str = "credentials") -> CredentialStore:
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        raise CredentialsError(f"credentials: {source} is nested too deeply") from None
    except tomllib.TOMLDecodeError as e:
        # The decoder's message quotes a position, not the content, so it is safe to show.
        raise CredentialsError(f"credentials: {source} is neither JSON nor valid TOML: {e}") from None
    entries: dict[str, Credentials] = {}
    for registry, table in doc.items():
        if not isinstance(table, dict):
            raise CredentialsError(
                f'credentials: {source}: [{registry!r}] must be a table with username and password '
                f'(write ["{registry}"] as a section header)'
            )
        entries[registry] = _user_pass(table, source, registry)
    return CredentialStore(entries)


def parse_docker_config(text: str, source: str = "credentials") -> CredentialStore:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CredentialsError(f"credentials: {source} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise CredentialsError(f"credentials: {source} is nested too deeply to be a Docker config.json") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise CredentialsError(f'credentials: {source} has no "auths" object (Docker config.json format)')
    entries: dict[str, Credentials] = {}
    for registry, entry in auths.items():
        if not isinstance(entry, dict):
            raise CredentialsError(f"credentials: {source}: auths[{registry!r}] must be an object")
        if entry.get("identitytoken"):
            entries[registry] = _identity(entry, source, registry)
        elif entry.get("auth"):
            entries[registry] = _decode_auth(entry["auth"], source, registry)
        elif "username" in entry or "password" in entry:
            entries[registry] = _user_pass(entry, source, registry)
        # An empty entry is what `docker login` leaves when a credential helper holds the secret: nothing
        # for us to use, and not an error.
    return CredentialStore(entries)


def _user_pass(table: Mapping[str, Any], source: str, registry: str) -> Credentials:
    user, password = table.get("username"), table.get("password")
    if not isinstance(user, str) or not user or not isinstance(password, str):
        raise CredentialsError(f"credentials: {source}: {registry!r} needs string username and password")
    return Credentials(user, password)


def _identity(entry: Mapping[str, Any], source: str, registry: str) -> Credentials:
    """An OAuth2 refresh token from `docker login`; the user name (in "auth" or "username") may be empty."""
    token, user = entry["identitytoken"], entry.get("username") or ""
    if not isinstance(token, str) or not isinstance(user, str):
        raise CredentialsError(f"credentials: {source}: auths[{registry!r}].identitytoken must be a string")
    if not user and entry.get("auth"):
        try:
            user = base64.b64decode(str(entry["auth"]), validate=True).decode("utf-8").partition(":")[0]
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise CredentialsError(f"credentials: {source}: auths[{registry!r}].auth is not base64") from None
    return Credentials(user, "", identity_token=token)


def _decode_auth(value: Any, source: str, registry: str) -> Credentials:
    try:
        raw = base64.b64decode(str(value), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise CredentialsError(f"credentials: {source}: auths[{registry!r}].auth is not base64") from None
    user, sep, password = raw.partition(":")
    if not sep or not user:
        raise CredentialsError(f'credentials: {source}: auths[{registry!r}].auth is not base64 of "user:pass"')
    return Credentials(user, password)


# --- WWW-Authenticate ---


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str]  # keys lower case: realm, service, scope, error


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value into challenges; malformed parts are skipped, never raised.

    Handles quoted values with commas and escapes (`scope="repository:a:pull,push"`) and several challenges
    in one header (`Basic realm="x", Bearer realm="y"`).
    """
    challenges: list[Challenge] = []
    i, n = 0, len(header)
    scheme: str | None = None
    params: dict[str, str] = {}

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and header[i] in chars:
            i += 1

    while i < n:
        skip(" \t,")
        start = i
        while i < n and header[i] not in " \t,=":
            i += 1
        token = header[start:i]
        if not token:
            i += 1
            continue
        skip(" \t")
        if i < n and header[i] == "=" and scheme is not None:
            i += 1
            skip(" \t")
            if i < n and header[i] == '"':
                i += 1
                chars: list[str] = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(header[i])
                    i += 1
                i += 1  # closing quote (or end of a truncated header)
                value = "".join(chars)
            else:
                vstart = i
                while i < n and header[i] not in ",":
                    i += 1
                value = header[vstart:i].strip()
            params[token.lower()] = value
        elif i < n and header[i] == "=":
            # key=value before any scheme: not a challenge we can use; skip the value.
            while i < n and header[i] != ",":
                i += 1
        else:
            if scheme is not None:
                challenges.append(Challenge(scheme, params))
            scheme, params = token.lower(), {}
    if scheme is not None:
        challenges.append(Challenge(scheme, params))
    return challenges


def pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Bearer (with a realm) if offered, else Basic; None if neither is usable."""
    for c in challenges:
        if c.scheme == "bearer" and c.params.get("realm"):
            return c
    for c in challenges:
        if c.scheme == "basic":
            return c
    return None


# --- tokens ---


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # on the cache's clock (monotonic by default)


def token_lifetime(response: Mapping[str, Any], wall_now: float) -> float:
    """Seconds of validity left for a token-server JSON response, counted from now.

    `expires_in` (default 60 s) counts from `issued_at` when that is given; a token issued in our future
    (clock skew) is not given extra life, and one whose life is over comes back as 0.
    """
    lifetime = response.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or not lifetime > 0:  # (NaN too)
        lifetime = DEFAULT_TOKEN_LIFETIME
    # a 400-digit integer raised OverflowError in float() (found in review: a 500); a year is plenty
    lifetime = min(lifetime, MAX_TOKEN_LIFETIME)
    issued = _parse_rfc3339(response.get("issued_at"))
    if issued is None:
        return float(lifetime)
    left = issued + float(lifetime) - wall_now
    return max(0.0, min(float(lifetime), left))


def _parse_rfc3339(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python 3.11 fromisoformat takes at most 6 fractional digits; Go writes up to 9.
    if "." in text:
        head, _, rest = text.partition(".")
        n_digits = len(rest) - len(rest.lstrip("0123456789"))
        digits, tz = rest[:n_digits], rest[n_digits:]
        text = f"{head}.{digits[:6]}{tz}"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return dt.timestamp()


def token_from_response(response: Any) -> str | None:
    """The token of a token-server JSON answer (`token`, or OAuth2's `access_token`)."""
    if not isinstance(response, dict):
        return None
    for key in ("token", "access_token"):
        value = response.get(key)
        if isinstance(value, str) and value:
            return value
    return None


class TokenCache:
    """Bearer tokens by (registry, scope), forgotten when they expire.

    `clock` is monotonic time for expiry; `wall_clock` is only used to honour the server's `issued_at`.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._tokens: dict[tuple[str, str], Token] = {}

    def get(self, registry: str, scope: str) -> str | None:
        token = self._tokens.get((registry, scope))
        if token is None:
            return None
        if self._clock() >= token.expires_at:
            del self._tokens[(registry, scope)]
            return None
        return token.value

    def put(self, registry: str, scope: str, response: Mapping[str, Any]) -> str | None:
        """Remember the token of a token-server answer; returns it (None if the answer holds no token)."""
        value = token_from_response(response)
        if value is None:
            return None
        life = token_lifetime(response, self._wall_clock())
        usable = life - min(TOKEN_EXPIRY_MARGIN, life * 0.1)
        if usable > 0:
            self._tokens[(registry, scope)] = Token(value, self._clock() + usable)
        return value

    def forget(self, registry: str, scope: str) -> None:
        """Drop a token the registry refused (revoked or expired early)."""
        self._tokens.pop((registry, scope), None)

    def __len__(self) -> int:
        return len(self._tokens)
