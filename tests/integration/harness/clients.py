"""The real clients: skopeo, containerd (+ ctr) and dockerd (+ docker), each with private paths.

- skopeo 1.9 reads registries.conf only from `--registries-conf FILE` placed before the subcommand.
- containerd gets its own root, state and sockets, the CRI plugin off; `ctr --hosts-dir` points it at a mirror.
- dockerd gets its own data root, exec root, pidfile and unix socket, no bridge and no iptables, and
  `--registry-mirror` at a node that must be listening before it starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Self

from .util import require_binary, tail, wait_until


def run(cmd: list[str], *, timeout: float = 180, check: bool = True, env: dict | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a client command; on failure the assertion shows its output."""
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, input=input)
    if check:
        assert p.returncode == 0, (
            f"{' '.join(cmd)} exited {p.returncode}\nstdout: {p.stdout.decode(errors='replace')[-3000:]}\n"
            f"stderr: {p.stderr.decode(errors='replace')[-3000:]}")
    return p


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- skopeo ---

def write_registries_conf(path: Path, mirrors: dict[str, str] | None = None,
                          insecure: list[str] | None = None) -> Path:
    """registries.conf (v2) sending namespace prefix -> mirror location (plain HTTP allowed)."""
    parts = []
    for prefix, location in (mirrors or {}).items():
        parts.append(f'[[registry]]\nprefix = "{prefix}"\nlocation = "{prefix}"\n'
                     f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n')
    for loc in insecure or []:
        parts.append(f'[[registry]]\nlocation = "{loc}"\ninsecure = true\n')
    path.write_text("\n".join(parts))
    return path


class Skopeo:
    """skopeo with a private registries.conf mapping namespace -> mirror location (e.g. "127.0.0.1:5000")."""

    def __init__(self, workdir: Path, mirrors: dict[str, str] | None = None,
                 insecure: list[str] | None = None) -> None:
        self.bin = require_binary("skopeo")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = write_registries_conf(self.dir / "registries.conf", mirrors, insecure)

    def cmd(self, *args: str) -> list[str]:
        return [self.bin, "--registries-conf", str(self.conf), *args]

    def copy(self, src: str, dest: Path, *extra: str, check: bool = True,
             timeout: float = 180) -> subprocess.CompletedProcess:
        return run(self.cmd("copy", "--retry-times", "0", *extra, src, f"dir:{dest}"), check=check,
                   timeout=timeout)

    def inspect_raw(self, ref: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(self.cmd("inspect", "--raw", *extra, ref), check=check, timeout=60)


def verify_dir_blobs(out: Path) -> list[str]:
    """Check every blob file of a skopeo `dir:` output: sha256(file) == its name. Returns the digests."""
    names = [p for p in out.iterdir() if len(p.name) == 64 and all(c in "0123456789abcdef" for c in p.name)]
    assert names, f"no blob files in {out}: {sorted(p.name for p in out.iterdir())}"
    for p in names:
        assert sha256_file(p) == p.name, f"blob file {p.name} has the wrong content"
    return sorted("sha256:" + p.name for p in names)


# --- daemons the tests start and stop ---

class _Daemon:
    """A long-running program with a log file and a readiness check (containerd, dockerd)."""

    name = "daemon"
    start_timeout = 30.0
    stop_timeout = 20.0
    log_path: Path
    proc: subprocess.Popen | None

    @property
    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{tail(self.log_path)}")
            return self.ready()

        wait_until(up, self.start_timeout, f"{self.name} to answer", interval=0.2)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# --- containerd ---

class Containerd(_Daemon):
    name = "containerd"
    def __init__(self, workdir: Path) -> None:
        self.bin = require_binary("containerd")
        self.ctr_bin = require_binary("ctr")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / "containerd.sock"
        self.config = self.dir / "config.toml"
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.dir}/root"\n'
            f'state = "{self.dir}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.sock}"\n'
            f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n')
        self.log_path = self.dir / "containerd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def argv(self) -> list[str]:
        return [self.bin, "--config", str(self.config)]

    def ready(self) -> bool:
        return self.sock.exists() and self.ctr("version", check=False).returncode == 0

    def ctr(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        return run([self.ctr_bin, "-a", str(self.sock), *args], check=check, timeout=timeout)

    def hosts_dir(self, name: str, mirrors: dict[str, str]) -> Path:
        """A --hosts-dir whose `<ns>/hosts.toml` sends pulls of namespace ns to the mirror URL, written by
        `p2pcache configure containerd` (so the real ctr checks the files users get)."""
        d = self.dir / "hosts" / name
        for ns, url in mirrors.items():
            subprocess.run([sys.executable, "-m", "p2pcache", "configure", "containerd", "--hosts-dir", str(d),
                            "--mirror", url, "--registry", ns], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
        return d

    def content_digests(self) -> set[str]:
        out = self.ctr("content", "ls", "-q").stdout.decode()
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    def content_bytes(self, digest: str) -> bytes:
        return self.ctr("content", "get", digest).stdout


# --- dockerd ---

class Dockerd(_Daemon):
    name = "dockerd"
    start_timeout = 60.0
    stop_timeout = 30.0

    def __init__(self, workdir: Path, mirror: str, insecure: list[str]) -> None:
        self.bin = require_binary("dockerd")
        self.docker_bin = require_binary("docker", "/usr/bin/docker")
        # Short paths: unix sockets under the exec root must fit in 108 bytes.
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / "docker.sock"
        self.log_path = self.dir / "dockerd.log"
        self.cmd = [self.bin, "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
                    "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.sock}",
                    "--iptables=false", "--bridge=none", "--ip-masq=false", "--registry-mirror", mirror]
        for reg in insecure:
            self.cmd += ["--insecure-registry", reg]
        self.proc: subprocess.Popen | None = None

    @property
    def argv(self) -> list[str]:
        return self.cmd

    def ready(self) -> bool:
        return self.sock.exists() and self.docker("version", check=False).returncode == 0

    def docker(self, *args: str, check: bool = True, timeout: float = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
        e = dict(os.environ)
        e.pop("DOCKER_HOST", None)
        e["DOCKER_CONFIG"] = str(self.dir / "client-config")
        e.update(env or {})
        return run([self.docker_bin, "-H", f"unix://{self.sock}", *args], check=check, timeout=timeout, env=e)


# --- podman ---

class Podman:
    """podman with private storage (vfs) and a registries.conf passed the way podman reads it: the environment."""

    def __init__(self, workdir: Path, mirrors: dict[str, str]) -> None:
        self.bin = require_binary("podman")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = write_registries_conf(self.dir / "registries.conf", mirrors)
        self.env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=str(self.conf))
        self.storage = Path(tempfile.mkdtemp(prefix="p2pm-"))  # podman wants a runroot under 50 characters

    def close(self) -> None:
        shutil.rmtree(self.storage, ignore_errors=True)

    def podman(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        cmd = [self.bin, "--root", str(self.storage / "root"), "--runroot", str(self.storage / "run"),
               "--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs", *args]
        return run(cmd, check=check, timeout=timeout, env=self.env)
