"""Shared helpers for the benchmarks in bench/: processes, blobs, curl, access logs, RSS.

Benchmarks print figures; they are not tests and assert nothing beyond "the bytes arrived". Everything here
listens on 127.0.0.1 only, works in a scratch directory it is given, and stops what it started. It never
touches another process than the ones it spawned.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
CURL_BIN = shutil.which("curl") or "/usr/bin/curl"


# --------------------------------------------------------------------------------------------------- sizes


def parse_size(text: str) -> int:
    """'1GiB' / '256MiB' / '64M' / '1000000' -> bytes (binary units for K/M/G with or without 'iB')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def fmt_size(n: float) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= mult:
            return f"{n / mult:.2f} {unit}" if n % mult else f"{int(n // mult)} {unit}"
    return f"{int(n)} B"


def fmt_rate(bps: float | None) -> str:
    return "n/a" if bps is None else f"{bps / GB:.2f} GB/s"


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------------------------------- ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, method: str = "GET", timeout: float = 2.0) -> int | None:
    """Status of a small request, None when nothing answers."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


# --------------------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A process we started, its log file, and the port it serves."""

    name: str
    popen: subprocess.Popen
    log: Path
    port: int
    scheme: str = "http"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def spawn(name: str, argv: Sequence[str], log: Path, port: int, ready_path: str = "/v2/",
          timeout: float = 30.0, env: dict[str, str] | None = None, scheme: str = "http") -> Proc:
    """Start argv with stdout+stderr to `log`; wait until 127.0.0.1:port answers HTTP(S) on ready_path."""
    fh = open(log, "ab")
    popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env)
    fh.close()
    proc = Proc(name, popen, log, port, scheme)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{name} exited with {popen.returncode}:\n{proc.log_tail()}")
        status = http_status(proc.url + ready_path, timeout=1.0)
        if status is not None and status < 500:
            return proc
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{name} did not answer on {proc.url}{ready_path} within {timeout:.0f}s:\n"
                       f"{proc.log_tail()}")


def registry_config(root: Path, port: int, remoteurl: str | None = None,
                    tls: tuple[Path, Path] | None = None) -> str:
    """A docker-registry config (JSON is valid YAML): filesystem storage, access log on, optional proxy, optional
    TLS (certificate, key)."""
    import json

    doc: dict = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if remoteurl:
        doc["proxy"] = {"remoteurl": remoteurl}
    if tls:
        doc["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    return json.dumps(doc)


def start_registry(workdir: Path, name: str, remoteurl: str | None = None,
                   tls: tuple[Path, Path] | None = None) -> Proc:
    """A real distribution registry on a free loopback port with a fresh store under workdir/name; with `tls`
    (certificate, key) it serves HTTPS."""
    root = workdir / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    port = free_port()
    cfg = workdir / f"{name}.yml"
    cfg.write_text(registry_config(root / "data", port, remoteurl, tls))
    return spawn(name, [REGISTRY_BIN, "serve", str(cfg)], workdir / f"{name}.log", port,
                 scheme="https" if tls else "http")


def make_tls_cert(workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key) made with the openssl command: (cert, key).

    To have every client here trust it, point SSL_CERT_FILE (OpenSSL, Python, httpx, Go) and CURL_CA_BUNDLE
    (curl) at the certificate."""
    cert, key = workdir / "tls-cert.pem", workdir / "tls-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def registry_blob_path(registry_root: Path, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return registry_root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def node_blob_path(data: Path, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return data / "blobs/sha256" / hexd[:2] / hexd


def wait_for_file(path: Path, size: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.stat().st_size == size:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------------------------------- blobs


def make_blob(path: Path, size: int, chunk: int = 16 * MiB) -> str:
    """Write `size` random bytes to path; return its digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(chunk, left))
            h.update(b)
            f.write(b)
            left -= len(b)
    return "sha256:" + h.hexdigest()


def push_blob(registry_url: str, repo: str, path: Path, digest: str) -> None:
    """Monolithic upload: POST /blobs/uploads/ -> Location; PUT <location>&digest= with the body (curl -T)."""
    req = urllib.request.Request(f"{registry_url}/v2/{repo}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as r:
        if r.status != 202:
            raise RuntimeError(f"upload start: HTTP {r.status}")
        location = r.headers["Location"]
    if location.startswith("/"):
        location = registry_url + location
    sep = "&" if "?" in location else "?"
    out = subprocess.run(
        [CURL_BIN, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path),
         "-H", "Content-Type: application/octet-stream", f"{location}{sep}digest={digest}"],
        capture_output=True, text=True, check=False)
    if out.stdout.strip() != "201":
        raise RuntimeError(f"blob PUT: HTTP {out.stdout.strip()} {out.stderr.strip()}")


# --------------------------------------------------------------------------------------------------- curl


@dataclass
class Pull:
    status: int
    size: int
    seconds: float
    speed: float  # bytes/s as curl reports it (size / time_total)
    ttfb: float

    def ok(self, size: int) -> bool:
        return self.status == 200 and self.size == size


_CURL_FMT = "%{http_code} %{size_download} %{time_total} %{speed_download} %{time_starttransfer}"


def curl_argv(url: str, out: str = "/dev/null") -> list[str]:
    return [CURL_BIN, "-s", "-o", out, "-w", _CURL_FMT, url]


def parse_curl(text: str) -> Pull:
    parts = text.split()
    if len(parts) != 5:
        return Pull(0, 0, 0.0, 0.0, 0.0)
    code, size, total, speed, ttfb = parts
    return Pull(int(code), int(float(size)), float(total), float(speed), float(ttfb))


def curl_get(url: str, prefix: Sequence[str] = ()) -> Pull:
    """One download to /dev/null with curl (run under `prefix`, e.g. taskset); timing is curl's own."""
    out = subprocess.run([*prefix, *curl_argv(url)], capture_output=True, text=True, check=False)
    return parse_curl(out.stdout)


def curl_sha256(url: str) -> str:
    """Digest of what the URL serves (streamed through sha256sum, not timed)."""
    p1 = subprocess.Popen([CURL_BIN, "-sf", url], stdout=subprocess.PIPE)
    p2 = subprocess.run(["sha256sum"], stdin=p1.stdout, capture_output=True, text=True, check=False)
    assert p1.stdout is not None
    p1.stdout.close()
    p1.wait()
    return "sha256:" + p2.stdout.split()[0] if p2.stdout else ""


def curl_many(url: str, n: int) -> tuple[list[Pull], float]:
    """n curls started at once; returns their results and the wall time until the last one finished."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(curl_argv(url), stdout=subprocess.PIPE, text=True) for _ in range(n)]
    pulls = [parse_curl(p.communicate()[0]) for p in procs]
    return pulls, time.monotonic() - t0


# --------------------------------------------------------------------------------------------------- access log


_ACCESS = re.compile(r'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


@dataclass
class UpstreamUse:
    gets: int = 0
    heads: int = 0
    bytes: int = 0
    statuses: list[int] = field(default_factory=list)


class AccessLog:
    """Counts a registry's requests for one path from its access log, from a mark onwards."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def since_mark(self, path_suffix: str) -> UpstreamUse:
        use = UpstreamUse()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        for m in _ACCESS.finditer(text):
            method, target, status, size = m.groups()
            if not target.split("?", 1)[0].endswith(path_suffix):
                continue
            if method == "GET":
                use.gets += 1
                use.bytes += 0 if size == "-" else int(size)
                use.statuses.append(int(status))
            else:
                use.heads += 1
        return use


# --------------------------------------------------------------------------------------------------- memory


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each live thread of `pid`, by thread id; {} if it is gone."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        cpu = _stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        if cpu is not None:  # else the thread ended meanwhile
            out[int(tid)] = cpu
    return out


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) the process `pid` used so far, its ended threads included; None if gone."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def _stat_cpu_seconds(stat_path: str) -> float | None:
    """utime + stime from a /proc stat file, in seconds; None if it cannot be read."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fresh_writes(directory: Path, size: int, count: int, chunk: int = 2 * MiB) -> list[tuple[float, float]]:
    """(bytes/s, CPU-s) of writing `size` new bytes to each of `count` new files in `directory`, one after the
    other (pwrite from one reused buffer, no fsync, as a node stores what it receives); all deleted at the end,
    not one by one, so no write reuses the pages another freed. Run it after the pulls it is compared with:
    deleting the files frees their pages, and a write right after reuses them cheaply.

    The machine's bound for anything that stores what it receives: on this VM memory the guest freed goes back
    to the host (virtio-balloon free page reporting), and the copy into each fresh page-cache page pays the
    host's fault (this benchmark at 14:25 UTC, 2026-11-28, deleting each file before the next: 0.62 GB/s into the
    first, 3.3 GB/s into the two after it)."""
    buf = os.urandom(chunk)
    out: list[tuple[float, float]] = []
    paths: list[Path] = []
    try:
        for k in range(count):
            path = directory / f"fresh-write-{os.getpid()}-{k}"
            paths.append(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
                t0, c0 = time.perf_counter(), time.thread_time()
                for off in range(0, size, chunk):
                    os.pwrite(fd, buf[: min(chunk, size - off)], off)
                dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
            finally:
                os.close(fd)
            out.append((size / dt, cpu))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs permission on the process)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples VmRSS of a pid every `interval` seconds in a thread; max_kib is the peak seen."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid = pid
        self.interval = interval
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = proc_status_kib(self.pid, "VmRSS")
            if v is not None:
                self.max_kib = max(self.max_kib, v)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def python_exe() -> str:
    return sys.executable
