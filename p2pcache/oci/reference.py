"""OCI grammars for repository names, tags and digests, and the mapping of a request path to a `Repo`.

Every name, tag and digest that arrives from a client passes through here before it touches a file path or an
upstream URL, so this module is the project's guard against path traversal and URL injection. Rules:

- It never normalises a bad value into a good one: upper case, `..`, `%2e`, empty components, a trailing
  newline and anything outside the grammar are refused with an `OciError` (`NAME_INVALID`,
  `DIGEST_INVALID`) whose message quotes at most a short prefix of the input (messages reach clients).
- It does no I/O and knows nothing about HTTP; the proxy hands it the pieces of the path and the `ns` query.

Grammars (OCI distribution spec, distribution/reference):
    name      component ("/" component)*         at most 255 characters
    component [a-z0-9]+ ((\\.|_|__|-+) [a-z0-9]+)*
    tag       [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    digest    "sha256:" 64 lowercase hex          (the only algorithm we accept)
    ns        hostname [":" port]                 a registry: "docker.io", "ghcr.io", "127.0.0.1:5000"
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from p2pcache.oci.errors import OciError

DOCKER_HUB = "docker.io"
# Names Docker's own tooling uses for Hub; all of them mean the namespace "docker.io".
DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
MAX_NAME_LENGTH = 255
# A hostname is at most 253 characters; ":65535" adds 6.
MAX_NS_LENGTH = 253 + 6

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
# The separators and the alphanumeric runs are disjoint character sets, so this pattern cannot backtrack
# catastrophically; the length check before matching bounds the work anyway.
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
# Lower case only, like names: a namespace ends up in cache keys and file names, where "GHCR.io" and
# "ghcr.io" must not become two different things.
_HOST_LABEL = r"(?:[a-z0-9]|[a-z0-9][a-z0-9-]*[a-z0-9])"
_NS_RE = re.compile(rf"((?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9a-f:.]+\]))(?::([0-9]{{1,5}}))?")
_IPV4_LIKE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")


def _shown(text: object) -> str:
    """A short, printable rendering of bad input for an error message."""
    s = repr(text)
    return s if len(s) <= 80 else s[:77] + "..."


@dataclass(frozen=True)
class Repo:
    """One repository in one registry namespace; both parts are validated when built by `resolve_repo`."""

    ns: str  # registry namespace: "docker.io", "ghcr.io", "127.0.0.1:5000"
    name: str  # repository path inside that registry: "library/alpine", "org/app"

    def __str__(self) -> str:
        return f"{self.ns}/{self.name}"

    @property
    def pull_scope(self) -> str:
        """The token-auth scope that lets us pull this repository."""
        return f"repository:{self.name}:pull"


def check_name(name: str) -> str:
    """Return `name` if it is a valid OCI repository name, else raise OciError("NAME_INVALID")."""
    if not isinstance(name, str) or not name:
        raise OciError("NAME_INVALID", "empty repository name")
    if len(name) > MAX_NAME_LENGTH:
        raise OciError("NAME_INVALID", f"repository name longer than {MAX_NAME_LENGTH} characters")
    if _NAME_RE.fullmatch(name) is None:
        raise OciError("NAME_INVALID", f"invalid repository name {_shown(name)}")
    return name


def check_tag(tag: str) -> str:
    """Return `tag` if it matches the OCI tag grammar, else raise OciError("NAME_INVALID", "invalid tag")."""
    if not isinstance(tag, str) or TAG_RE.fullmatch(tag) is None:
        raise OciError("NAME_INVALID", f"invalid tag {_shown(tag)}")
    return tag


def page_size(text: str | None, most: int) -> int | None:
    """A tag list's `n` (distribution spec) when `text` is a whole number from 1 to `most` (leading zeros allowed),
    else None. Digits of any length are safe here: `int()` of thousands of digits raises."""
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    if not digits or len(digits) > len(str(most)):
        return None
    n = int(digits)
    return n if n <= most else None


def parse_digest(text: str) -> str:
    """Return `text` if it is "sha256:" + 64 lowercase hex digits, else raise OciError("DIGEST_INVALID")."""
    if not isinstance(text, str) or _DIGEST_RE.fullmatch(text) is None:
        if isinstance(text, str) and ":" in text and not text.startswith("sha256:"):
            raise OciError("DIGEST_INVALID", f"unsupported digest algorithm in {_shown(text)} (only sha256)")
        raise OciError("DIGEST_INVALID", f"invalid digest {_shown(text)}")
    return text


def is_digest(ref: str) -> bool:
    """True if the manifest reference `ref` is meant as a digest rather than a tag.

    Tags cannot contain ':', digests always do, so this tells which grammar applies; it does not validate.
    Callers validate with `parse_digest` (-> DIGEST_INVALID) or `check_tag` (-> NAME_INVALID) next, so a
    malformed digest gets the error code that names the real problem.
    """
    return isinstance(ref, str) and ":" in ref


def check_ns(ns: str) -> str:
    """Return `ns` if it is a lower-case hostname or [IPv6] with an optional port, else NAME_INVALID."""
    if not isinstance(ns, str) or not ns or len(ns) > MAX_NS_LENGTH:
        raise OciError("NAME_INVALID", f"invalid registry namespace {_shown(ns)}")
    m = _NS_RE.fullmatch(ns)
    if m is None or (m.group(2) is not None and not 0 < int(m.group(2)) <= 65535) or not _valid_ip(m.group(1)):
        raise OciError("NAME_INVALID", f"invalid registry namespace {_shown(ns)}")
    return ns


def _valid_ip(host: str) -> bool:
    """False for a host the grammar lets through but no URL can hold: "[1:2]", "999.1.1.1" (URL parsers read
    four dotted numbers as an IPv4 address, and refuse it; httpx raised InvalidURL, a 500, for these)."""
    try:
        if host.startswith("["):
            ipaddress.IPv6Address(host[1:-1])
        elif _IPV4_LIKE.fullmatch(host):
            ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _looks_like_host(segment: str) -> bool:
    # Docker's own rule for telling "ghcr.io/org/app" from "org/app": a registry has a dot or a port, or is
    # localhost. A Hub repository whose first component has a dot is read as a registry, exactly as the
    # docker CLI would read it, so clients and mirror agree.
    return "." in segment or ":" in segment or segment == "localhost"


def resolve_repo(path_name: str, ns_query: str | None, default_ns: str) -> Repo:
    """Map the `<name>` part of a `/v2/<name>/...` request (and the `?ns=` query) to a validated Repo.

    The namespace comes from `ns_query` when given (containerd), else from a host-like first path segment
    (`ghcr.io/org/app`, what a registries.conf mirror with a path sends), else `default_ns`. In Docker Hub a
    one-component name is an official image and gets "library/". Raises OciError("NAME_INVALID").
    """
    if not isinstance(path_name, str) or not path_name:
        raise OciError("NAME_INVALID", "empty repository name")
    if ns_query is not None:
        ns, name = ns_query, path_name
    else:
        first, sep, rest = path_name.partition("/")
        if sep and rest and _looks_like_host(first):
            ns, name = first, rest
        else:
            ns, name = default_ns, path_name
    check_ns(ns)
    if ns in DOCKER_HUB_ALIASES:
        ns = DOCKER_HUB
    check_name(name)
    if ns == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
        check_name(name)  # the prefix may push a 250-character name over the limit
    return Repo(ns=ns, name=name)
