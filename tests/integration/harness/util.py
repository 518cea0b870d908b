"""Small helpers shared by the harness: free ports, binaries, waiting for things."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

INSTALL_HINT = ("scripts/test installs it "
                "(apt-get install docker-registry skopeo containerd docker.io busybox-static podman)")


_handed_out: set[int] = set()
_handed_lock = threading.Lock()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now, and never one this test process handed out before.

    The kernel may give the same free port to two bind(0) calls when the first port is not in use yet: four
    nodes started at once then fought over one port, and one node's /healthz was answered by another node
    (a CI failure of test_node_killed_mid_transfer_others_finish).
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with _handed_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def require_binary(name: str, *candidates: str) -> str:
    """Path of a program the tests need; a missing one fails (never skips) with how to get it."""
    for c in (*candidates, name):
        p = shutil.which(c) if "/" not in c else (c if Path(c).exists() else None)
        if p:
            return p
    pytest.fail(f"required program {name!r} is not installed: {INSTALL_HINT}", pytrace=False)


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll `pred` until it returns something truthy; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the predicate may fail while the thing starts
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def proc_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's memory figure from /proc/PID/status, in MiB: VmRSS (resident now) or VmHWM (its peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")
