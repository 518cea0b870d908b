"""A self-signed certificate for 127.0.0.1 and a TLS server context with it, for tests of TLS upstreams."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path


def self_signed_server(d: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a new self-signed certificate for 127.0.0.1 (made in `d` with openssl), and the
    certificate's file (what a client trusts: the node's `--upstream-ca`)."""
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, cert
