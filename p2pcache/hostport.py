"""HOST:PORT addresses, as flags give them and peers advertise them: one parser for both.

Never accepts an IPv6 address without brackets ('2001:db8::7' is not host '2001:db8:' and port 7), a port
outside 0-65535, or a bracketed host that is no IPv6 address. Port 0 and an empty host ('any') are for
listeners; whoever takes an address to dial refuses them itself (config.py, swarm/wire.py).
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["WILDCARDS", "dial_problem", "parse_hostport"]

WILDCARDS = {"0.0.0.0", "::", "*"}
# a DNS name (labels of 1-63 letters, digits, '-' and '_', 253 characters at most) or an IPv4 address
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def parse_hostport(text: str) -> tuple[str, int]:
    """'0.0.0.0:5000' -> ('0.0.0.0', 5000); '[::1]:5000' -> ('::1', 5000); ':5000' -> ('0.0.0.0', 5000)."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} in {text!r} is no IPv6 address") from None
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"expected HOST:PORT with an IPv6 address in brackets ([2001:db8::7]:5002), got {text!r}")
    return host or "0.0.0.0", int(port)


def dial_problem(text: str) -> str | None:
    """Why `text` is no address another node can dial (None when it is): what `--advertise`, `--join` and every
    address a peer names must pass. A peer naming 'no-port-here' or port 99999 once failed every pull that tried
    it; an --advertise of 'my host:5002' would have failed every handshake."""
    try:
        host, port = parse_hostport(text)
    except ValueError as e:
        return str(e)
    if port == 0:
        return f"{text!r} has port 0, which no one can dial"
    if not text.rpartition(":")[0] or host in WILDCARDS:
        return f"{text!r} names every address of its host, not one to dial"
    if ":" not in host and not _HOSTNAME.match(host):  # (a host with ':' is an IPv6 address, checked above)
        return f"{host!r} in {text!r} is no DNS name or IP address"
    return None
