"""One node process: builds the store, upstream client, fetcher and resolver, and runs them in one nursery tree.

    run_node (root nursery; cancelled by SIGTERM/SIGINT)
    ├── Fetcher.run            owns every Download
    ├── SwarmService.run       only with --peer-listen (issue 3), assigned to fetcher.swarm
    ├── serve_http(registry)   settings.listen: the read-only /v2/ API, /metrics, /healthz
    └── serve_http(admin)      settings.admin_listen: DELETE blob/image, status, preheat

Stopping a node is cancelling the root scope: every connection, download and listener ends with it, and the
upstream client is closed on the way out. This module must never leave a task running outside that tree, and
`run_node_blocking` must never show a traceback for a startup problem a user can fix (port in use, unwritable
data directory): one line and exit status 2.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from p2pcache.config import Settings, unknown_env_settings
from p2pcache.log import setup_logging
from p2pcache.metrics import Metrics
from p2pcache.proxy.server import serve_http

if TYPE_CHECKING:  # the real imports are in build_node: `p2pcache --help` stays fast
    from p2pcache.fetch import Fetcher
    from p2pcache.oci.upstream import Upstream
    from p2pcache.store.blobs import BlobStore
    from p2pcache.store.manifests import ManifestStore, TagCache
    from p2pcache.swarm.service import SwarmService
    from p2pcache.tags import ManifestResolver

log = logging.getLogger("p2pcache.node")

ADMIN_MAX_BODY = 1 << 20  # preheat requests are small JSON documents


class StartupError(Exception):
    """A problem the user can fix before the node can start; the message is the whole story."""


@dataclass
class Node:
    """What a running node is made of (handed to task_status.started, for tests and embedding)."""

    settings: Settings
    metrics: Metrics
    store: BlobStore
    manifests: ManifestStore
    tags: TagCache
    upstream: Upstream
    fetcher: Fetcher
    resolver: ManifestResolver
    swarm: SwarmService | None = None  # only when settings.peer_listen is set
    registry_address: tuple[str, int] | None = None
    admin_address: tuple[str, int] | None = None
    data_lock: int = -1  # the data root's lock (store/lock.py): released when the node stops

    def release(self) -> None:
        """Let another node use the data root (run_node's end)."""
        if self.data_lock >= 0:
            os.close(self.data_lock)
            self.data_lock = -1

    @property
    def registry_url(self) -> str:
        assert self.registry_address is not None
        return _url(self.registry_address)

    @property
    def admin_url(self) -> str:
        assert self.admin_address is not None
        return _url(self.admin_address)


def _url(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def build_node(settings: Settings) -> Node:
    """Create every component (no task started, no socket opened). StartupError for an unusable data dir."""
    from p2pcache.fetch import Fetcher
    from p2pcache.oci.upstream import Upstream
    from p2pcache.store.blobs import BlobStore
    from p2pcache.store.lock import DataRootInUse, lock_data_root
    from p2pcache.store.manifests import ManifestStore, TagCache
    from p2pcache.tags import ManifestResolver

    metrics = Metrics()
    lock = -1
    try:
        settings.data.mkdir(parents=True, exist_ok=True)
        lock = lock_data_root(settings.data)  # before the store's start-up cleans anything
        store = BlobStore(settings.data, settings.max_disk, metrics)
        manifests = ManifestStore(settings.data, store)
        tags = TagCache(settings.data)
    except DataRootInUse as e:
        raise StartupError(f"{e}: each node needs a data directory of its own (--data)") from None
    except BaseException as e:
        if lock >= 0:
            os.close(lock)
        if isinstance(e, OSError):
            raise StartupError(f"cannot use data directory {settings.data}: {e.strerror or e}") from None
        raise
    upstream = Upstream(settings, metrics)
    fetcher = Fetcher(settings, store, upstream, metrics)
    # The resolver and the admin API share the node's one TagCache (admin rmi forgets tags through it).
    resolver = ManifestResolver(settings, store, manifests, upstream, metrics, tags=tags)
    return Node(settings, metrics, store, manifests, tags, upstream, fetcher, resolver, data_lock=lock)


# Settings that only mean something to a node that shares (--peer-listen): named in a warning otherwise.
SWARM_ONLY = ("join", "join_dns", "advertise", "zone", "cluster_secret_file", "upload_limit", "piece_size",
              "tracker")


async def _stop_on_signals(signals: AsyncIterator[int], stop: trio.CancelScope) -> None:
    """The first SIGTERM/SIGINT stops the node; later ones while it shuts down are read and dropped. Why: a
    signal receiver that closes re-raises what it has not read with the default action, and the node died of a
    second SIGTERM sent 50 ms after the first (found in review: exit -15 instead of 0)."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if stop.cancel_called:
            log.info("received %s again: already shutting down", name)
            continue
        log.info("received %s, shutting down", name)
        stop.cancel()
        # and from now on the kernel drops them: the process may take longer to exit than the node to stop
        for other in (signal.SIGTERM, signal.SIGINT):
            signal.signal(other, signal.SIG_IGN)


async def _listen(nursery: trio.Nursery, what: str, listen: str, handler: Any, settings: Settings,
                  **kw: Any) -> tuple[str, int]:
    try:
        return await nursery.start(partial(serve_http, listen, handler, settings, **kw))
    except OSError as e:
        raise StartupError(f"cannot listen on {listen} ({what}): {_reason(e)}") from None


def _reason(e: OSError) -> str:
    return "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))


async def run_node(settings: Settings, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
                   handle_signals: bool = True) -> None:
    """Run a node until cancelled (or SIGTERM/SIGINT). `task_status.started(node)` once both ports listen."""
    if not (handle_signals and threading.current_thread() is threading.main_thread()):
        await _run_node(settings, task_status=task_status)
        return
    # The receiver stays open until the node has shut down, its reader in a nursery of its own: signals that
    # come while the node stops are dropped by it, not re-raised when the receiver closes (see _stop_on_signals).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:
            stop = trio.CancelScope()
            outer.start_soon(_stop_on_signals, signals, stop)
            with stop:
                await _run_node(settings, task_status=task_status)
            outer.cancel_scope.cancel()


async def _run_node(settings: Settings, *, task_status: trio.TaskStatus[Node]) -> None:
    from p2pcache.proxy.admin import Admin
    from p2pcache.proxy.registry import Registry

    node = build_node(settings)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.fetcher.run)

            # ---- swarm plug-in point (issue 3) -------------------------------------------------------------
            # With --peer-listen the node shares: SwarmService serves pieces to peers and fills downloads from
            # them; the Fetcher calls it through `fetcher.swarm` (the BlobSwarm protocol in fetch.py).
            # Imported lazily so a node runs without the swarm package being complete.
            if settings.peer_listen:
                from p2pcache.swarm.service import SwarmService

                node.swarm = SwarmService(settings, node.store, node.fetcher, node.upstream, node.metrics,
                                          manifests=node.manifests, tags=node.tags)
                try:
                    await nursery.start(node.swarm.run)
                except OSError as e:
                    raise StartupError(f"cannot listen on {settings.peer_listen} (peers): {_reason(e)}") from None
                node.fetcher.swarm = node.swarm
                node.resolver.peers = node.swarm  # manifests and tags from peers during upstream outages
            # -------------------------------------------------------------------------------------------------

            registry = Registry(settings, node.fetcher, node.resolver, node.metrics)
            admin = Admin(settings, node.store, node.manifests, node.tags, node.fetcher, node.resolver,
                          node.metrics)
            node.registry_address = await _listen(nursery, "registry", settings.listen, registry, settings,
                                                  before_body=registry.before_body)
            node.admin_address = await _listen(nursery, "admin", settings.admin_listen, admin, settings,
                                               max_body_bytes=ADMIN_MAX_BODY)
            log.info("listening on %s (registry), %s (admin)%s", node.registry_url, node.admin_url,
                     f", peers on {settings.peer_listen}" if settings.peer_listen else "")
            log.info("store %s, default namespace %s", settings.data, settings.default_ns)
            for name in unknown_env_settings():
                log.warning("environment variable %s names no setting: ignored (see p2pcache node --help)", name)
            unused = [f"--{k.replace('_', '-')}" for k in SWARM_ONLY if getattr(settings, k)]
            if unused and not settings.peer_listen:
                log.warning("%s: no effect without --peer-listen (this node shares nothing)", ", ".join(unused))
            task_status.started(node)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await node.upstream.aclose()
        node.release()
        log.info("stopped")


def _startup_problem(exc: BaseException) -> str | None:
    """The one-line message for an exception (or a group of them) a user can fix, else None."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_startup_problem(e) for e in exc.exceptions]
        return leaves[0] if leaves and all(m is not None for m in leaves) else None
    if isinstance(exc, StartupError):
        return str(exc)
    return None


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the soft limit on open files to the hard one; (old, new) when it was raised, else None.

    Why: a node holds a socket per peer connection (gossip alone connects it to most members of a large
    cluster over time, up to MAX_CONNS_PER_PEER each), one per client and one file per blob it serves, and the
    usual soft limit of 1024 would end in EMFILE on accept and open in a cluster of a few hundred nodes. The
    hard limit stays the operator's (systemd `LimitNOFILE=`, the container runtime's)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:  # the kernel's ceiling for any process
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None  # unlimited already, or at the ceiling
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, e)
        return None
    return soft, target


def run_node_blocking(settings: Settings) -> int:
    """The `p2pcache node` command: run until SIGTERM/SIGINT. 0 on a clean stop, 2 on a startup problem."""
    setup_logging(settings.log_level, settings.log_format)
    raised = raise_fd_limit()
    if raised is not None:
        log.info("open-files limit raised from %d to %d", *raised)
    try:
        trio.run(run_node, settings)
        for sig in (signal.SIGTERM, signal.SIGINT):  # stopped: a late signal must not turn exit 0 into death
            signal.signal(sig, signal.SIG_IGN)
    except KeyboardInterrupt:  # a second Ctrl-C before the signal receiver was installed
        return 130
    except BaseException as e:  # noqa: BLE001 - sorted below: user-fixable problems get one line, bugs a trace
        problem = _startup_problem(e)
        if problem is None:
            raise
        print(f"p2pcache: {problem}", file=sys.stderr)
        return 2
    return 0
