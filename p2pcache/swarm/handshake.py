"""The peer handshake: protocol version, node identities, and mutual proof of the cluster secret.

Sans-IO: a `Handshake` takes the peer's messages and says what to send and whether the peer is accepted. It never
sends, reads, sleeps or logs, and never puts the secret (or anything from which it is cheap to recover it) on the
wire. Proofs are compared in constant time (`hmac.compare_digest`).

Theory of operation (three messages, so each side proves the secret over a nonce the *other* side chose):

    client                                   server
    hello(v, node, addr, zone, Nc)    --->
                                      <---   hello-ack(v, node, addr, zone, Ns, Ps)
                                             Ps = HMAC(secret, "p2pcache server" | Nc | Ns | ids | addrs)
    check Ps
    hello-proof(Pc)                   --->   check Pc
      Pc = HMAC(secret, "p2pcache client" | Ns | Nc | ids | addrs)

The role labels stop a proof from being reflected back at its sender; binding both node ids and advertised
addresses stops a proof being replayed for another identity. Without a configured secret the proofs are empty
and a side with a secret refuses a side without (and vice versa: a proof where none is expected is refused too, so
a misconfiguration is loud). A node with a secret never talks to one without, in either direction.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pcache.swarm.wire import PROTOCOL_VERSION, Message

NONCE_LEN = 32


class HandshakeError(Exception):
    """The peer is refused: wrong version, wrong or missing proof, or an out-of-order message."""


@dataclass(frozen=True)
class PeerInfo:
    node: str
    addr: str
    zone: str | None


def load_secret(path: Path | None) -> bytes | None:
    """The cluster secret from its file (surrounding whitespace stripped); None when no file is configured."""
    if path is None:
        return None
    secret = Path(path).read_bytes().strip()
    if not secret:
        raise ValueError(f"cluster secret file {path} is empty")
    return secret


def _proof(secret: bytes | None, label: bytes, *parts: bytes) -> bytes:
    if secret is None:
        return b""
    mac = hmac.new(secret, label, hashlib.sha256)
    for p in parts:
        mac.update(len(p).to_bytes(4, "big") + p)  # length-prefixed, so parts cannot be shifted across
    return mac.digest()


class Handshake:
    """One side of one handshake. Use `client_hello()` (client) or feed the peer's messages to `receive()`."""

    def __init__(self, role: str, secret: bytes | None, me: PeerInfo, nonce: bytes | None = None) -> None:
        assert role in ("client", "server")
        self.role = role
        self.secret = secret
        self.me = me
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        self.peer: PeerInfo | None = None
        self.peer_nonce = b""
        self.done = False
        self._expect = "hello-ack" if role == "client" else "hello"

    def _hello_fields(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "node": self.me.node, "addr": self.me.addr, "zone": self.me.zone,
                "nonce": self.nonce}

    def client_hello(self) -> tuple[str, dict[str, Any]]:
        assert self.role == "client"
        return "hello", self._hello_fields()

    def _bound(self, first: PeerInfo, second: PeerInfo) -> tuple[bytes, ...]:
        return (first.node.encode(), second.node.encode(), first.addr.encode(), second.addr.encode())

    def _check(self, got: bytes, want: bytes) -> None:
        if not hmac.compare_digest(got, want):
            raise HandshakeError("cluster secret proof mismatch" if want else "unexpected cluster proof")

    def receive(self, msg: Message) -> list[tuple[str, dict[str, Any]]]:
        """Feed the peer's next message; returns the messages to send. Raises HandshakeError to refuse."""
        if self.done or msg.kind != self._expect:
            raise HandshakeError(f"expected {self._expect}, got {msg.kind}")
        if msg.kind in ("hello", "hello-ack"):
            if msg["v"] != PROTOCOL_VERSION:
                raise HandshakeError(f"protocol version {msg['v']} not supported (we speak {PROTOCOL_VERSION})")
            if len(msg["nonce"]) != NONCE_LEN:
                raise HandshakeError("bad nonce")
            self.peer = PeerInfo(msg["node"], msg["addr"], msg["zone"])
            self.peer_nonce = msg["nonce"]
            if self.peer.node == self.me.node:
                raise HandshakeError("connected to myself")
        if self.role == "server" and msg.kind == "hello":
            assert self.peer is not None
            proof = _proof(self.secret, b"p2pcache server", self.peer_nonce, self.nonce,
                           *self._bound(self.peer, self.me))
            self._expect = "hello-proof"
            return [("hello-ack", {**self._hello_fields(), "proof": proof})]
        if self.role == "client" and msg.kind == "hello-ack":
            assert self.peer is not None
            want = _proof(self.secret, b"p2pcache server", self.nonce, self.peer_nonce,
                          *self._bound(self.me, self.peer))
            self._check(msg["proof"], want)
            proof = _proof(self.secret, b"p2pcache client", self.peer_nonce, self.nonce,
                           *self._bound(self.me, self.peer))
            self.done = True
            return [("hello-proof", {"proof": proof})]
        if self.role == "server" and msg.kind == "hello-proof":
            assert self.peer is not None
            want = _proof(self.secret, b"p2pcache client", self.nonce, self.peer_nonce,
                          *self._bound(self.peer, self.me))
            self._check(msg["proof"], want)
            self.done = True
            return []
        raise HandshakeError(f"unexpected {msg.kind}")  # pragma: no cover - _expect guards this
