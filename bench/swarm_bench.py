"""Swarm benchmark (issue 3): N node processes pull one image at the same moment through a throttled upstream.

What it prints:
  (a) with the swarm: N nodes (`--peer-listen`, `--join`, `--upload-limit`/`--download-limit RATE`) in front of a
      real docker-registry behind a throttling proxy (RATE, shared by all its connections): the slowest node's
      pull time, next to the Kumar-Ross lower bound max(F/u_s, F/d_min, N*F/(u_s + sum u_i)), and the upstream's
      bytes / the image's bytes (from the registry's access log);
  (b) without the swarm: the same N nodes as plain mirrors (no `--peer-listen`), same limits: slowest pull time;
  (c) unthrottled peer-to-peer throughput on loopback: the wire alone (two PeerConnections in one process, pieces
      sent with sendfile and received into their buffers, 4 requests in flight, each piece hashed in a worker
      thread as a node does), and node to node (a node pulls a blob that only one other node holds: receive +
      SHA-256 + write, end to end); with `--recycled-pages`, node to node again right after a file of the
      blob's size was written and deleted (the puller stores into pages just freed: what storing costs aside).

    .venv/bin/python bench/swarm_bench.py                         # 8 nodes, 200 MB image (the small variant)
    .venv/bin/python bench/swarm_bench.py --image-mb 500          # the issue's 500 MB
    .venv/bin/python bench/swarm_bench.py --nodes 4 --image-mb 64 --skip-baseline   # a quick check
    .venv/bin/python bench/swarm_bench.py --p2p-only --recycled-pages                 # (c) alone, both ways

Everything listens on 127.0.0.1 only, works in a scratch directory (deleted at the end unless `--keep`) and stops
only the processes it started.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 10**6


# --- (the throttling upstream proxy: `swarm_bench.py _proxy LISTEN_PORT TARGET_PORT RATE`) ---------------------
def run_proxy(listen_port: int, target_port: int, rate: float) -> None:
    """TCP proxy on 127.0.0.1:listen_port -> 127.0.0.1:target_port; server-to-client bytes share one bucket."""
    import trio

    from p2pcache.swarm.ratelimit import TokenBucket

    bucket = TokenBucket(rate, burst=256 * 1024, now=0.0)  # trio's clock starts near 0 in trio.run

    async def pipe(src: trio.SocketStream, dst: trio.SocketStream, limited: bool) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if limited:
                    delay = bucket.take(len(data), trio.current_time())
                    if delay > 0:
                        await trio.sleep(delay)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.move_on_after(1):
                await dst.aclose()

    async def handle(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", target_port)
        except OSError:
            await client.aclose()
            return
        async with trio.open_nursery() as n:
            n.start_soon(pipe, client, server, False)
            n.start_soon(pipe, server, client, True)

    async def main() -> None:
        await trio.serve_tcp(handle, listen_port, host="127.0.0.1")

    trio.run(main)


# --- (c0) the baseline: a bare trio socket pump ----------------------------------------------------------------
def socket_pump(total: int, chunk: int = 1 << 20) -> float:
    """Bytes/s of one loopback TCP connection between two trio tasks: sendfile out of a file, recv_into one
    buffer, nothing else. What the machine can do right now; every other figure is read against it."""
    import trio

    tmp = tempfile.NamedTemporaryFile(prefix="swarm-bench-", delete=False)
    tmp.write(os.urandom(8 << 20))
    tmp.close()

    async def main() -> float:
        lsock = trio.socket.socket()
        await lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        port = lsock.getsockname()[1]
        got = 0

        async def sender() -> None:
            s, _ = await lsock.accept()
            fd = os.open(tmp.name, os.O_RDONLY)
            try:
                sent = 0
                while sent < total:
                    n = min(8 << 20, total - sent)
                    off = 0
                    while off < n:
                        try:
                            off += os.sendfile(s.fileno(), fd, off, n - off)
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(s)
                    sent += n
                    await trio.lowlevel.checkpoint()
            finally:
                os.close(fd)
                s.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            c = trio.socket.socket()
            await c.connect(("127.0.0.1", port))
            buf = memoryview(bytearray(chunk))
            t0 = trio.current_time()
            while True:
                n = await c.recv_into(buf)
                if not n:
                    break
                got += n
            dt = trio.current_time() - t0
            c.close()
        lsock.close()
        return got / dt

    try:
        return trio.run(main)
    finally:
        os.unlink(tmp.name)


# --- (c1) the wire alone ----------------------------------------------------------------------------------------
def wire_throughput(total: int, piece: int = 8 << 20, inflight: int = 8) -> float:
    """Bytes/s of pieces over one loopback PeerConnection pair (sendfile out, recv_into in), each piece hashed
    in a worker thread after it arrived, as the node does (service.NO_LOOP_HASHING); nothing written."""
    import hashlib

    import trio

    from p2pcache.swarm.handshake import Handshake, PeerInfo
    from p2pcache.swarm.peer import PeerConnection, handshake
    from p2pcache.swarm.wire import FrameDecoder
    from tests.peer_host import FileHost

    tmp = tempfile.NamedTemporaryFile(prefix="swarm-bench-", delete=False)
    tmp.write(os.urandom(piece))
    tmp.close()
    digest = "sha256:" + "0" * 64

    async def main() -> float:
        lsock = trio.socket.socket()
        await lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        port = lsock.getsockname()[1]
        host = FileHost(tmp.name, piece)
        conns: dict[str, PeerConnection] = {}
        async with trio.open_nursery() as nursery:
            async def serve() -> None:
                s, _ = await lsock.accept()
                dec = FrameDecoder()
                peer = await handshake(s, Handshake("server", b"k", PeerInfo("srv", "a:1", None)), dec)
                conns["srv"] = c = PeerConnection(s, peer, host, dec, outgoing=False)
                await c.run()

            nursery.start_soon(serve)
            from p2pcache.swarm.peer import open_peer_socket

            s = await open_peer_socket(f"127.0.0.1:{port}")
            dec = FrameDecoder(hash_kinds=frozenset())  # the receiving node hashes off the loop
            peer = await handshake(s, Handshake("client", b"k", PeerInfo("cli", "b:1", None)), dec)
            cli = PeerConnection(s, peer, host, dec, outgoing=True)
            nursery.start_soon(cli.run)
            n = total // piece
            t0 = trio.current_time()
            got = 0

            async def worker(indices: range) -> None:
                nonlocal got
                for i in indices:
                    msg = await cli.request_piece(digest, i)
                    await trio.to_thread.run_sync(hashlib.sha256, msg.payload)
                    got += len(msg.payload)

            async with trio.open_nursery() as w:
                for k in range(inflight):
                    w.start_soon(worker, range(k, n, inflight))
            dt = trio.current_time() - t0
            nursery.cancel_scope.cancel()
        lsock.close()
        assert got == n * piece
        return got / dt

    try:
        return trio.run(main)
    finally:
        os.unlink(tmp.name)


# --- the cluster runs ------------------------------------------------------------------------------------------
def pull_with_curl(nodes: list, name: str, tag: str, timeout: float) -> list[float]:
    """Every node pulls the image at once: manifest by tag (httpx), then config and layers with one curl process
    each (so the clients' own CPU does not slow one shared process). Returns each node's pull time. A blob only
    completes when the node verified its digest (it aborts the response otherwise), so full sizes mean right bytes."""
    import threading

    import httpx

    from tests.integration.swarm_harness import MANIFEST_ACCEPT

    barrier = threading.Barrier(len(nodes))
    times: list[float] = [0.0] * len(nodes)
    errors: list[str] = []

    def one(i: int, node) -> None:
        barrier.wait()
        t0 = time.monotonic()
        try:
            r = httpx.get(f"{node.url}/v2/{name}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT},
                          timeout=timeout)
            r.raise_for_status()
            doc = r.json()
            blobs = [doc["config"]] + doc["layers"]
            procs = [(b, subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                           "--max-time", str(int(timeout)),
                                           f"{node.url}/v2/{name}/blobs/{b['digest']}"],
                                          stdout=subprocess.PIPE, text=True)) for b in blobs]
            for b, pr in procs:
                code, size = pr.communicate()[0].split()
                if code != "200" or int(size) != b["size"]:
                    errors.append(f"node {i}: {b['digest'][:19]} -> {code} {size}/{b['size']}")
        except Exception as e:
            errors.append(f"node {i}: {e!r}")
        times[i] = time.monotonic() - t0

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return times


def total_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes so far (to tell CPU-starved from waiting); a gone process counts 0."""
    from _common import cpu_seconds

    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def p2p_figures(reg, work: Path, mb: float, repeat: int, say, recycled: bool = False) -> None:
    """(c): the bare socket pump, the wire alone and node to node, each `repeat` times in turns (so a change in
    the machine's load hits all three alike); medians printed with the spread. `recycled`: each turn pulls a
    second blob node to node right after a file of its size was written and deleted, so the puller's store
    writes go into pages just freed (see `_common.fresh_writes`), and prints that figure too."""
    import statistics

    from _common import cpu_seconds, fresh_writes

    from p2pcache.swarm.metainfo import piece_size_for
    from tests.integration.swarm_harness import Cluster, fetch_blob, push_random_image

    total = int(mb * MB)
    piece = piece_size_for(total)
    blobs = [push_random_image(reg, "library/p2p", str(k), [total]).layers[0] for k in range(repeat)]
    again = [push_random_image(reg, "library/p2p", f"r{k}", [total]).layers[0]
             for k in range(repeat if recycled else 0)]
    pair = Cluster(work / "pair", reg, 2, extra_args=["--log-level", "info"])  # B's log says when pieces were done
    pair.start()
    pump: list[float] = []
    store: list[float] = []
    store_cpu: list[float] = []  # CPU-s per GB of those writes
    wire: list[float] = []
    nodes: list[float] = []
    nodes_recycled: list[float] = []
    pieces: list[float] = []
    cpu: list[tuple[float, float, float, float]] = []  # per pull: seconds, CPU-s of A, B and curl
    try:
        pair.wait_members(timeout=30)
        a, b = pair.nodes
        for big in blobs + again:  # A holds every blob before the timed runs
            assert hashlib.sha256(fetch_blob(a, "library/p2p", big.digest, timeout=600)).hexdigest() == \
                big.digest.split(":")[1]

        def pull(big) -> tuple[float, tuple[float, float, float, float] | None]:
            """B pulls `big` through its registry API with curl: (bytes/s, CPU figures or None)."""
            mark = reg.log_mark()
            # Everything but the pull itself before the clock starts: the URL names the digest, which the
            # harness once hashed on every read (0.4 s of the bench's CPU inside each timed pull).
            cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                   f"{b.url}/v2/library/p2p/blobs/{big.digest}"]
            a0, b0, c0 = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid), os.times()
            t0 = time.monotonic()
            # curl, not httpx in this process: the client must not share a core with the bench's own Python.
            # The node aborts a blob whose digest fails, so a full-size 200 means the right bytes.
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout.split()
            dt = time.monotonic() - t0
            a1, b1, c1 = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid), os.times()
            assert out == ["200", str(big.size)], out
            assert pair.upstream_blob_gets(big.digest, mark) == 0, "B went upstream"
            if None in (a0, a1, b0, b1):
                return big.size / dt, None
            return big.size / dt, (dt, a1 - a0, b1 - b0,  # type: ignore[operator]
                                   c1.children_user + c1.children_system - c0.children_user - c0.children_system)

        for k, big in enumerate(blobs):
            pump.append(socket_pump(total))
            wire.append(wire_throughput(total, piece=piece, inflight=4))  # a node's pipeline with 1 peer
            rate, figs = pull(big)
            nodes.append(rate)
            if figs is not None:
                cpu.append(figs)
            m = re.search(re.escape(big.digest[:19]) + r": pieces done after ([0-9.]+)s", b.log_text())
            if m:
                pieces.append(big.size / float(m.group(1)))
            if recycled:
                fresh_writes(work, total, 1)  # a file of the blob's size written and deleted: B reuses its pages
                nodes_recycled.append(pull(again[k])[0])
        for rate, cpu_s in fresh_writes(work, total, len(blobs)):  # after every pull (see _common.fresh_writes)
            store.append(rate)
            store_cpu.append(cpu_s / (total / 1e9))
    finally:
        pair.stop()

    def fig(xs: list[float]) -> str:
        return f"{statistics.median(xs) / 1e9:.2f} GB/s (runs: {', '.join(f'{x / 1e9:.2f}' for x in xs)})"

    say(f"p2p pump:  {fig(pump)}  bare trio sockets, sendfile -> recv_into, no framing (the baseline)")
    say(f"p2p store: {fig(store)}  a new {total / MB:.0f} MB file written from one buffer, no network, "
        f"{statistics.median(store_cpu):.1f} CPU-s per GB (what storing costs here: a bound for any node that keeps "
        "what it receives)")
    say(f"p2p wire:  {fig(wire)}  one PeerConnection pair, {piece / 2**20:g} MiB pieces, 4 requests in flight "
        "(sendfile -> recv_into, SHA-256 in a worker thread)")
    if pieces:
        say(f"p2p swarm: {fig(pieces)}  the same pulls, B's swarm transfer alone: from its first request until "
            "every piece was received, hashed and written (B's log)")
    say(f"p2p nodes: {fig(nodes)}  {total / MB:.0f} MB blob held by one node, pulled by another through its "
        "registry API (receive + SHA-256 chain check + write + digest proof + serve to curl; commit's fsync after)")
    if nodes_recycled:
        say(f"p2p nodes, pages recycled: {fig(nodes_recycled)}  the same, each pull right after a {total / MB:.0f} MB "
            "file was written and deleted (B stores into pages just freed, as a node whose memory is full of cache "
            "does; not a fresh VM's figure)")
    if cpu:
        dt, ca, cb, cc = (statistics.median(x[i] for x in cpu) for i in range(4))
        say(f"p2p nodes CPU: {dt:.2f} s a pull; CPU-s: holder {ca:.2f}, puller {cb:.2f} "
            f"({cb / (total / 1e9):.1f} per GB), curl {cc:.2f}; {(ca + cb + cc) / dt / (os.cpu_count() or 1):.0%} "
            "of the machine's cores (medians)")


def kumar_ross(F: float, n: int, u_s: float, d_min: float, u_peers: list[float]) -> float:
    return max(F / u_s, F / d_min, n * F / (u_s + sum(u_peers)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_proxy":
        run_proxy(int(argv[1]), int(argv[2]), float(argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--image-mb", type=float, default=200, help="image size in MB (split over --layers layers)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rate", default="50MB/s", help="per-node upload and download limit, and the upstream's")
    p.add_argument("--skip-baseline", action="store_true", help="skip the run without the swarm")
    p.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for every swarm node, e.g. --node-arg=--piece-size=512KiB (repeatable)")
    p.add_argument("--p2p-mb", type=float, default=512, help="blob size for the unthrottled peer-to-peer figures")
    p.add_argument("--log-level", default="warning", help="the nodes' log level (their logs are in the scratch dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (stores, logs) and say where")
    p.add_argument("--skip-p2p", action="store_true", help="skip the unthrottled peer-to-peer figures")
    p.add_argument("--p2p-only", action="store_true", help="only the unthrottled peer-to-peer figures")
    p.add_argument("--repeat", type=int, default=3, help="runs of each peer-to-peer figure (the median is printed)")
    p.add_argument("--recycled-pages", action="store_true",
                   help="also pull node to node into page-cache pages just freed (see _common.fresh_writes)")
    args = p.parse_args(argv)

    from p2pcache.units import parse_rate
    from tests.integration.harness.node import Node
    from tests.integration.harness.registry import Registry
    from tests.integration.harness.util import free_port, wait_until
    from tests.integration.swarm_harness import Cluster, push_random_image

    rate = parse_rate(args.rate)
    work = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    procs: list[subprocess.Popen] = []
    reg = Registry(work / "reg").start()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    try:
        size = int(args.image_mb * MB / args.layers)
        say(f"# swarm bench: {args.nodes} nodes, image {args.image_mb:g} MB in {args.layers} layers, "
            f"limits {args.rate} (nodes up/down, upstream), load avg {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores")
        if args.p2p_only:
            p2p_figures(reg, work, args.p2p_mb, args.repeat, say, recycled=args.recycled_pages)
            return 0
        image = push_random_image(reg, "library/bench", "1", [size] * args.layers)
        F = sum(b.size for b in image.blobs) + len(image.manifest.data)
        proxy_port = free_port()
        procs.append(subprocess.Popen([sys.executable, __file__, "_proxy", str(proxy_port), str(reg.port),
                                       str(rate)], stdin=subprocess.DEVNULL))
        proxied = type("Proxied", (), {"url": f"http://127.0.0.1:{proxy_port}", "accesses_since":
                                       reg.accesses_since, "log_mark": reg.log_mark})()
        from tests.integration.harness.util import port_open

        wait_until(lambda: port_open("127.0.0.1", proxy_port), 10, "the throttling proxy")

        # (a) with the swarm
        limits = ["--upload-limit", args.rate,
                  "--download-limit", args.rate, "--log-level", args.log_level, *args.node_arg]
        cluster = Cluster(work / "swarm", proxied, args.nodes, extra_args=limits)  # type: ignore[arg-type]
        cluster.start()
        try:
            cluster.wait_members(timeout=30)
            time.sleep(2)  # let gossip settle so every node sees every other
            mark = reg.log_mark()
            pids = [n.proc.pid for n in cluster.nodes]
            cpu0 = total_cpu_seconds(pids)
            t0 = time.monotonic()
            times = sorted(pull_with_curl(cluster.nodes, "library/bench", "1", timeout=900))
            wall = time.monotonic() - t0
            cpu = total_cpu_seconds(pids) - cpu0
            up_bytes = sum(a.size for a in reg.accesses_since(mark) if "/blobs/" in a.path and a.method == "GET")
            bound = kumar_ross(F, args.nodes, rate, rate, [rate] * args.nodes)
            say(f"swarm:     slowest {times[-1]:.1f} s, median {times[len(times) // 2]:.1f} s, fastest "
                f"{times[0]:.1f} s (wall {wall:.1f} s; the nodes used {cpu:.1f} CPU-seconds in that time)")
            say(f"bound:     Kumar-Ross {bound:.1f} s  -> slowest / bound = {times[-1] / bound:.2f}")
            say(f"upstream:  {up_bytes / MB:.1f} MB of blobs for a {F / MB:.1f} MB image = "
                f"{up_bytes / F:.3f}x the image")
            sent = sorted(n.metric("p2pcache_peer_bytes_total", direction="out") for n in cluster.nodes)
            say(f"uploads:   per node to peers: min {sent[0] / MB:.1f}, mean {sum(sent) / len(sent) / MB:.1f}, "
                f"max {sent[-1] / MB:.1f} MB (the max at the per-node rate: {sent[-1] / rate:.1f} s)")
        finally:
            cluster.stop()

        # (b) without the swarm
        if not args.skip_baseline:
            plain = [Node(work / f"plain{i}", {"docker.io": proxied.url},
                          args=["--download-limit", args.rate, "--log-level", "warning"]) for i in range(args.nodes)]
            for n in plain:
                n.start()
            try:
                mark = reg.log_mark()
                times = sorted(pull_with_curl(plain, "library/bench", "1", timeout=1800))
                up_bytes = sum(a.size for a in reg.accesses_since(mark) if "/blobs/" in a.path)
                say(f"no swarm:  slowest {times[-1]:.1f} s (theory N*F/u_s = {args.nodes * F / rate:.1f} s), "
                    f"upstream {up_bytes / F:.2f}x the image")
            finally:
                for n in plain:
                    n.stop(check=False)

        # (c) unthrottled peer-to-peer
        if not args.skip_p2p:
            p2p_figures(reg, work, args.p2p_mb, args.repeat, say, recycled=args.recycled_pages)
    finally:
        for pr in procs:
            pr.terminate()
            pr.wait(5)
        reg.stop()
        if args.keep:
            (work / "results.txt").write_text("\n".join(lines) + "\n")
            print(f"(scratch and logs in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)  # every node's store: gigabytes after a few runs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
