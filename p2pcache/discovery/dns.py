"""Trio driver for `--join-dns NAME`: resolve NAME's A/AAAA records periodically and hand them out as seeds.

For a Kubernetes headless Service the records are the pods; re-resolving picks up pods that come and go. The port
is the one in `NAME:PORT` if given, else this node's own peer port (a DaemonSet runs every node on the same port).
Never fails the node: a name that does not resolve (yet) is logged and retried.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

RESOLVE_EVERY = 10.0  # pods start and stop on a scale of seconds to minutes; gossip spreads members in between


def split_name(name: str, default_port: int) -> tuple[str, int]:
    host, sep, port = name.rpartition(":")
    if sep and port.isdigit() and host and not host.endswith(":"):
        return host.strip("[]"), int(port)
    return name.strip("[]"), default_port  # "[fd00::1]" alone is the address fd00::1


async def resolve(host: str, port: int) -> list[str]:
    """HOST:PORT strings for every A/AAAA record of `host` (IPv6 in brackets), de-duplicated, in order."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        addr = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if addr not in out:
            out.append(addr)
    return out


async def run_dns_seeds(name: str, default_port: int, add_seeds: Callable[[list[str]], None],
                        every: float = RESOLVE_EVERY) -> None:
    host, port = split_name(name, default_port)
    while True:
        try:
            addrs = await resolve(host, port)
            log.debug("join-dns %s -> %s", host, addrs)
            add_seeds(addrs)
        except OSError as e:
            log.warning("join-dns: cannot resolve %s: %s", host, e)
        await trio.sleep(every)
