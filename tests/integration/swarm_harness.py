"""A cluster of p2pcache node processes sharing pieces on loopback, in front of one real docker-registry.

Built on the mirror tests' harness (`harness/`): each node is a `harness.node.Node` with the swarm flags
(`--peer-listen`, `--join` the first node, optional `--cluster-secret-file`, limits). Helpers pull whole images
from many nodes at the same moment with concurrent httpx clients and check every byte against its digest.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .harness import images as im
from .harness.node import Node
from .harness.registry import Registry
from .harness.util import free_port, wait_until

MANIFEST_ACCEPT = ", ".join([im.OCI_MANIFEST, im.OCI_INDEX, im.DOCKER_MANIFEST, im.DOCKER_LIST])


class Cluster:
    def __init__(self, workdir: Path, registry: Registry, n: int, *, secret: bytes | None = b"cluster-secret",
                 extra_args: list[str] | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.secret_file: Path | None = None
        if secret is not None:
            self.secret_file = workdir / "cluster.secret"
            self.secret_file.write_bytes(secret)
        self.extra_args = list(extra_args or [])
        self.nodes: list[Node] = []
        for _ in range(n):
            self.add_node(start=False)

    def add_node(self, *, start: bool = True, secret_file: Path | None = None, args: list[str] | None = None,
                 upstream: str | None = None, peer_addr: str | None = None, join: bool = True,
                 wrap: list[str] | None = None) -> Node:
        """A node peering on `peer_addr` (default: a free loopback port) that joins the first node unless `join`
        is false; `wrap` is a command it runs under."""
        i = len(self.nodes)
        peer_addr = peer_addr or f"127.0.0.1:{free_port()}"
        a = ["--peer-listen", peer_addr, "--log-level", "info"] + self.extra_args + list(args or [])
        if self.nodes and join:
            a += ["--join", self.nodes[0].peer_addr]
        sf = secret_file or self.secret_file
        if sf is not None:
            a += ["--cluster-secret-file", str(sf)]
        node = Node(self.dir / f"node{i}", {"docker.io": upstream or self.registry.url}, args=a)
        node.peer_addr = peer_addr  # type: ignore[attr-defined]
        node.wrap = list(wrap or [])
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def start(self) -> Cluster:
        with ThreadPoolExecutor(len(self.nodes)) as ex:
            list(ex.map(lambda n: n.start(), self.nodes))
        return self

    def wait_members(self, nodes: list[Node] | None = None, timeout: float = 15) -> None:
        """Until every node has connections to (about) every other, i.e. gossip has spread the member list; then
        two more gossip rounds so every node computes the same tracker owners."""
        nodes = nodes or [n for n in self.nodes if n.running]
        want = len(nodes) - 1
        wait_until(lambda: all(n.metric("p2pcache_peers_connected") >= want for n in nodes), timeout,
                   "peers to connect")
        time.sleep(2)

    def stop(self) -> None:
        for n in self.nodes:
            if n.running:
                n.stop(check=False)

    def upstream_blob_gets(self, digest: str, since: int = 0) -> int:
        return sum(1 for a in self.registry.accesses_since(since)
                   if a.method == "GET" and a.path.endswith(f"/blobs/{digest}") and a.status in (200, 206))

    def upstream_blob_bytes(self, since: int = 0) -> int:
        return sum(a.size for a in self.registry.accesses_since(since)
                   if a.method == "GET" and "/blobs/" in a.path)


def fetch_blob(node: Node, name: str, digest: str, timeout: float = 120) -> bytes:
    """The whole blob from `node`'s registry API; raises if the response is cut short or not 200."""
    with httpx.Client(timeout=timeout) as c:
        with c.stream("GET", f"{node.url}/v2/{name}/blobs/{digest}") as r:
            assert r.status_code == 200, (r.status_code, r.read()[:300])
            return b"".join(r.iter_bytes(1 << 20))


def pull_image(node: Node, name: str, tag: str, timeout: float = 180) -> dict[str, bytes]:
    """Manifest by tag, config and layers (in parallel), each checked against its digest: {digest: bytes}."""
    out: dict[str, bytes] = {}
    with httpx.Client(timeout=timeout) as c:
        r = c.get(f"{node.url}/v2/{name}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status_code == 200, (r.status_code, r.text[:300])
        mdigest = r.headers["Docker-Content-Digest"]
        assert mdigest == im.sha256_digest(r.content)
        out[mdigest] = r.content
        doc = r.json()
    digests = [doc["config"]["digest"]] + [la["digest"] for la in doc["layers"]]
    with ThreadPoolExecutor(len(digests)) as ex:
        for d, data in zip(digests, ex.map(lambda d: fetch_blob(node, name, d, timeout), digests), strict=True):
            assert "sha256:" + hashlib.sha256(data).hexdigest() == d, f"{node.url}: wrong bytes for {d}"
            out[d] = data
    return out


def pull_everywhere(nodes: list[Node], name: str, tag: str,
                    timeout: float = 180) -> list[dict[str, bytes] | BaseException]:
    """Every node pulls the image at the same moment (a barrier releases the threads together)."""
    barrier = threading.Barrier(len(nodes))

    def one(node: Node) -> dict[str, bytes] | BaseException:
        barrier.wait()
        t0 = time.monotonic()
        try:
            return pull_image(node, name, tag, timeout)
        except BaseException as e:  # reported per node by the caller
            return e
        finally:
            node.pull_seconds = time.monotonic() - t0  # type: ignore[attr-defined]

    with ThreadPoolExecutor(len(nodes)) as ex:
        return list(ex.map(one, nodes))


def push_random_image(registry: Registry, name: str, tag: str, layer_sizes: list[int]) -> im.Image:
    image = im.make_image([im.random_layer(s) for s in layer_sizes])
    im.push(registry.url, name, tag, image)
    return image
