"""Fixtures with the real parts: an upstream docker-registry holding test images, p2pcache nodes in front of it,
skopeo, containerd and dockerd as clients.

Expensive things are shared: one upstream registry and one node per session (dockerd is configured with that
node's address at start), one containerd and one dockerd per session. Tests that break the upstream (outage, bit
rot, lies) or the node (restart) get their own with `make_registry` / `make_node`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .harness import images as im
from .harness.clients import Containerd, Dockerd, Skopeo
from .harness.node import Node
from .harness.registry import Registry
from .harness.util import require_binary


@dataclass
class Upstream:
    """The session's upstream registry and what was pushed to it."""

    registry: Registry
    images: dict[str, im.Image | im.Index] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.registry.url


def push_standard_images(reg: Registry) -> dict[str, im.Image | im.Index]:
    busybox = require_binary("busybox", "/bin/busybox")
    things: dict[str, im.Image | im.Index] = {
        "library/busybox:1": im.busybox_image(busybox, docker=True),  # Docker schema2, runnable
        "library/small:1": im.small_image("small", docker=False),  # OCI
        "library/dsmall:1": im.small_image("dsmall", docker=True),  # Docker schema2
        "library/multi:1": im.make_index([im.small_image("multi", arch="amd64"),
                                          im.small_image("multi", arch="arm64")]),
    }
    for ref, thing in things.items():
        name, tag = ref.rsplit(":", 1)
        im.push(reg.url, name, tag, thing)
    return things


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    reg = Registry(tmp_path_factory.mktemp("upstream")).start()
    try:
        yield Upstream(reg, push_standard_images(reg))
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def ghcr_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A second registry standing in for ghcr.io (its own content, so routing by namespace shows)."""
    reg = Registry(tmp_path_factory.mktemp("ghcr")).start()
    try:
        app = im.small_image("ghcr-app")
        im.push(reg.url, "org/app", "1", app)
        yield Upstream(reg, {"org/app:1": app})
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, ghcr_upstream: Upstream) -> Iterator[Node]:
    """The shared node: docker.io served by the session's upstream registry, ghcr.io by another one."""
    n = Node(tmp_path_factory.mktemp("node"), {"docker.io": upstream.url, "ghcr.io": ghcr_upstream.url})
    n.start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    """A docker-registry of the test's own, empty (the swarm tests push what they need)."""
    r = Registry(tmp_path / "reg").start()
    yield r
    r.stop()


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """Fresh registries for tests that stop or corrupt their upstream; stopped at teardown."""
    made: list[Registry] = []

    def make(name: str = "reg", **kw) -> Registry:
        r = Registry(tmp_path / f"{name}{len(made)}", **kw).start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Fresh nodes (started) for one test; each is stopped at teardown with the clean-exit checks."""
    made: list[Node] = []

    def make(upstreams: dict[str, str], *, args: list[str] | None = None, env: dict[str, str] | None = None,
             start: bool = True, name: str = "node") -> Node:
        n = Node(tmp_path / f"{name}{len(made)}", upstreams, args=args, env=env)
        made.append(n)
        return n.start() if start else n

    yield make
    errors = []
    for n in made:
        try:
            n.stop()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


@pytest.fixture
def skopeo_via(tmp_path: Path) -> Callable[[Node], Skopeo]:
    """skopeo whose docker.io (and ghcr.io, via a `/ghcr.io` location) go through a node."""

    def make(n: Node) -> Skopeo:
        return Skopeo(tmp_path / f"skopeo-{n.port}",
                      mirrors={"docker.io": n.host, "ghcr.io": f"{n.host}/ghcr.io"})

    return make


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    c = Containerd(tmp_path_factory.mktemp("ctrd")).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def dockerd(node: Node, upstream: Upstream) -> Iterator[Dockerd]:
    """dockerd with the session node as its registry mirror and the upstream registry as insecure push target."""
    # A short directory: dockerd's exec root holds unix sockets (108-byte path limit).
    base = Path(os.environ.get("P2PCACHE_TEST_DOCKERD_DIR", "/tmp"))
    d = Dockerd(Path(tempfile.mkdtemp(prefix="p2pd-", dir=base)), mirror=node.url,
                insecure=[upstream.registry.host, node.host])
    d.start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(d.dir, ignore_errors=True)
