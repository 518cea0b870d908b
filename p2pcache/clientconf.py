"""`p2pcache configure containerd`: write containerd's per-registry `hosts.toml` files that send pulls to a node.

containerd reads `<config_path>/<registry>/hosts.toml` (its CRI plugin's `config_path`, usually
`/etc/containerd/certs.d`, or `ctr images pull --hosts-dir DIR`): `server` is the registry itself, and each
`[host."URL"]` is a mirror tried first for the listed capabilities. containerd adds `?ns=<registry>` to a
mirror's requests, which the node uses to pick the upstream. Only pull and resolve go to the mirror (the node's
registry port is read-only; pushes go to `server`).

Files are written whole or not at all (temporary file, then rename), so a containerd that reads them while this
runs never sees half a file. Bad input ends with a one-line message (ConfigError), never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from p2pcache.config import ConfigError
from p2pcache.oci.errors import OciError
from p2pcache.oci.reference import check_ns

DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")


def registry_server(ns: str) -> str:
    """The registry's own URL, as containerd's `server` wants it (Docker Hub's API lives on registry-1)."""
    return "https://registry-1.docker.io" if ns == "docker.io" else f"https://{ns}"


def hosts_toml(ns: str, mirror: str) -> str:
    """The hosts.toml text for registry `ns` with `mirror` (a node's registry URL) in front of it."""
    return (f'# written by p2pcache configure containerd: pulls of {ns} go through the node first\n'
            f'server = "{registry_server(ns)}"\n\n'
            f'[host."{mirror}"]\n'
            f'  capabilities = ["pull", "resolve"]\n')


def check_mirror(url: str) -> str:
    """`url` without a trailing slash, if it is an http(s) URL of a host (and port); else ConfigError.

    It is written between quotes into TOML: a quote, a backslash or a space in it made a hosts.toml containerd
    cannot read (written over a good one), and 'http://[::1' a ValueError traceback (found in review)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"mirror: expected http(s)://HOST[:PORT] (a node's registry address), got {url!r}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.path not in {"", "/"} \
            or parts.query or parts.fragment or any(c in url for c in '"\\ \t\n\r<>,'):
        raise ConfigError(f"mirror: expected http(s)://HOST[:PORT] (a node's registry address), got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"mirror: bad port in {url!r}") from None
    if port == 0 or "@" in parts.netloc:
        # port 0 is no address containerd can dial; user:password@ would sit in a world-readable file, and
        # containerd sends no credentials from a host URL anyway (found in review: both were written)
        raise ConfigError(f"mirror: expected http(s)://HOST[:PORT] with no user:password@ and a port other than 0,"
                          f" got {parts.scheme}://{parts.hostname}{'' if port is None else f':{port}'}")
    return url.rstrip("/")


def write_containerd_hosts(hosts_dir: Path | str, mirror: str, registries: list[str],
                           force: bool = False) -> list[Path]:
    """Write `<hosts_dir>/<ns>/hosts.toml` for each registry; returns the files written.

    A hosts.toml that already says something else (another mirror, a CA of its own, or what another version of
    this command wrote) is refused unless `force`, and then kept beside it as `hosts.toml.bak`: it was replaced
    without a word, a company mirror's entry and CA with it (found in review). Checked for every registry before
    any file is written."""
    mirror = check_mirror(mirror)
    if not registries:
        raise ConfigError("registry: name at least one registry (e.g. docker.io)")
    for ns in registries:
        try:
            check_ns(ns)
        except OciError:
            raise ConfigError(f"registry: {ns!r} is not a registry host name (e.g. docker.io, ghcr.io)") from None
    written = []
    if not str(hosts_dir).strip():
        raise ConfigError("hosts-dir: must not be empty (an empty path is the current directory)")
    hosts_dir = Path(hosts_dir)
    differing = []
    for ns in registries:
        path = hosts_dir / ns / "hosts.toml"
        try:
            if path.read_text(errors="replace") != hosts_toml(ns, mirror):
                differing.append(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if not force:
                raise ConfigError(f"hosts-dir: cannot read {path}: {e.strerror}") from None
    if differing and not force:
        raise ConfigError(f"hosts-dir: {differing[0]} exists and says something else; run again with --force to "
                          "replace it (its content is kept as hosts.toml.bak beside it)")
    for ns in registries:
        d = hosts_dir / ns
        tmp: str | None = None
        try:
            d.mkdir(parents=True, exist_ok=True)
            if d / "hosts.toml" in differing:
                shutil.copyfile(d / "hosts.toml", d / "hosts.toml.bak")
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".hosts.toml.")
            with os.fdopen(fd, "w") as f:
                f.write(hosts_toml(ns, mirror))
            os.chmod(tmp, 0o644)
            os.replace(tmp, d / "hosts.toml")
            tmp = None
        except OSError as e:
            raise ConfigError(f"hosts-dir: cannot write {d / 'hosts.toml'}: {e.strerror}") from None
        finally:
            if tmp is not None:  # the old hosts.toml stands; no stray temporary file beside it
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        written.append(d / "hosts.toml")
    return written
