"""Mirror benchmark (issue 2): the p2pcache node against the real docker-registry, on loopback, with curl.

In one run, on one random blob (1 GiB unless --size says otherwise):
  (a) push the blob to a real docker-registry (the "origin"), which is also the upstream of everything below;
  (b) warm: throughput of the origin serving the blob from its disk vs a primed node serving it from its store;
  (c) cold: docker-registry in proxy mode (`proxy: {remoteurl: origin}`) vs the node pulling through, each with a
      fresh store every run; plus the origin's GETs and bytes per cold pull, read from its access log;
  (d) peak RSS of the node process while N clients (4) download the blob at once, cold and warm, for two blob sizes
      (flat in blob size is the goal), next to the registry's for context.
Measurements alternate registry / node run by run and report the median. This prints figures; it asserts only
that every download got the right number of bytes (and, once per side, the right digest).

    .venv/bin/python bench/mirror_bench.py                 # 1 GiB, 3 runs (several minutes)
    .venv/bin/python bench/mirror_bench.py --size 64MiB --runs 1   # a quick check

It never listens beyond 127.0.0.1, works in a scratch directory, and stops only the processes it started.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    AccessLog,
    GiB,
    Proc,
    Pull,
    RssSampler,
    UpstreamUse,
    cpu_seconds,
    curl_get,
    curl_many,
    curl_sha256,
    fmt_rate,
    fmt_size,
    free_port,
    fresh_writes,
    make_blob,
    make_tls_cert,
    median,
    parse_size,
    proc_status_kib,
    push_blob,
    reset_peak_rss,
    spawn,
    start_registry,
    thread_cpu_seconds,
)

DEFAULT_NODE_CMD = (
    "{python} -m p2pcache node --listen {listen} --admin-listen {admin} --data {data} "
    "--upstream docker.io={upstream} --log-level warning"
)


@dataclass
class Blob:
    size: int
    path: Path
    digest: str


@dataclass
class RssResult:
    size: int
    idle_kib: int | None = None
    cold_kib: int | None = None  # node: peak while N clients pull a cold blob through it
    warm_kib: int | None = None  # node: peak while N clients pull it from the store
    cold_upstream: UpstreamUse | None = None
    cold_wall: float | None = None
    warm_wall: float | None = None
    reg_cold_kib: int | None = None  # docker-registry proxy mode, same N cold clients
    reg_warm_kib: int | None = None  # docker-registry (origin) serving from disk to N clients
    reg_cold_upstream: UpstreamUse | None = None
    reg_cold_wall: float | None = None
    reg_warm_wall: float | None = None


@dataclass
class PullCpu:
    """CPU seconds during one cold pull (from the request to the client's last byte)."""

    server: float | None  # the proxy, or the node (every thread, ended ones included)
    origin: float | None
    client: float  # curl
    threads: list[float]  # the server's busiest live threads, most first


@dataclass
class Results:
    warm_reg: list[float] = field(default_factory=list)
    warm_node: list[float] = field(default_factory=list)
    cold_reg: list[float] = field(default_factory=list)
    cold_node: list[float] = field(default_factory=list)
    cold_reg_ttfb: list[float] = field(default_factory=list)
    cold_node_ttfb: list[float] = field(default_factory=list)
    cold_reg_use: list[UpstreamUse] = field(default_factory=list)
    cold_node_use: list[UpstreamUse] = field(default_factory=list)
    cold_reg_cpu: list[PullCpu] = field(default_factory=list)
    cold_node_cpu: list[PullCpu] = field(default_factory=list)
    cold_store: list[float] = field(default_factory=list)  # a new file of the blob's size written, bytes/s
    # warm runs with the server's threads on core 0 and curl on core 0 ("same") or core 1 ("other")
    placed: dict[str, list[float]] = field(default_factory=dict)  # "reg same", "reg other", "node same", ...
    restart_first: list[float] = field(default_factory=list)  # the node's first warm serve after a restart
    restart_next: list[float] = field(default_factory=list)  # ... and the one after it
    rss: list[RssResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.repo = args.repo
        self.origin: Proc | None = None
        self.access: AccessLog | None = None
        self.results = Results()
        self._n = 0

    # ------------------------------------------------------------------------------------------- plumbing

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.repo}/blobs/{digest}"

    def start_node(self, data: Path | None = None) -> tuple[Proc, Path]:
        """A node on a fresh store, or on `data` as a stopped node left it (a restart)."""
        assert self.origin is not None
        self._n += 1
        name = f"node{self._n}"
        if data is None:
            data = self.workdir / name
            shutil.rmtree(data, ignore_errors=True)
        port, admin = free_port(), free_port()
        cmd = self.args.node_cmd.format(
            python=shlex.quote(sys.executable), listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin}",
            data=shlex.quote(str(data)), upstream=self.origin.url)
        proc = spawn(name, shlex.split(cmd), self.workdir / f"{name}.log", port, ready_path="/healthz")
        return proc, data

    def drop(self, proc: Proc, root: Path) -> None:
        proc.stop()
        if not self.args.keep:
            shutil.rmtree(root, ignore_errors=True)

    def wait_stored(self, root: Path, blob: Blob, timeout: float) -> bool:
        """Wait until a file of the blob's size named by its hex digest (or in a dir so named) is under root:
        the proxy's background fetch and the node's commit are then done, so the access log is complete."""
        hexd = blob.digest.split(":", 1)[1]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in root.rglob("*"):
                if (p.name == hexd or p.parent.name == hexd) and p.is_file():
                    try:
                        if p.stat().st_size == blob.size:
                            time.sleep(0.3)  # let the access log line land
                            return True
                    except OSError:
                        pass
            time.sleep(0.2)
        return False

    def pull_with_cpu(self, proc: Proc, url: str) -> tuple[Pull, PullCpu]:
        """One curl download from `proc`, with the CPU that `proc`, the origin and curl spent meanwhile."""
        assert self.origin is not None
        s0, o0, t0, c0 = cpu_seconds(proc.pid), cpu_seconds(self.origin.pid), thread_cpu_seconds(proc.pid), os.times()
        pull = curl_get(url)
        s1, o1, t1, c1 = cpu_seconds(proc.pid), cpu_seconds(self.origin.pid), thread_cpu_seconds(proc.pid), os.times()
        threads = sorted((v - t0.get(k, 0.0) for k, v in t1.items()), reverse=True)[:3]
        return pull, PullCpu(None if s0 is None or s1 is None else s1 - s0,
                             None if o0 is None or o1 is None else o1 - o0,
                             c1.children_user + c1.children_system - c0.children_user - c0.children_system,
                             threads)

    def placed_runs(self, key: str, pid: int, url: str, blob: Blob) -> None:
        """Warm runs with every thread of `pid` on core 0 and curl on core 0, then on core 1: which core the
        kernel gives curl decides a warm run here (bench/README.md, Results). Nothing with one core."""
        if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
            return
        every = os.sched_getaffinity(pid)
        try:
            self.pin(pid, {0})
            for core, where in ((0, "same"), (1, "other")):
                for _ in range(2):
                    pull = curl_get(url, prefix=["taskset", "-c", str(core)])
                    speed = self.check(pull, blob, f"{key} warm on core {core}")
                    self.results.placed.setdefault(f"{key} {where}", []).append(speed)
        finally:
            self.pin(pid, every)  # every thread it has now: it may have started some while pinned (found in review)

    @staticmethod
    def pin(pid: int, cores: set[int]) -> None:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), cores)

    def check(self, pull: Pull, blob: Blob, what: str) -> float:
        if not pull.ok(blob.size):
            raise RuntimeError(f"{what}: HTTP {pull.status}, {pull.size} of {blob.size} bytes")
        return pull.speed

    # ------------------------------------------------------------------------------------------- steps

    def setup(self) -> list[Blob]:
        tls = None
        if self.args.tls:
            tls = make_tls_cert(self.workdir)
            # Every client started from here (urllib, curl, the node's httpx, the proxy's Go) trusts it.
            os.environ["SSL_CERT_FILE"] = os.environ["CURL_CA_BUNDLE"] = str(tls[0])
        self.log(f"starting docker-registry (origin{', HTTPS' if tls else ''})")
        self.origin = start_registry(self.workdir, "origin", tls=tls)
        self.access = AccessLog(self.origin.log)
        sizes = sorted({self.args.size, *self.args.rss_sizes})
        blobs = []
        for size in sizes:
            t0 = time.monotonic()
            path = self.workdir / f"blob-{size}"
            digest = make_blob(path, size)
            t1 = time.monotonic()
            push_blob(self.origin.url, self.repo, path, digest)
            t2 = time.monotonic()
            self.log(f"blob {fmt_size(size)} {digest[:19]}…: made in {t1 - t0:.1f}s, pushed in {t2 - t1:.1f}s")
            blobs.append(Blob(size, path, digest))
            if not self.args.keep:
                path.unlink()  # the origin holds it now
        return blobs

    def warm(self, blob: Blob) -> None:
        assert self.origin is not None
        origin_url = self.origin.url + self.blob_path(blob.digest)
        got = curl_sha256(origin_url)
        if got != blob.digest:
            raise RuntimeError(f"origin serves a wrong blob: {got}")
        node: Proc | None = None
        node_url = ""
        try:
            node, data = self.start_node()
            node_url = node.url + self.blob_path(blob.digest)
            self.log("warm: priming the node")
            self.check(curl_get(node_url), blob, "node prime")
            if not self.wait_stored(data, blob, 120):
                self.results.notes.append("warm: the primed blob did not appear in the node's store")
            got = curl_sha256(node_url)
            if got != blob.digest:
                raise RuntimeError(f"node serves a wrong blob: {got}")
            curl_get(node_url)  # one unmeasured run, so it reads from the page cache
        except RuntimeError as e:
            self.fail("warm (node)", e)
            if node is not None:
                self.drop(node, data)
            node = None
        try:
            curl_get(origin_url)
            for i in range(self.args.runs):
                r = self.check(curl_get(origin_url), blob, "registry warm")
                self.results.warm_reg.append(r)
                if node is None:
                    self.log(f"warm run {i + 1}: registry {fmt_rate(r)}")
                    continue
                try:
                    n = self.check(curl_get(node_url), blob, "node warm")
                except RuntimeError as e:
                    self.fail("warm (node)", e)
                    self.drop(node, data)
                    node = None
                    continue
                self.results.warm_node.append(n)
                self.log(f"warm run {i + 1}: registry {fmt_rate(r)}, node {fmt_rate(n)}")
            assert self.origin is not None
            self.placed_runs("reg", self.origin.pid, origin_url, blob)
            if node is not None:
                self.placed_runs("node", node.pid, node_url, blob)
                # A restart: the stored blob is hashed on its first serve (fetch.StoreCheck), then trusted.
                node.stop()
                node, data = self.start_node(data)
                node_url = node.url + self.blob_path(blob.digest)
                self.results.restart_first.append(self.check(curl_get(node_url), blob, "node after a restart"))
                self.results.restart_next.append(self.check(curl_get(node_url), blob, "node after a restart"))
                placed = ", ".join(f"{k} {' '.join(fmt_rate(v) for v in vs)}" for k, vs in self.results.placed.items())
                self.log(f"warm, curl on the server's core (same) or another (other): {placed}; after a restart: "
                         f"first {fmt_rate(self.results.restart_first[-1])}, next "
                         f"{fmt_rate(self.results.restart_next[-1])}")
        finally:
            if node is not None:
                self.drop(node, data)

    def cold_registry(self, blob: Blob) -> None:
        assert self.origin is not None and self.access is not None
        proxy = start_registry(self.workdir, "proxy", remoteurl=self.origin.url)
        root = self.workdir / "proxy"
        try:
            self.access.mark()
            pull, cpu = self.pull_with_cpu(proxy, proxy.url + self.blob_path(blob.digest))
            speed = self.check(pull, blob, "registry cold")
            self.results.cold_reg_cpu.append(cpu)
            if not self.wait_stored(root, blob, 120):
                self.results.notes.append("cold: the proxy's background fetch did not finish within 120s")
            use = self.access.since_mark(self.blob_path(blob.digest))
        finally:
            self.drop(proxy, root)
        self.results.cold_reg.append(speed)
        self.results.cold_reg_ttfb.append(pull.ttfb)
        self.results.cold_reg_use.append(use)
        self.log(f"cold registry (proxy mode): {fmt_rate(speed)}, upstream {use.gets} GET "
                 f"{use.heads} HEAD {fmt_size(use.bytes)}")

    def cold_node(self, blob: Blob) -> None:
        assert self.access is not None
        node, data = self.start_node()
        try:
            self.access.mark()
            pull, cpu = self.pull_with_cpu(node, node.url + self.blob_path(blob.digest))
            speed = self.check(pull, blob, "node cold")
            self.results.cold_node_cpu.append(cpu)
            if not self.wait_stored(data, blob, 60):
                self.results.notes.append("cold: the node's store did not show the blob within 60s")
            use = self.access.since_mark(self.blob_path(blob.digest))
        finally:
            self.drop(node, data)
        self.results.cold_node.append(speed)
        self.results.cold_node_ttfb.append(pull.ttfb)
        self.results.cold_node_use.append(use)
        self.log(f"cold node: {fmt_rate(speed)}, upstream {use.gets} GET {use.heads} HEAD {fmt_size(use.bytes)}")

    def many(self, proc: Proc, blob: Blob, what: str) -> tuple[int | None, float]:
        """N clients at once against proc; returns (peak RSS in KiB, wall seconds)."""
        reset = reset_peak_rss(proc.pid)
        with RssSampler(proc.pid) as sampler:
            pulls, wall = curl_many(proc.url + self.blob_path(blob.digest), self.args.clients)
        for p in pulls:
            self.check(p, blob, what)
        hwm = proc_status_kib(proc.pid, "VmHWM") if reset else None
        peak = max(hwm or 0, sampler.max_kib) or None
        return peak, wall

    def rss_node(self, blob: Blob, res: RssResult) -> None:
        assert self.access is not None
        node, data = self.start_node()
        try:
            time.sleep(0.5)
            res.idle_kib = proc_status_kib(node.pid, "VmRSS")
            self.access.mark()
            res.cold_kib, res.cold_wall = self.many(node, blob, "node cold (N clients)")
            self.wait_stored(data, blob, 60)
            res.cold_upstream = self.access.since_mark(self.blob_path(blob.digest))
            res.warm_kib, res.warm_wall = self.many(node, blob, "node warm (N clients)")
        finally:
            self.drop(node, data)
        self.log(f"RSS {fmt_size(blob.size)}: node idle {res.idle_kib} KiB, cold {res.cold_kib} KiB, "
                 f"warm {res.warm_kib} KiB")

    def rss_registry(self, blob: Blob, res: RssResult) -> None:
        assert self.origin is not None and self.access is not None
        res.reg_warm_kib, res.reg_warm_wall = self.many(self.origin, blob, "registry warm (N clients)")
        proxy = start_registry(self.workdir, "proxy", remoteurl=self.origin.url)
        root = self.workdir / "proxy"
        try:
            self.access.mark()
            res.reg_cold_kib, res.reg_cold_wall = self.many(proxy, blob, "registry cold (N clients)")
            self.wait_stored(root, blob, 120)
            time.sleep(1.0)  # concurrent background fetches may end after the first one
            res.reg_cold_upstream = self.access.since_mark(self.blob_path(blob.digest))
        finally:
            self.drop(proxy, root)
        self.log(f"RSS {fmt_size(blob.size)}: registry cold {res.reg_cold_kib} KiB, warm {res.reg_warm_kib} KiB")

    # ------------------------------------------------------------------------------------------- run

    def run(self) -> Results:
        blobs = self.setup()
        main_blob = next(b for b in blobs if b.size == self.args.size)
        parts = self.args.only or ["warm", "cold", "rss"]
        if "warm" in parts:
            self.guard("warm", lambda: self.warm(main_blob))
        if "cold" in parts:
            for _ in range(self.args.runs):
                self.guard("cold (registry)", lambda: self.cold_registry(main_blob))
                self.guard("cold (node)", lambda: self.cold_node(main_blob))
            # After every pull (see _common.fresh_writes).
            self.results.cold_store += [r for r, _ in fresh_writes(self.workdir, main_blob.size, self.args.runs)]
        if "rss" in parts:
            for b in blobs:
                if b.size in self.args.rss_sizes:
                    res = RssResult(b.size)
                    self.results.rss.append(res)
                    self.guard(f"rss {fmt_size(b.size)} (node)", lambda b=b, res=res: self.rss_node(b, res))
                    if not self.args.no_registry_rss:
                        self.guard(f"rss {fmt_size(b.size)} (registry)",
                                   lambda b=b, res=res: self.rss_registry(b, res))
        return self.results

    def guard(self, what: str, fn) -> None:
        try:
            fn()
        except RuntimeError as e:
            self.fail(what, e)

    def fail(self, what: str, e: Exception) -> None:
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        short = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1].strip()}"
        self.results.notes.append(f"{what} failed: {short}")
        self.log(f"{what} FAILED: {e}")

    def close(self) -> None:
        if self.origin is not None:
            self.origin.stop()


# ----------------------------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def use_str(uses: list[UpstreamUse]) -> str:
    if not uses:
        return "n/a"
    gets = sorted(u.gets for u in uses)
    heads = sorted(u.heads for u in uses)
    byts = median([u.bytes for u in uses]) or 0
    g = str(gets[0]) if gets[0] == gets[-1] else f"{gets[0]}–{gets[-1]}"
    h = str(heads[0]) if heads[0] == heads[-1] else f"{heads[0]}–{heads[-1]}"
    return f"{g} GET + {h} HEAD, {fmt_size(byts)}"


def cpu_str(cpus: list[PullCpu]) -> str:
    if not cpus:
        return "n/a"

    def med(values: list[float | None]) -> str:
        m = median([v for v in values if v is not None])
        return "?" if m is None else f"{m:.2f}"

    return " / ".join((med([c.server for c in cpus]), med([c.origin for c in cpus]), med([c.client for c in cpus])))


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f} MiB"


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f"  (runs {min(values) / 1e9:.2f}–{max(values) / 1e9:.2f})"


def report(args: argparse.Namespace, res: Results) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    wr, wn = median(res.warm_reg), median(res.warm_node)
    cr, cn = median(res.cold_reg), median(res.cold_node)
    rows.append(("warm: served from its disk/store", fmt_rate(wr), fmt_rate(wn), ratio(wn, wr), "≥ 1.00×"))
    pl = {k: median(v) for k, v in res.placed.items()}
    for where, label in (("same", "curl on the server's core"), ("other", "curl on another core")):
        if f"reg {where}" in pl or f"node {where}" in pl:
            rows.append((f"  warm, {label}", fmt_rate(pl.get(f"reg {where}")), fmt_rate(pl.get(f"node {where}")),
                         ratio(pl.get(f"node {where}"), pl.get(f"reg {where}")), ""))
    if res.restart_first:
        rows.append(("  warm after a restart: first serve / next", "",
                     f"{fmt_rate(median(res.restart_first))} / {fmt_rate(median(res.restart_next))}", "",
                     "(first: hashed)"))
    rows.append(("cold: pull-through, fresh store", fmt_rate(cr), fmt_rate(cn), ratio(cn, cr), "≥ 1.00×"))
    rows.append(("cold: time to first byte", ms(median(res.cold_reg_ttfb)), ms(median(res.cold_node_ttfb)),
                 "", "low"))
    rows.append(("cold: upstream use per pull", use_str(res.cold_reg_use), use_str(res.cold_node_use), "",
                 "1 GET"))
    if res.cold_reg_cpu or res.cold_node_cpu:
        rows.append(("cold: CPU-s per pull: server/origin/curl", cpu_str(res.cold_reg_cpu),
                     cpu_str(res.cold_node_cpu), "", ""))
    if res.cold_store:
        # The node stores the blob on the client's path; the proxy streams it and stores it from a second GET.
        rows.append(("cold: a new file of the blob's size written", "", fmt_rate(median(res.cold_store)), "",
                     "(the machine)"))
    n = args.clients
    for r in res.rss:
        s = fmt_size(r.size)
        rows.append((f"peak RSS, {n} clients cold, {s}", mib(r.reg_cold_kib), mib(r.cold_kib), "", "≤ 150 MiB"))
        rows.append((f"peak RSS, {n} clients warm, {s}", mib(r.reg_warm_kib), mib(r.warm_kib), "", "≤ 150 MiB"))
        if r.cold_upstream is not None:
            rows.append((f"  upstream use, {n} cold clients, {s}",
                         use_str([r.reg_cold_upstream]) if r.reg_cold_upstream else "n/a",
                         use_str([r.cold_upstream]), "", "1 GET"))
        if r.cold_wall and r.warm_wall:
            agg = lambda wall, size=r.size: f"{n * size / wall / 1e9:.2f} GB/s" if wall else "n/a"  # noqa: E731
            rows.append((f"  aggregate, {n} clients cold / warm, {s}",
                         f"{agg(r.reg_cold_wall)} / {agg(r.reg_warm_wall)}",
                         f"{agg(r.cold_wall)} / {agg(r.warm_wall)}", "", ""))
    if len(res.rss) >= 2 and all(r.warm_kib and r.cold_kib for r in res.rss):
        small, big = res.rss[0], res.rss[-1]
        d = max(big.cold_kib, big.warm_kib) - max(small.cold_kib, small.warm_kib)  # type: ignore[type-var]
        label = f"  node peak RSS growth {fmt_size(small.size)} → {fmt_size(big.size)}"
        rows.append((label, "", f"{d / 1024:+.0f} MiB", "", "≈ 0 (flat)"))
    head = ("", "docker-registry", "p2pcache node", "node÷registry", "goal")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(5)]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    out = [
        f"p2pcache mirror benchmark — blob {fmt_size(args.size)} (random), client: curl -o /dev/null, "
        f"median of {args.runs} run(s), 1 GB/s = 1e9 B/s{', origin over HTTPS' if args.tls else ''}",
        "registry columns: warm = docker-registry from its disk; cold = docker-registry proxy mode "
        "(remoteurl = the origin)",
        line(head),
        "  ".join("-" * w for w in widths),
        *[line(r) for r in rows],
    ]
    if args.runs > 1:
        out.append("")
        out.append("per-run GB/s: " + "; ".join(
            f"{k} {' '.join(f'{v / 1e9:.2f}' for v in vals)}" for k, vals in (
                ("warm registry", res.warm_reg), ("warm node", res.warm_node),
                ("cold registry", res.cold_reg), ("cold node", res.cold_node)) if vals))
    if res.cold_node_cpu:
        busiest = [median([c.threads[i] for c in res.cold_node_cpu if len(c.threads) > i] or [0.0]) or 0.0
                   for i in range(3)]
        out.append("cold: the node's busiest threads per pull (median CPU-s): "
                   + ", ".join(f"{t:.2f}" for t in busiest))
    for note in res.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=GiB, help="blob size for warm/cold (default 1GiB)")
    p.add_argument("--rss-sizes", type=lambda s: [parse_size(x) for x in s.split(",")], default=None,
                   help="blob sizes for the RSS figure, comma-separated (default SIZE/4,SIZE)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per figure; the median is printed")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients for the RSS figure")
    p.add_argument("--only", action="append", choices=["warm", "cold", "rss"], help="run only these parts")
    p.add_argument("--no-registry-rss", action="store_true", help="skip the registry's RSS (context only)")
    p.add_argument("--repo", default="library/bench", help="repository the blob is pushed to")
    p.add_argument("--node-cmd", default=DEFAULT_NODE_CMD,
                   help="command that runs a node; {python} {listen} {admin} {data} {upstream} are filled in")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory parent (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory and stores")
    p.add_argument("--tls", action="store_true",
                   help="the origin serves HTTPS with a self-signed certificate (as Docker Hub serves TLS); the "
                        "node and the proxy fetch from it over TLS")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--json", type=Path, help="also write the raw results (every run) as JSON to this file")
    args = p.parse_args(argv)
    if args.rss_sizes is None:
        args.rss_sizes = sorted({max(args.size // 4, 1), args.size})
    workdir = Path(tempfile.mkdtemp(prefix="p2pcache-bench-", dir=args.workdir))
    bench = Bench(args, workdir)
    try:
        res = bench.run()
    except KeyboardInterrupt:
        return 130
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=sys.stderr)
    print(report(args, res))
    if args.json:
        doc = {"size": args.size, "runs": args.runs, "clients": args.clients, **dataclasses.asdict(res)}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
