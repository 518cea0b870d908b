"""A p2pcache node as a subprocess (`python -m p2pcache node …`) on fixed loopback ports.

Ports are picked once, at construction, so a node can be stopped and restarted at the same address (dockerd is
configured with the mirror's address when it starts). `stop()` sends SIGTERM and asserts a clean exit and a
stderr without a Python traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .util import free_port, tail, wait_until

REPO_ROOT = Path(__file__).resolve().parents[3]


class Node:
    def __init__(self, workdir: Path, upstreams: dict[str, str], *, args: list[str] | None = None,
                 env: dict[str, str] | None = None, data: Path | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = data or self.dir / "data"
        self.port = free_port()
        self.admin_port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.upstreams = dict(upstreams)
        self.args = list(args or [])
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.wrap: list[str] = []  # a command the node runs under (e.g. `unshare` for a hosts file of its own)
        self.starts = 0
        self.log_path = self.dir / "node-0.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "p2pcache", "node", "--listen", self.host,
               "--admin-listen", f"127.0.0.1:{self.admin_port}", "--data", str(self.data)]
        for ns, url in self.upstreams.items():
            cmd += ["--upstream", f"{ns}={url}"]
        return self.wrap + cmd + self.args

    def start(self, timeout: float = 30) -> Node:
        assert self.proc is None, "node already running"
        self.log_path = self.dir / f"node-{self.starts}.log"
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PCACHE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.update(self.env)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=str(self.dir))
        log.close()

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode} before /healthz answered:\n"
                                     f"{' '.join(self.command())}\n{tail(self.log_path)}")
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200

        try:
            wait_until(healthy, timeout, f"node /healthz on {self.host}", interval=0.1)
        except AssertionError:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 20, check: bool = True) -> int:
        """SIGTERM; wait; assert exit status 0 (a clean shutdown, not death by the signal) and no traceback."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            raise AssertionError(f"node did not exit within {timeout}s of SIGTERM:\n{tail(self.log_path)}") from None
        self.proc = None
        if check:
            self.check_log()
            assert rc == 0, f"node exited {rc} on SIGTERM:\n{tail(self.log_path)}"
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> Node:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("node-*.log")))

    def check_log(self) -> None:
        text = self.log_text()
        assert "Traceback" not in text, f"node logged a traceback:\n{text[-6000:]}"

    # --- what the node exposes ---
    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Samples of /metrics: {(name, sorted label items): value}."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        out: dict[tuple[str, tuple], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for (n, lab), v in self.metrics().items():
            if n == name and all(dict(lab).get(k) == val for k, val in labels.items()):
                total += v
        return total

    def store_files(self, digest: str | None = None) -> list[Path]:
        """Complete blobs in the store (`DATA/blobs/…`), optionally only those named by `digest`'s hex.

        Waits first until the node has no download in flight: a client's last byte is released when the blob's
        hash matched, and the store's commit (fsync, then rename) lands a moment later.
        """
        if self.running:
            wait_until(lambda: self.metric("p2pcache_downloads_in_flight") == 0, 30, "downloads to settle")
        root = self.data / "blobs"
        if not root.exists():
            return []
        files = [p for p in root.rglob("*") if p.is_file()]
        if digest is not None:
            hexd = digest.split(":", 1)[-1]
            files = [p for p in files if hexd in p.name]
        return files
