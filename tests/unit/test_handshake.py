"""The peer handshake: both sides prove the cluster secret; wrong or missing secrets are refused both ways."""

import pytest

from p2pcache.swarm.handshake import Handshake, HandshakeError, PeerInfo
from p2pcache.swarm.wire import Message

A = PeerInfo("node-a", "127.0.0.1:1", None)
B = PeerInfo("node-b", "127.0.0.1:2", "z1")


def run(client_secret, server_secret):
    c = Handshake("client", client_secret, A)
    s = Handshake("server", server_secret, B)
    kind, fields = c.client_hello()
    (kind, fields), = s.receive(Message(kind, fields))
    (kind, fields), = c.receive(Message(kind, fields))
    assert s.receive(Message(kind, fields)) == []
    return c, s


@pytest.mark.parametrize("secret", [None, b"s3cret"])
def test_matching_secrets_accept_both_sides(secret):
    c, s = run(secret, secret)
    assert c.done and s.done
    assert c.peer == B and s.peer == A


@pytest.mark.parametrize("cs, ss", [(b"right", b"wrong"), (None, b"secret"), (b"secret", None)])
def test_mismatched_secrets_are_refused(cs, ss):
    with pytest.raises(HandshakeError):
        run(cs, ss)


def test_client_refuses_a_server_that_cannot_prove():
    """A server without the secret learns nothing useful: the client refuses before sending its own proof."""
    c = Handshake("client", b"secret", A)
    s = Handshake("server", b"other", B)
    (kind, fields), = s.receive(Message(*c.client_hello()))
    with pytest.raises(HandshakeError):
        c.receive(Message(kind, fields))


def test_reflected_proof_is_refused():
    """A server's proof sent back as the client's proof does not verify (role labels differ)."""
    c = Handshake("client", b"k", A)
    s = Handshake("server", b"k", B)
    (_, ack), = s.receive(Message(*c.client_hello()))
    with pytest.raises(HandshakeError):
        s.receive(Message("hello-proof", {"proof": ack["proof"]}))


def test_out_of_order_and_bad_version():
    s = Handshake("server", None, B)
    with pytest.raises(HandshakeError):
        s.receive(Message("hello-proof", {"proof": b""}))
    c = Handshake("client", None, A)
    kind, fields = c.client_hello()
    with pytest.raises(HandshakeError):
        Handshake("server", None, B).receive(Message(kind, {**fields, "v": 99}))
