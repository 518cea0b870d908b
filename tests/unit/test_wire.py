"""The peer protocol's framing: round trips, byte-at-a-time feeding, raw payloads, and garbage refused."""

import hashlib
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcache.swarm.wire import (
    FRAME_HEAD,
    MAX_PAYLOAD,
    MAX_RENEW,
    NEED_DATA,
    FrameDecoder,
    ProtocolError,
    encode,
    encode_head,
)

D = "sha256:" + "ab" * 32


def decode_all(data: bytes, step: int | None = None) -> list:
    dec = FrameDecoder()
    out = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
        out.extend(dec.events())
    dec.eof()
    return out


def test_round_trip_header_and_raw_payload():
    piece = bytes(range(256)) * 100
    frames = encode("request", digest=D, index=3) + encode("piece", piece, digest=D, index=3) + encode("ping", id=7)
    for step in (None, 1, 7, 4096):
        msgs = decode_all(frames, step)
        assert [m.kind for m in msgs] == ["request", "piece", "ping"]
        assert msgs[0]["index"] == 3 and msgs[1]["digest"] == D
        assert bytes(msgs[1].payload) == piece and msgs[2]["id"] == 7
        assert msgs[1].sha256 == hashlib.sha256(piece).digest() and msgs[0].sha256 is None


def test_payload_follows_header_verbatim():
    """The payload is not msgpack-encoded: it is the last bytes of the frame, as they are."""
    frame = encode("piece", b"RAWBYTES", digest=D, index=0)
    assert frame.endswith(b"RAWBYTES")
    head = encode_head("piece", 8, digest=D, index=0)
    assert frame == head + b"RAWBYTES"


def test_recv_into_payload_space():
    piece = b"x" * 100_000
    frame = encode("piece", piece, digest=D, index=1)
    dec = FrameDecoder()
    dec.feed(frame[:200])
    assert dec.next_event() is NEED_DATA
    rest = memoryview(frame)[200:]
    while rest:
        space = dec.payload_space()
        assert space is not None
        n = min(len(space), len(rest), 9999)
        space[:n] = rest[:n]
        dec.payload_written(n)
        rest = rest[n:]
    msg = dec.next_event()
    assert msg.kind == "piece" and msg.payload == piece
    assert msg.sha256 == hashlib.sha256(piece).digest()


def frame(header_obj, payload=b"", header_len=None, payload_len=None):
    h = msgpack.packb(header_obj, use_bin_type=True)
    return FRAME_HEAD.pack(len(h) if header_len is None else header_len,
                           len(payload) if payload_len is None else payload_len) + h + payload


@pytest.mark.parametrize("data", [
    frame({"t": "nosuch"}),
    frame({"t": "request", "digest": D}),  # missing field
    frame({"t": "request", "digest": "sha256:xyz", "index": 1}),
    frame({"t": "request", "digest": D, "index": -1}),
    frame({"t": "request", "digest": D, "index": True}),
    frame({"t": "ping", "id": 1}, b"payload not allowed"),
    frame([1, 2, 3]),
    frame({"t": "ping", "id": 1}, header_len=0),
    struct.pack(">II", 1 << 30, 0),
    struct.pack(">II", 10, MAX_PAYLOAD + 1),
    FRAME_HEAD.pack(3, 0) + b"\xc1\xc1\xc1",  # msgpack reserved byte
    frame({"t": "metainfo", "id": 1, "digest": D, "size": 1, "piece_size": 1, "hashes": [b"short"]}),
    frame({"t": "renew", "entries": [[D, 0]]}),  # a renewal is [digest, pieces, complete]
    frame({"t": "renew", "entries": [[D, 0, 1]]}),
    frame({"t": "renew", "entries": [["sha256:xyz", 0, True]]}),
    frame({"t": "renew", "entries": [[D, 0, True]] * (MAX_RENEW + 1)}),
])
def test_malformed_frames_are_protocol_errors(data):
    with pytest.raises(ProtocolError):
        decode_all(data)


BAD_ADDRS = ["no-port-here", "127.0.0.1:99999", "127.0.0.1:0", "a" * 70 + ".example:80", "[not-v6]:80",
             "host name:80", "2001:db8::7", ":80", "x:+80", "x:٣", "0.0.0.0:5002", "[::]:5002"]
GOOD_ADDRS = ["127.0.0.1:5002", "node-3.p2pcache.default.svc.cluster.local:5002", "[::1]:5002",
              "[fd00::a:1]:65535", "my_host:1"]


@pytest.mark.parametrize("addr", BAD_ADDRS)
def test_a_peer_address_that_cannot_be_dialled_is_refused_where_it_arrives(addr):
    for kind, fields in [
        ("gossip", {"members": [["n1", addr, None, 1]]}),
        ("holders", {"id": 1, "digest": D, "holders": [["n1", addr, None, True]], "claim": None}),
        ("claim-answer", {"id": 1, "digest": D, "granted": False, "holder": "n1", "addr": addr, "complete": True,
                          "ttl": 1.0}),
        ("hello", {"v": 3, "node": "n1", "addr": addr, "zone": None, "nonce": b"x" * 16}),
    ]:
        with pytest.raises(ProtocolError):
            decode_all(frame({"t": kind, **fields}))


@pytest.mark.parametrize("addr", GOOD_ADDRS)
def test_peer_addresses_nodes_advertise_pass(addr):
    [msg] = decode_all(encode("gossip", members=[["n1", addr, None, 1]]))
    assert msg["members"][0][1] == addr


def test_renew_carries_many_digests_in_one_frame():
    entries = [["sha256:" + f"{i:064x}", i, i % 2 == 0] for i in range(MAX_RENEW)]
    [msg] = decode_all(encode("renew", entries=entries))
    assert msg.kind == "renew" and msg["entries"] == entries


def test_truncated_frame_at_eof():
    dec = FrameDecoder()
    dec.feed(encode("ping", id=1)[:-1])
    assert list(dec.events()) == []
    with pytest.raises(ProtocolError):
        dec.eof()


def test_we_never_send_what_we_would_refuse():
    with pytest.raises(ProtocolError):
        encode("request", digest="nope", index=1)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_crashes_the_decoder(data):
    dec = FrameDecoder(max_payload=1 << 16)
    try:
        dec.feed(data)
        list(dec.events())
    except ProtocolError:
        pass


@pytest.mark.parametrize("step,size", [(1, 50_000), (7, 200_000), (4096, MAX_PAYLOAD), (1 << 20, MAX_PAYLOAD),
                                       (None, MAX_PAYLOAD)])
def test_an_unwanted_payload_is_dropped_as_it_arrives(step, size):
    """A frame head may declare 16 MiB: unless the owner wants that payload (a piece it asked for) it is read
    and dropped in the chunks it comes in, never allocated whole; the frames after it decode as usual."""
    dec = FrameDecoder()
    asked: list[tuple[str, int]] = []
    dec.accept_payload = lambda kind, fields: asked.append((kind, fields["index"])) or fields["index"] == 2
    big = b"z" * size
    stream = (encode("piece", big, digest=D, index=1) + encode("piece", b"wanted", digest=D, index=2)
              + encode("ping", id=9))
    step = step or len(stream)
    out = []
    assert not dec.mid_frame()
    for i in range(0, len(stream), step):
        dec.feed(stream[i:i + step])
        out.extend(dec.events())
        assert dec._payload is None or len(dec._payload) == len(b"wanted")  # never 16 MiB
        assert len(dec._buf) <= max(step, 1 << 16)
        if i + step < FRAME_HEAD.size + 40 + size:
            assert dec.mid_frame()
    assert [(m.kind, bytes(m.payload)) for m in out] == [("piece", b"wanted"), ("ping", b"")]
    assert asked == [("piece", 1), ("piece", 2)]
    assert not dec.mid_frame()
    dec.eof()


def test_eof_inside_a_dropped_payload_is_a_protocol_error():
    dec = FrameDecoder()
    dec.accept_payload = lambda kind, fields: False
    dec.feed(encode("piece", b"x" * 1000, digest=D, index=0)[:500])
    assert list(dec.events()) == []
    with pytest.raises(ProtocolError):
        dec.eof()
