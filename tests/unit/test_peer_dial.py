"""Dialling a peer: an address that cannot be dialled is an unreachable peer (OSError), whatever is wrong with it."""

from __future__ import annotations

import pytest

from p2pcache.swarm.peer import open_peer_socket


@pytest.mark.parametrize("addr", ["no-port-here", "127.0.0.1:99999", "a" * 70 + ".example:80", ""])
async def test_an_address_that_cannot_be_dialled_is_an_oserror(addr):
    """A ValueError from the address parser or the IDNA codec went past every caller's `except OSError` and
    failed the whole download that tried the address (found in review)."""
    with pytest.raises(OSError, match="bad peer address"):
        await open_peer_socket(addr)
