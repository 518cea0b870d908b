"""HOST:PORT addresses, as flags give them and peers advertise them: one parser for both.

Never accepts an IPv6 address without brackets ('2001:db8::7' is not host '2001:db8:' and port 7), a port
outside 0-65535, or a bracketed host that is no IPv6 address. Port 0 and an empty host ('any') are for
listeners; whoever takes an address to dial refuses them itself (config.py, swarm/wire.py).
"""

from __future__ import annotations

import ipaddress

__all__ = ["WILDCARDS", "parse_hostport"]

WILDCARDS = {"0.0.0.0", "::", "*"}


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
