"""Every setting and tunable of a node, with its default and the reason for it, in one place.

A setting comes from (highest first): a command-line flag, a `P2PCACHE_<KEY>` environment variable, the TOML
file given with `--config`, the default below. TOML keys are the flag names with `-` or `_`
(`max-disk = "20GiB"`). This module parses and validates; it never opens a socket or starts anything. A bad
value is a `ConfigError` whose message names the setting, so the CLI can print it and exit 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import ssl
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import certifi

from p2pcache.discovery.dns import split_name
from p2pcache.hostport import WILDCARDS as _WILDCARDS
from p2pcache.hostport import dial_problem, parse_hostport
from p2pcache.oci.errors import OciError
from p2pcache.oci.reference import check_ns
from p2pcache.swarm.chain import BLOCK
from p2pcache.swarm.handshake import load_secret
from p2pcache.swarm.metainfo import MAX_PIECE
from p2pcache.units import parse_duration, parse_rate, parse_size

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the setting."""


def default_data_dir() -> Path:
    """Root stores under /var/lib (what a DaemonSet mounts); everyone else under the XDG cache dir."""
    if os.geteuid() == 0:
        return Path("/var/lib/p2pcache")
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "p2pcache"
    try:
        return Path.home() / ".cache" / "p2pcache"
    except RuntimeError:  # an arbitrary UID in a container: no passwd entry, no $HOME
        raise ConfigError("data: this user has no home directory to keep the store under; "
                          "say where with --data DIR (or P2PCACHE_DATA)") from None


@dataclass
class Settings:
    # --- the registry mirror (issue 2) ---
    listen: str = "0.0.0.0:5000"  # Docker's registry-mirrors convention
    admin_listen: str = "127.0.0.1:5001"  # admin (DELETE, preheat, status) stays off the network by default
    data: Path = field(default_factory=default_data_dir)
    upstreams: dict[str, str] = field(default_factory=dict)  # ns -> base URL; see upstream_url()
    default_ns: str = DOCKER_HUB  # what Docker's registry-mirrors requests (no ns) mean
    credentials: Path | None = None  # TOML {registry = {username, password}} or Docker config.json "auths"
    upstream_ca: Path | None = None  # PEM certificates trusted for upstream TLS, besides the system's store
    max_disk: int | None = None  # bytes; None = no quota
    tag_ttl: float = 30.0  # a tag is re-resolved (one cheap HEAD) at most this often
    log_level: str = "info"
    log_format: str = "text"  # or "json"
    # timeouts and limits of the HTTP side
    upstream_connect_timeout: float = 10.0  # a dead registry is noticed quickly
    upstream_read_timeout: float = 30.0  # a stalled upstream body is abandoned (and retried) after this
    upstream_retries: int = 3  # connection errors and 5xx; 429 is never retried, it is passed through
    client_header_timeout: float = 20.0  # a client that stalls mid-request is dropped, others unaffected
    client_send_timeout: float = 120.0  # a client that stops reading for this long is dropped
    max_header_bytes: int = 16 * 1024  # larger request heads get 431
    # --- the swarm (issue 3) ---
    peer_listen: str | None = None  # e.g. "0.0.0.0:5002"; None = this node does not share
    join: list[str] = field(default_factory=list)
    join_dns: str | None = None
    advertise: str | None = None
    zone: str | None = None
    cluster_secret_file: Path | None = None
    upload_limit: float | None = None  # bytes/s, token bucket shared by all peer uploads
    download_limit: float | None = None  # bytes/s, shared by all peer and upstream downloads
    piece_size: int | None = None  # None = adaptive (swarm.metainfo.piece_size_for)
    tracker: str | None = None  # a single tracker address for small setups (instead of rendezvous)

    def upstream_url(self, ns: str) -> str:
        """Base URL of the registry serving namespace `ns` (no trailing slash)."""
        if ns in self.upstreams:
            return self.upstreams[ns].rstrip("/")
        if ns == DOCKER_HUB:
            return DOCKER_HUB_URL
        return f"https://{ns}"


MIN_PIECE_OVERRIDE = 64 << 10  # below this a piece costs more in requests, HAVEs and hashes than it moves
_SIZE_KEYS = {"max_disk", "max_header_bytes", "piece_size"}
_RATE_KEYS = {"upload_limit", "download_limit"}
# The lowest --upload-limit / --download-limit. Frames are not interleaved on a peer connection: tracker calls,
# their answers and gossip wait behind the piece being sent (512 KiB for blobs up to 128 MiB), and the peers'
# timeouts are seconds. Under 64 kB/s a piece took 8 s, tracker calls timed out, a claim holder was taken for
# dead and its layer fetched again (found in review, 1.5x the image from upstream); at 1 MB/s two such pieces
# take 1 s. A denormal rate (5e-324) crashed the start-up (found in review).
MIN_RATE_LIMIT = 1e6
_TIME_KEYS = {
    "tag_ttl", "upstream_connect_timeout", "upstream_read_timeout", "client_header_timeout",
    "client_send_timeout",
}
_PATH_KEYS = {"data", "credentials", "upstream_ca", "cluster_secret_file"}
# Kubernetes sets these in every pod of a namespace with a Service named "p2pcache": never a misspelt setting.
_K8S_SERVICE_ENV = ("P2PCACHE_SERVICE_", "P2PCACHE_PORT")


def _text(value: Any) -> str:
    """A setting that is a word or a path: a TOML number, list or table there is a mistake, not a string."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value

_LIST_KEYS = {"join"}
_INT_KEYS = {"upstream_retries"}


def _coerce(key: str, value: Any) -> Any:
    try:
        if value is None:
            return None
        if key == "upstreams":
            return _parse_upstreams(value)
        if key in _SIZE_KEYS:
            n = parse_size(value)
            if key == "piece_size" and not MIN_PIECE_OVERRIDE <= n <= MAX_PIECE:
                raise ValueError(f"{value!r} is outside {MIN_PIECE_OVERRIDE >> 10} KiB-{MAX_PIECE >> 20} MiB "
                                 "(peers take no larger piece)")
            if key == "piece_size" and n % BLOCK:
                # pieces are links of one SHA-256 chain (swarm/chain.py): a link can only end on a block
                raise ValueError(f"{value!r} ({n} bytes) is not a multiple of {BLOCK} bytes, SHA-256's block "
                                 "(say 1MiB or 4MiB)")
            if n < 1:
                raise ValueError(f"{value!r} must be at least 1 byte")
            return n
        if key in _RATE_KEYS:
            r = parse_rate(value)
            if r < MIN_RATE_LIMIT:
                raise ValueError(f"{value!r} must be at least 1MB/s (leave it out for no limit): slower, a peer "
                                 "waits on this node's pieces longer than it waits for a live peer")
            return r
        if key in _TIME_KEYS:
            t = parse_duration(value)
            if t <= 0 and key != "tag_ttl":
                raise ValueError(f"{value!r} must be more than 0 s")
            return t
        if key in _PATH_KEYS:
            if not _text(value).strip():
                raise ValueError("must not be empty (an empty path is the current directory)")
            return Path(value).expanduser()
        if key in _LIST_KEYS:
            # a TOML list, a comma-separated string, or repeated flags each of which may hold a comma list
            items = [part for item in (value if isinstance(value, list) else [value])
                     for part in _text(item).split(",")]
            return [s.strip() for s in items if s.strip()]
        if key in _INT_KEYS:
            try:
                n = int(value) if not isinstance(value, (float, bool)) else None
            except (ValueError, TypeError):
                n = None
            if n is None or not 0 <= n <= 100:
                raise ValueError(f"{value!r} is not a whole number from 0 to 100")
            return n
        if key == "log_level":
            v = str(value).lower()
            if v not in {"debug", "info", "warning", "error"}:
                raise ValueError("use debug, info, warning or error")
            return v
        if key == "log_format":
            v = str(value).lower()
            if v not in {"text", "json"}:
                raise ValueError("use text or json")
            return v
        if key in {"listen", "admin_listen", "peer_listen", "advertise"}:
            parse_hostport(_text(value))
            return value
        if key == "join_dns":
            return _check_join_dns(_text(value)) if _text(value).strip() else None  # "": no DNS discovery
        return _text(value)
    except (ValueError, TypeError, OverflowError) as e:
        name = "upstream" if key == "upstreams" else key.replace("_", "-")  # the flag the user typed
        raise ConfigError(f"{name}: {e}") from None


def _check_join_dns(name: str) -> str:
    """NAME or NAME:PORT (the port defaults to --peer-listen's), as discovery.dns.split_name reads it."""
    n = name.strip()
    host, port = split_name(n, 0)
    if ":" in host:  # no port split off: a bare IPv6 address, or a port that is no number
        try:
            ipaddress.IPv6Address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"expected NAME or NAME:PORT, got {name!r}") from None
    port_given = host not in (n, n.strip("[]"))  # a port was split off
    if not host or any(c.isspace() or c in "/@," for c in host) or port_given and not 1 <= port <= 65535:
        raise ValueError(f"expected NAME or NAME:PORT, got {name!r}")
    return n


def _parse_upstreams(value: Any) -> dict[str, str]:
    """`["docker.io=http://…"]`, `"docker.io=…,ghcr.io=…"` or a TOML table `{ "docker.io" = "…" }`."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        items = value if isinstance(value, list) else str(value).split(",")
        pairs = []
        for item in items:
            ns, sep, url = str(item).partition("=")
            if not sep or not ns.strip() or not url.strip():
                raise ValueError(f"expected NS=URL, got {item!r}")
            pairs.append((ns.strip(), url.strip()))
    out: dict[str, str] = {}
    for ns, url in pairs:
        try:
            check_ns(str(ns))
        except OciError as e:  # "Docker.IO" or "bad ns" would never match a request's namespace
            raise ValueError(f"{ns!r}: {e.message}") from None
        if str(ns) in out:  # the last one silently won
            raise ValueError(f"namespace {ns} is given twice ({out[str(ns)]} and {url})")
        # (with or without a scheme: the scheme's own error below would echo the URL, password and all)
        rest = str(url).partition("://")[2] or str(url).lstrip("/")
        authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
        if "@" in authority:
            # httpx would quietly send them as Basic auth, and the URL, password and all, would reach log lines
            # and error messages. Not echoed here either: this message is printed.
            host = authority.rpartition("@")[2]
            raise ValueError(f"upstream URL for {ns} must not carry credentials (user:password@{host}); put them "
                             f'in the credentials file (--credentials) under ["{host}"] and give the URL without')
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"upstream URL for {ns} must start with http:// or https://, got {url!r}")
        try:
            parts = urllib.parse.urlsplit(str(url))
            port = parts.port  # ValueError for a port out of range or not a number
        except ValueError as e:
            raise ValueError(f"upstream URL for {ns} is not a valid URL ({e}): {url!r}") from None
        if not parts.hostname or any(c in str(url) for c in " \t,\"<>\\") or port == 0:
            raise ValueError(f"upstream URL for {ns} is not a valid URL: {url!r}")
        out[str(ns)] = str(url).rstrip("/")
    return out


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge defaults < TOML file < environment < flags. `flags` holds only the flags the user gave."""
    env = os.environ if env is None else env
    known = {f.name for f in fields(Settings)}
    merged: dict[str, Any] = {}
    path = config_file or (Path(env["P2PCACHE_CONFIG"]) if env.get("P2PCACHE_CONFIG") else None)
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
        spelled: dict[str, str] = {}
        for k, v in doc.items():
            key = k.replace("-", "_")
            if key == "upstream":
                key = "upstreams"
            if key not in known:
                raise ConfigError(f"config: unknown setting {k!r} in {path}")
            if key in spelled:  # "upstream" and "upstreams", or "max-disk" and "max_disk": one would be lost
                raise ConfigError(f"config: {spelled[key]!r} and {k!r} in {path} are the same setting; give one")
            spelled[key] = k
            merged[key] = v
    for k, v in env.items():
        key = _env_key(k)
        if key in known:
            merged[key] = v
    for k, v in (flags or {}).items():
        if v is not None:
            merged[k] = v
    values = {k: _coerce(k, v) for k, v in merged.items()}
    if values.get("upstream_ca") is not None:
        upstream_tls_context(values["upstream_ca"])  # a missing or garbled file is a start-up error
    if values.get("cluster_secret_file") is not None:
        try:  # a missing, empty or unreadable secret is a start-up error, not a traceback when the swarm starts
            load_secret(values["cluster_secret_file"])
        except (OSError, ValueError) as e:
            raise ConfigError(f"cluster-secret-file: {values['cluster_secret_file']}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
    addrs = [("join", a) for a in values.get("join") or []]
    if values.get("tracker"):
        addrs.append(("tracker", values["tracker"]))
    peer_listen, advertise = values.get("peer_listen"), values.get("advertise")
    if advertise and parse_hostport(advertise)[0] in _WILDCARDS:
        raise ConfigError(f"advertise: {advertise} is no address another node can dial; give this node's own "
                          "(e.g. the pod or host IP)")
    if advertise:
        addrs.append(("advertise", advertise))
    for key, addr in addrs:
        problem = dial_problem(addr)  # what peers would refuse to dial (swarm/wire.py), refused here first
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")
    if values.get("default_ns") is not None:
        try:
            check_ns(values["default_ns"])
        except OciError as e:
            raise ConfigError(f"default-ns: {e.message}") from None
    if peer_listen and not advertise:
        host, port = parse_hostport(peer_listen)
        if host in _WILDCARDS:
            # Peers would be told to dial 0.0.0.0: the swarm silently never forms. Say so at start-up instead.
            raise ConfigError(f"peer-listen: {peer_listen} listens on every address; say which one other nodes "
                              f"should dial with --advertise HOST:{port} (e.g. the pod or host IP)")
    return Settings(**values)


def unknown_env_settings(env: Mapping[str, str] | None = None) -> list[str]:
    """`P2PCACHE_*` variables that name no setting (a typo such as P2PCACHE_MAXDISK), for a start-up warning.
    Not an error, unlike an unknown TOML key: Kubernetes puts P2PCACHE_SERVICE_HOST, P2PCACHE_PORT_5000_TCP
    and the like into every pod of a namespace with a Service named p2pcache, and those are left out."""
    env = os.environ if env is None else env
    known = {f.name for f in fields(Settings)}
    return sorted(k for k in env if k.startswith("P2PCACHE_") and k != "P2PCACHE_CONFIG"
                  and not k.startswith(_K8S_SERVICE_ENV) and _env_key(k) not in known)


def _env_key(name: str) -> str | None:
    """The setting a `P2PCACHE_<NAME>` variable sets (P2PCACHE_UPSTREAM: upstreams), None for any other."""
    if not name.startswith("P2PCACHE_") or name == "P2PCACHE_CONFIG":
        return None
    key = name[len("P2PCACHE_"):].lower()
    return "upstreams" if key == "upstream" else key


def _system_store_present(paths: ssl.DefaultVerifyPaths) -> bool:
    """Whether the system's CA store holds anything: a non-empty CA file, or a CA directory with an entry. A
    directory alone is no store: Debian's `openssl` package owns /etc/ssl/certs, so an image with openssl and
    without ca-certificates has it empty, and a context on it trusted nothing (found in review)."""
    try:
        if paths.cafile and os.path.getsize(paths.cafile) > 0:
            return True
    except OSError:
        pass
    try:
        if paths.capath:
            with os.scandir(paths.capath) as entries:
                return any(True for _ in entries)
    except OSError:
        pass
    return False


def upstream_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """What upstream TLS connections trust: the system's store, as Docker and containerd do (a CA that
    `update-ca-certificates` added is trusted; SSL_CERT_FILE / SSL_CERT_DIR replace the store, as OpenSSL reads
    them), and `ca_file` on top (a private registry's own CA). httpx's default would be certifi's bundle alone,
    which knows no CA of the site's own. Only where the system's store is missing or empty (a slim image without
    ca-certificates) does certifi's bundle stand in for it, so public registries still verify.
    ConfigError when the file cannot be read or holds no certificate."""
    if _system_store_present(ssl.get_default_verify_paths()):
        ctx = ssl.create_default_context()
    else:
        ctx = ssl.create_default_context(cafile=certifi.where())
    if ca_file is None:
        return ctx
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"upstream-ca: cannot load CA certificates from {ca_file}: {e}") from None
    return ctx


def add_node_flags(p: argparse.ArgumentParser) -> None:
    """The `p2pcache node` flags; every dest is a Settings field name."""
    a = p.add_argument
    a("--config", type=Path, help="TOML file with the same keys as these flags")
    a("--listen", help="registry API address (default 0.0.0.0:5000)")
    a("--admin-listen", dest="admin_listen", help="admin API address (default 127.0.0.1:5001)")
    a("--data", help="store directory (default /var/lib/p2pcache as root, else $XDG_CACHE_HOME/p2pcache, "
                     "~/.cache/p2pcache without it)")
    a("--upstream", dest="upstreams", action="append", metavar="NS=URL",
      help="upstream registry for namespace NS, repeatable (default docker.io=https://registry-1.docker.io)")
    a("--default-ns", dest="default_ns", help="namespace of requests that name none (default docker.io)")
    a("--credentials", help="registry credentials: TOML or Docker config.json (auths)")
    a("--upstream-ca", dest="upstream_ca",
      help="PEM file of CA certificates to trust for upstream registries (besides the system's store)")
    a("--max-disk", dest="max_disk", help="disk quota for the store, e.g. 20GiB (LRU eviction)")
    a("--tag-ttl", dest="tag_ttl", help="how long a tag's digest is cached, e.g. 30s")
    a("--log-level", dest="log_level", help="debug, info, warning or error")
    a("--log-format", dest="log_format", help="text or json")
    a("--peer-listen", dest="peer_listen", help="where to serve pieces to peers, e.g. 0.0.0.0:5002")
    a("--join", action="append",
      help="peer addresses of cluster members, comma-separated or repeated")
    a("--join-dns", dest="join_dns", help="DNS name whose A/AAAA records are cluster members")
    a("--advertise", help="peer address other nodes should use for this one")
    a("--zone", help="this node's zone; same-zone peers are preferred")
    a("--cluster-secret-file", dest="cluster_secret_file", help="shared secret peers must prove")
    a("--upload-limit", dest="upload_limit", help="peer upload limit, e.g. 50MB/s")
    a("--download-limit", dest="download_limit", help="download limit (upstream and peers), e.g. 50MB/s")
    a("--piece-size", dest="piece_size", help="piece size override, e.g. 4MiB")
    a("--tracker", help="a single tracker address (instead of rendezvous over members)")


def settings_from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    flags = {f.name: getattr(ns, f.name, None) for f in fields(Settings)}
    return load_settings(flags, env, getattr(ns, "config", None))


def split_list(values: Sequence[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]
