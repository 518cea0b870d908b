"""A hostile cluster member for tests against real node processes: it holds the cluster secret, passes the real
handshake (the project's own wire and handshake code), gossips like any member, and then answers what the node
sends it as a test says (or not at all).

It only ever dials the node: nothing listens at the address it advertises, so the node cannot dial it back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgpack
import trio

from p2pcache.swarm.handshake import Handshake, PeerInfo
from p2pcache.swarm.peer import handshake, open_peer_socket
from p2pcache.swarm.wire import FRAME_HEAD, NEED_DATA, FrameDecoder, Message, encode

from .harness.util import free_port, proc_mib, wait_until

# What the member sends back for a frame from the node: whole frames (`wire.encode`, or `raw_frame`).
OnFrame = Callable[[Message], list[bytes]]


def raw_frame(kind: str, **fields: object) -> bytes:
    """A frame without a payload, not validated: what `wire.encode` refuses to send (fields out of the schema)."""
    header = msgpack.packb({"t": kind, **fields}, use_bin_type=True)
    return FRAME_HEAD.pack(len(header), 0) + header


class HostileMember:
    def __init__(self, target: str, secret: bytes, on_frame: OnFrame | None = None,
                 node_id: str = "hostile000000001") -> None:
        self.target = target
        self.secret = secret
        self.on_frame = on_frame  # None: the member never reads what the node sends (it piles up)
        self.node_id = node_id
        self.addr = f"127.0.0.1:{free_port()}"
        self.seen: list[Message] = []  # the node's frames, in order
        self.closed_by_node = False  # the node ended the connection (a frame of ours it refused, say)
        self._sock: trio.socket.SocketType | None = None
        self._lock = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then gossip every 0.5 s and answer frames until cancelled (or the node closes)."""
        self._sock = await open_peer_socket(self.target)
        dec = FrameDecoder(hash_kinds=frozenset())
        await handshake(self._sock, Handshake("client", self.secret, PeerInfo(self.node_id, self.addr, None)), dec)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._gossip)
                task_status.started()
                if self.on_frame is None:
                    await trio.sleep_forever()
                await self._read(dec)
                nursery.cancel_scope.cancel()
        finally:
            self._sock.close()

    def kinds(self) -> set[str]:
        return {m.kind for m in self.seen}

    async def send(self, frame: bytes) -> None:
        async with self._lock:  # whole frames: tasks must not interleave parts of theirs
            assert self._sock is not None
            view = memoryview(frame)
            while view:
                view = view[await self._sock.send(view):]

    async def _gossip(self) -> None:
        while True:
            try:
                await self.send(encode("gossip", members=[[self.node_id, self.addr, None, int(time.time() * 10)]]))
            except OSError:
                return  # the node closed the connection (a frame it refused): _read ends the member
            await trio.sleep(0.5)

    async def _read(self, dec: FrameDecoder) -> None:
        assert self._sock is not None
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                data = await self._sock.recv(1 << 20)
                if not data:
                    self.closed_by_node = True
                    return
                dec.feed(data)
                continue
            assert isinstance(ev, Message)
            self.seen.append(ev)
            assert self.on_frame is not None
            for frame in self.on_frame(ev):
                await self.send(frame)


def wait_member(node, timeout: float = 10) -> None:
    """Until `node` has the member's connection: the handshake makes it a live member at once (with one node,
    one of the two tracker owners of every digest); then a gossip round more for good measure."""
    wait_until(lambda: node.metric("p2pcache_peers_connected") >= 1, timeout, "the member to connect")
    time.sleep(0.6)


def rss_mib(node) -> float:
    """The node process's resident memory."""
    return proc_mib(node.proc.pid, "VmRSS")
