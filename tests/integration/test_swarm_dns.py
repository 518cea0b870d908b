"""`--join-dns NAME`: nodes that know nothing of each other but one DNS name with an A record per node (what a
Kubernetes headless Service gives a DaemonSet) find each other and share pieces.

Each node runs in a mount namespace of its own (`unshare -m`) with a hosts file bind-mounted over /etc/hosts, in
which the name has one line per node: glibc's resolver answers getaddrinfo with every one of them, as DNS would
with several A records. The nodes listen on 127.0.0.2, .3 and .4 (all loopback), on one port, as a DaemonSet's
pods do, and are given no `--join` at all. The network namespace stays the host's: the registry and the test
reach them on loopback as usual.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from .harness.registry import Registry
from .harness.util import free_port
from .swarm_harness import Cluster, push_random_image
from .test_swarm_pull import pull_at_once_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "p2pcache-peers.test"  # .test: a name that never resolves anywhere else
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def _port_free_on_all(port: int) -> bool:
    for host in HOSTS:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def test_nodes_find_each_other_through_join_dns_and_fetch_each_blob_once(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("this test needs root and unshare (util-linux) for a hosts file per node", pytrace=False)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{h} {NAME}\n" for h in HOSTS))
    # mount namespaces made by unshare(1) are private: the bind mount is seen by the node only
    wrap = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    port = next(p for p in iter(free_port, None) if _port_free_on_all(p))
    reg = Registry(tmp_path / "reg").start()
    cluster = Cluster(tmp_path, reg, 0)
    try:
        for h in HOSTS:
            cluster.add_node(start=False, peer_addr=f"{h}:{port}", join=False, wrap=wrap,
                             args=["--join-dns", NAME])
        image = push_random_image(reg, "library/dns", "1", [9_000_000, 150_000])
        pull_at_once_exactly_once(cluster, reg, image, "library/dns")
        # no node was given another's address: the members they found came from the name alone
        assert sum(n.metric("p2pcache_peer_bytes_total", direction="in") for n in cluster.nodes) > 9_000_000
    finally:
        cluster.stop()
        reg.stop()
    for n in cluster.nodes:
        n.check_log()
