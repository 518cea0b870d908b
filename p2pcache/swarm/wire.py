"""The peer protocol's bytes: msgpack-framed messages, with raw payloads (piece data, manifest bodies) after them.

Sans-IO, h11 style: `FrameDecoder` takes bytes and gives `Message` events; `encode` / `encode_head` turn a message
into bytes. This module never touches a socket, a file or a clock, and never trusts its input: every frame is
bounded, every field is type-checked against the table below, and anything else is a `ProtocolError`, which the
driver answers by closing that one connection.

Theory of operation
-------------------
A frame is

    u32 header_len | u32 payload_len | header (msgpack map, header_len bytes) | payload (payload_len raw bytes)

The header is a map with a "t" key naming the message kind and the fields that kind's row of `SCHEMA` allows.
The payload is never msgpack-encoded: a piece goes on the wire as its bytes (the sender may `sendfile` it
straight from the store after `encode_head`), and the receiver may `recv_into` the buffer `payload_space()` hands
out, so a piece is copied once from the kernel into the buffer that is then hashed and written. Only kinds whose
row says so may carry a payload. Headers are small (`MAX_HEADER`), payloads at most one piece (`MAX_PAYLOAD`).

RPC-like kinds ("announce", "claim", "metainfo-req", "tag-req", "manifest-req", "ping") carry an "id" the answer
repeats; matching answers to questions is the driver's business, not this module's.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pcache.hostport import dial_problem
from p2pcache.swarm.metainfo import MAX_PIECE

PROTOCOL_VERSION = 3  # 2: "renew"; 3: piece hashes are links of a SHA-256 chain (swarm/chain.py)
FRAME_HEAD = struct.Struct(">II")
MAX_HEADER = 1 << 20  # a metainfo answer of a 100 GB blob in 16 MiB pieces is ~200 KiB of hashes; members too
MAX_RENEW = 1024  # entries in one "renew" frame (~80 bytes each)
MAX_PAYLOAD = MAX_PIECE  # one piece; manifests (≤ 4 MiB by the distribution spec) fit as well
HASH_LEN = 32

_EMPTY_SHA256 = hashlib.sha256(b"").digest()
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; close that connection (only)."""


# --- field validators: each returns the value (possibly normalised) or raises ProtocolError ---------------------

Check = Callable[[Any], Any]


def _type(*types: type) -> Check:
    def check(v: Any) -> Any:
        if isinstance(v, bool) and bool not in types:
            raise ProtocolError(f"expected {types}, got bool")
        if not isinstance(v, types):
            raise ProtocolError(f"expected {'/'.join(t.__name__ for t in types)}, got {type(v).__name__}")
        return v

    return check


def _str(max_len: int = 1024) -> Check:
    def check(v: Any) -> Any:
        if not isinstance(v, str) or len(v) > max_len:
            raise ProtocolError("expected a short string")
        return v

    return check


def _nat(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 1 << 62:
        raise ProtocolError("expected a non-negative integer")
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
        raise ProtocolError("expected a number")
    return float(v)


def _addr(v: Any) -> str:
    """A peer address: checked where it arrives, since whoever hears of a member or holder dials it later."""
    if not isinstance(v, str) or len(v) > 256:
        raise ProtocolError("expected a peer address")
    problem = dial_problem(v)
    if problem is not None:
        raise ProtocolError(f"bad peer address: {problem}"[:200])
    return v


def _digest(v: Any) -> str:
    if not isinstance(v, str) or not _DIGEST.match(v):
        raise ProtocolError("expected a sha256 digest")
    return v


def _bytes(max_len: int) -> Check:
    def check(v: Any) -> Any:
        if not isinstance(v, bytes) or len(v) > max_len:
            raise ProtocolError("expected bytes")
        return v

    return check


def _opt(inner: Check) -> Check:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)

    return check


def _hashes(v: Any) -> list[bytes | None]:
    """Piece hashes known so far: 32 bytes each, None for a piece not yet hashed."""
    if not isinstance(v, list):
        raise ProtocolError("expected a list of hashes")
    for h in v:
        if h is not None and (not isinstance(h, bytes) or len(h) != HASH_LEN):
            raise ProtocolError("a piece hash is 32 bytes or nil")
    return v


def _members(v: Any) -> list[list[Any]]:
    """[[node_id, addr, zone|None, heartbeat], ...]"""
    if not isinstance(v, list) or len(v) > 4096:
        raise ProtocolError("expected a member list")
    for m in v:
        if not isinstance(m, list) or len(m) != 4:
            raise ProtocolError("a member is [node, addr, zone, heartbeat]")
        _str(128)(m[0]), _addr(m[1]), _opt(_str(128))(m[2]), _nat(m[3])
    return v


def _holders(v: Any) -> list[list[Any]]:
    """[[node_id, addr, zone|None, complete], ...]"""
    if not isinstance(v, list) or len(v) > 4096:
        raise ProtocolError("expected a holder list")
    for h in v:
        if not isinstance(h, list) or len(h) != 4:
            raise ProtocolError("a holder is [node, addr, zone, complete]")
        _str(128)(h[0]), _addr(h[1]), _opt(_str(128))(h[2]), _type(bool)(h[3])
    return v


def _renewals(v: Any) -> list[list[Any]]:
    """[[digest, pieces, complete], ...]: what the sender still holds, for a tracker to renew in one frame."""
    if not isinstance(v, list) or len(v) > MAX_RENEW:
        raise ProtocolError(f"expected a list of at most {MAX_RENEW} renewals")
    for e in v:
        if not isinstance(e, list) or len(e) != 3:
            raise ProtocolError("a renewal is [digest, pieces, complete]")
        _digest(e[0]), _nat(e[1]), _type(bool)(e[2])
    return v


_ID = _nat
_NODE = _str(128)
_ADDR = _addr
_ZONE = _opt(_str(128))
_NAME = _str(512)

# kind -> (fields: name -> check, payload allowed). Every field listed is required (a nil is a value).
SCHEMA: dict[str, tuple[dict[str, Check], bool]] = {
    # handshake (see handshake.py): client hello, server hello-ack, client hello-proof
    "hello": ({"v": _nat, "node": _NODE, "addr": _ADDR, "zone": _ZONE, "nonce": _bytes(64)}, False),
    "hello-ack": ({"v": _nat, "node": _NODE, "addr": _ADDR, "zone": _ZONE, "nonce": _bytes(64),
                   "proof": _bytes(64)}, False),
    "hello-proof": ({"proof": _bytes(64)}, False),
    "refused": ({"reason": _str(256)}, False),
    # pieces
    "bitfield": ({"digest": _digest, "bits": _bytes(1 << 18)}, False),
    "have": ({"digest": _digest, "index": _nat}, False),
    "request": ({"digest": _digest, "index": _nat}, False),
    "piece": ({"digest": _digest, "index": _nat}, True),
    "cancel": ({"digest": _digest, "index": _nat}, False),
    "reject": ({"digest": _digest, "index": _nat, "reason": _str(256)}, False),
    "interested": ({"digest": _digest}, False),  # "send me your bitfield and haves for this digest"
    "metainfo-req": ({"id": _ID, "digest": _digest}, False),
    "metainfo": ({"id": _ID, "digest": _digest, "size": _opt(_nat), "piece_size": _opt(_nat),
                  "hashes": _hashes}, False),
    # tracker RPCs (to the rendezvous owners of a digest)
    "announce": ({"id": _ID, "digest": _digest, "pieces": _nat, "complete": _type(bool)}, False),
    "withdraw": ({"digest": _digest}, False),
    # the periodic renewal of many digests at one owner, one-way: "announce" answers with holders, which a
    # node renewing what it already holds does not need (a node with 10,000 blobs sent 20,000 RPCs a round)
    "renew": ({"entries": _renewals}, False),
    "holders": ({"id": _ID, "digest": _digest, "holders": _holders, "claim": _opt(_NODE)}, False),
    "claim": ({"id": _ID, "digest": _digest, "release": _type(bool)}, False),
    "claim-answer": ({"id": _ID, "digest": _digest, "granted": _type(bool), "holder": _opt(_NODE),
                      "addr": _opt(_ADDR), "complete": _type(bool), "ttl": _num}, False),
    "publish": ({"digest": _digest, "size": _nat, "piece_size": _nat, "first": _nat, "hashes": _hashes}, False),
    # manifests and tags from peers during upstream outages
    "tag-req": ({"id": _ID, "ns": _NAME, "name": _NAME, "tag": _str(128), "accept": _str(4096)}, False),
    "tag": ({"id": _ID, "digest": _opt(_digest), "media_type": _opt(_str(256)), "size": _opt(_nat),
             "checked_at": _num}, False),
    "manifest-req": ({"id": _ID, "digest": _digest}, False),
    "manifest": ({"id": _ID, "digest": _digest, "media_type": _opt(_str(256))}, True),
    # membership
    "gossip": ({"members": _members}, False),
    "ping": ({"id": _ID}, False),
    "pong": ({"id": _ID}, False),
}


@dataclass
class Message:
    """One decoded frame: its kind, its header fields (validated) and its raw payload (b"" when none)."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes | bytearray = b""
    sha256: bytes | None = None  # of the payload, for kinds the decoder hashes (pieces): computed as bytes arrive

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def validate(kind: str, fields: dict[str, Any], payload_len: int) -> dict[str, Any]:
    row = SCHEMA.get(kind)
    if row is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    checks, payload_ok = row
    if payload_len and not payload_ok:
        raise ProtocolError(f"{kind} carries no payload")
    out: dict[str, Any] = {}
    for name, check in checks.items():
        if name not in fields:
            raise ProtocolError(f"{kind} lacks {name!r}")
        try:
            out[name] = check(fields[name])
        except ProtocolError as e:
            raise ProtocolError(f"{kind}.{name}: {e}") from None
    return out


def encode_head(kind: str, payload_len: int = 0, **fields: Any) -> bytes:
    """Frame head + header of a message whose `payload_len` payload bytes the caller sends right after."""
    if payload_len > MAX_PAYLOAD:
        raise ValueError("payload too large")
    validate(kind, fields, payload_len)  # we never send what we would refuse to read
    header = msgpack.packb({"t": kind, **fields}, use_bin_type=True)
    if len(header) > MAX_HEADER:
        raise ValueError("header too large")
    return FRAME_HEAD.pack(len(header), payload_len) + header


def encode(kind: str, payload: bytes = b"", **fields: Any) -> bytes:
    """A whole frame. For large payloads prefer `encode_head` + sending the payload without joining them."""
    return encode_head(kind, len(payload), **fields) + bytes(payload)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class FrameDecoder:
    """Bytes in, `Message`s out. Raises ProtocolError on the first malformed frame; the decoder is then dead."""

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD,
                 hash_kinds: frozenset[str] = frozenset({"piece"})) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        # Payloads of these kinds are hashed while they arrive, a chunk at a time, so the hash is ready with the
        # last byte (no second pass over the piece, no wait for a worker thread before the next request).
        self.hash_kinds = hash_kinds
        # Whether a frame's payload is wanted (its kind and header fields): an unwanted one (a piece nobody asked
        # for, or one cancelled meanwhile) is read and dropped as it arrives, never buffered whole. Without it a
        # frame head declaring 16 MiB made us allocate (and zero) 16 MiB at once, per connection.
        self.accept_payload: Callable[[str, dict[str, Any]], bool] | None = None
        self._skip = 0  # bytes of an unwanted payload still to drop
        self._hasher: Any = None
        self._buf = bytearray()
        self._pending: tuple[str, dict[str, Any]] | None = None  # header parsed, payload being received
        self._payload: bytearray | None = None
        self._have = 0  # payload bytes received so far
        self._broken = False

    # -- feeding -------------------------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            raise ProtocolError("decoder already failed")
        if self._skip and not self._buf:
            n = min(len(data), self._skip)
            self._skip -= n
            data = data[n:]
        if self._payload is not None:
            n = min(len(data), len(self._payload) - self._have)
            self._payload[self._have:self._have + n] = data[:n]
            self._hash(self._have, n)
            self._have += n
            data = data[n:]
        if data:
            self._buf += data

    def mid_frame(self) -> bool:
        """Whether part of a frame has arrived and the rest has not (a peer that stops here is stalled)."""
        return bool(self._buf) or self._payload is not None or self._skip > 0

    def payload_space(self) -> memoryview | None:
        """While a payload is being received and nothing is buffered: where to `recv_into` it directly."""
        if self._payload is None or self._buf:
            return None
        return memoryview(self._payload)[self._have:]

    def payload_written(self, n: int) -> None:
        """`n` bytes were written into the view `payload_space()` returned."""
        assert self._payload is not None and self._have + n <= len(self._payload)
        self._hash(self._have, n)
        self._have += n

    def _hash(self, start: int, n: int) -> None:
        if self._hasher is not None and n:
            assert self._payload is not None
            self._hasher.update(memoryview(self._payload)[start:start + n])

    def eof(self) -> None:
        """The peer closed its side: fine between frames, a ProtocolError inside one."""
        if self.mid_frame():
            self._broken = True
            raise ProtocolError("connection closed inside a frame")

    # -- events --------------------------------------------------------------------------------------------
    def next_event(self) -> Message | _NeedData:
        if self._broken:
            raise ProtocolError("decoder already failed")
        try:
            return self._next()
        except ProtocolError:
            self._broken = True
            raise

    def events(self) -> Iterator[Message]:
        while True:
            ev = self.next_event()
            if ev is NEED_DATA:
                return
            assert isinstance(ev, Message)
            yield ev

    def _next(self) -> Message | _NeedData:
        if self._skip:
            n = min(self._skip, len(self._buf))
            del self._buf[:n]
            self._skip -= n
            if self._skip:
                return NEED_DATA
        if self._payload is not None:
            if self._have < len(self._payload):
                # bytes that arrived after the header but before the payload buffer existed
                if self._buf:
                    n = min(len(self._buf), len(self._payload) - self._have)
                    with memoryview(self._buf) as head:
                        self._payload[self._have:self._have + n] = head[:n]
                    del self._buf[:n]
                    self._hash(self._have, n)
                    self._have += n
                if self._have < len(self._payload):
                    return NEED_DATA
            assert self._pending is not None
            kind, fields = self._pending
            msg = Message(kind, fields, self._payload, self._hasher.digest() if self._hasher is not None else None)
            self._pending, self._payload, self._have, self._hasher = None, None, 0, None
            return msg
        if len(self._buf) < FRAME_HEAD.size:
            return NEED_DATA
        header_len, payload_len = FRAME_HEAD.unpack_from(self._buf)
        if header_len == 0 or header_len > self.max_header:
            raise ProtocolError(f"header length {header_len} out of bounds")
        if payload_len > self.max_payload:
            raise ProtocolError(f"payload length {payload_len} out of bounds")
        end = FRAME_HEAD.size + header_len
        if len(self._buf) < end:
            return NEED_DATA
        try:
            header = msgpack.unpackb(bytes(self._buf[FRAME_HEAD.size:end]), raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several exception types for garbage
            raise ProtocolError(f"undecodable header: {type(e).__name__}") from None
        if not isinstance(header, dict) or not isinstance(header.get("t"), str):
            raise ProtocolError("a header is a map with a 't' kind")
        kind = header.pop("t")
        fields = validate(kind, header, payload_len)
        del self._buf[:end]
        if payload_len == 0:
            return Message(kind, fields, b"", _EMPTY_SHA256 if kind in self.hash_kinds else None)
        if self.accept_payload is not None and not self.accept_payload(kind, fields):
            self._skip = payload_len
            return self._next()
        self._pending = (kind, fields)
        self._payload = bytearray(payload_len)
        self._have = 0
        self._hasher = hashlib.sha256() if kind in self.hash_kinds else None
        return self._next()
