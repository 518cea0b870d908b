"""The real distribution registry (`docker-registry`) as an upstream: start, stop, restart, access log.

Its access log (combined log format with the response size, on stderr) is captured to a file, so tests can
count how often the node asked for a path and how many bytes it took.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from .util import free_port, port_open, require_binary, tail, wait_until

# "GET /v2/library/x/blobs/sha256:… HTTP/1.1" 200 52435854
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)')


@dataclass(frozen=True)
class Access:
    method: str
    target: str
    status: int
    size: int

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def parse_access_log(text: str) -> list[Access]:
    """Every request line of a registry's stderr, in order."""
    out = []
    for line in text.splitlines():
        m = _ACCESS.search(line)
        if m:
            size = 0 if m["size"] == "-" else int(m["size"])
            out.append(Access(m["method"], m["target"], int(m["status"]), size))
    return out


class Registry:
    """One docker-registry process on a loopback port with its own storage directory.

    The port and storage survive `stop()`/`start()`, so a test can take the upstream away and bring it back.
    `config_extra` is merged into the YAML (JSON) config, e.g. an `auth:` section.
    """

    def __init__(self, workdir: Path, port: int | None = None, config_extra: dict | None = None) -> None:
        self.bin = require_binary("docker-registry")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "storage"
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log_path = self.dir / "registry.log"
        self.proc: subprocess.Popen | None = None
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        config.update(config_extra or {})
        self.config_path = self.dir / "config.yml"
        self.config_path.write_text(json.dumps(config))

    def start(self) -> Registry:
        assert self.proc is None, "registry already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.bin, "serve", str(self.config_path)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited {self.proc.returncode}:\n{tail(self.log_path)}")
            return port_open("127.0.0.1", self.port)

        wait_until(up, 15, f"docker-registry on {self.host}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        wait_until(lambda: not port_open("127.0.0.1", self.port), 5, "registry port to close")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- the access log ---
    def accesses(self) -> list[Access]:
        return parse_access_log(self.log_path.read_text(errors="replace"))

    def log_mark(self) -> int:
        """Number of access lines so far: pass to `accesses_since` to look at what came after."""
        return len(self.accesses())

    def accesses_since(self, mark: int) -> list[Access]:
        return self.accesses()[mark:]

    def count(self, method: str, path: str, since: int = 0, settle: float = 0.3) -> int:
        """How many `method` requests for `path` (query ignored) the registry logged.

        The registry writes a line when a response is finished; wait `settle` seconds for stragglers.
        """
        time.sleep(settle)
        return sum(1 for a in self.accesses_since(since) if a.method == method and a.path == path)

    def bytes_sent(self, path_prefix: str = "/v2/", since: int = 0) -> int:
        return sum(a.size for a in self.accesses_since(since) if a.path.startswith(path_prefix))

    def counts(self, since: int = 0) -> Counter:
        return Counter((a.method, a.path) for a in self.accesses_since(since))

    # --- storage ---
    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes on disk (to corrupt it: bit rot)."""
        algo, hexd = digest.split(":", 1)
        return self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)
