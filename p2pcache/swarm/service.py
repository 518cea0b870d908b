"""The swarm of one node, in trio: peer listener and connection pool, this node's tracker shard, membership, and
`fill(download, repo)`, which completes a download from peers and/or (holding the cluster's claim) upstream.

This is the driver. What to ask whom, when to give up on a peer, who holds a digest and who may fetch it from
upstream are decided by the sans-IO objects (`DownloadScheduler`, `Tracker`, `Membership`, `owners`), the same
objects the simulator runs. This module feeds them events with `trio.current_time()` and carries out their
decisions. It never writes a piece that did not match its published SHA-256, never serves a piece it has not
verified, and never lets one peer's failure (or malice) reach another connection or the node.

Theory of operation
-------------------
Tracker shards. Every node runs a `Tracker`. The owners of digest X are `owners(X, live members, 2)`: both hold
X's holders (announces go to both), both must grant the claim to fetch X from upstream (those that answer: so two
nodes whose member lists differ for a moment still cannot both win), and both keep X's metainfo, which the claim
holder publishes piece by piece. A shard releases the claims it granted a node as soon as that node's last
connection closes, so a dead claim holder is replaced in about a second. `--tracker ADDR` replaces rendezvous with
that one node.

A download (`fill`): announce ourselves to X's owners and learn the holders; if nobody holds X and nobody claims it,
ask for the claim. Granted: stream X from upstream (`Download.fetch_from_upstream`), publish each piece's hash as it
is cut and tell interested peers we have it, renew the claim when the scheduler says so, release it at the end.
Not granted: get the metainfo, connect to the holders (the claim holder among them), ask for their bitfields and
drive the scheduler: every piece that arrives is hashed (in a worker thread) and checked against the metainfo
before `Download.write_piece`; a mismatch bans the peer. When the scheduler says nobody can deliver (the claim
holder died, or no peer has the missing pieces), we ask for the claim ourselves and fetch the rest from upstream,
keeping every piece already fetched from peers. If the whole-blob digest fails at the end, the fetcher discards the
blob and refetches it from upstream; we withdraw our announcement.

Serving: a peer's request is answered from the store (complete blob) or from a download's partial file (a
verified piece), with `os.sendfile`, paced by the upload token bucket. Manifests by digest and tag answers are
served from this node's ManifestStore and TagCache, so a node can pull what the cluster holds while the upstream
is down (`peer_manifest`, `peer_tag`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from p2pcache.discovery import rendezvous
from p2pcache.discovery.dns import run_dns_seeds
from p2pcache.discovery.gossip import GossipDriver
from p2pcache.discovery.membership import Membership
from p2pcache.hostport import parse_hostport
from p2pcache.paced import paced
from p2pcache.swarm.chain import ChainHasher, piece_hash
from p2pcache.swarm.handshake import Handshake, HandshakeError, PeerInfo, load_secret
from p2pcache.swarm.metainfo import (
    MAX_META_PIECES,
    checkable,
    piece_count,
    piece_span,
    prev_link,
    valid_layout,
)
from p2pcache.swarm.peer import (
    MAX_REQUESTS_IN,
    RECV_CHUNK,
    SEND_CHUNK,
    CallTimedOut,
    PeerConnection,
    PeerGone,
    PieceRejected,
    handshake,
    open_peer_socket,
)
from p2pcache.swarm.picker import mask_of
from p2pcache.swarm.ratelimit import RateMeter, TokenBucket, paced_chunk
from p2pcache.swarm.scheduler import (
    SPARE_SHARE,
    AskClaim,
    Ban,
    BanList,
    Cancel,
    Decision,
    Done,
    DownloadScheduler,
    Fail,
    FetchUpstream,
    Request,
    SchedulerConfig,
    Serve,
    StopUpstream,
    UploadSlots,
    claim_wait,
    source_shares,
)
from p2pcache.swarm.tracker import ClaimGranted, Tracker
from p2pcache.swarm.wire import MAX_RENEW, FrameDecoder, Message, ProtocolError

if TYPE_CHECKING:
    from p2pcache.config import Settings
    from p2pcache.fetch import Download, Fetcher
    from p2pcache.metrics import Metrics
    from p2pcache.oci.reference import Repo
    from p2pcache.oci.upstream import Upstream
    from p2pcache.store.blobs import BlobStore

log = logging.getLogger(__name__)
_TRACE = bool(os.environ.get("SWARM_TRACE"))  # log every scheduler decision (debugging the driver)

TRACKER_REPLICAS = 2  # owners per digest: holders survive the loss of one owner without a re-announce gap
ANNOUNCE_TTL = 30.0  # soft state: a holder that stops renewing is forgotten after this
ANNOUNCE_EVERY = 10.0  # a third of the TTL, so one lost announce costs nothing
CLAIM_TTL = 12.0  # > 2x the scheduler's claim_renew (5 s): one slow renewal must not hand the fetch to a second node
MAX_CONNS_PER_PEER = 2  # one each way is normal; more is a misbehaving or looping peer
# A connection no download of ours uses, with nothing outstanding and no frame either way for this long, is closed:
# gossip (3 random members a second) and tracker lookups connect a node to most members of a large cluster over
# time, and each connection is a socket (and a file descriptor) on both ends. Whoever needs the peer again connects
# again (a TCP connect and the HMAC handshake). A pair of nodes in a cluster of N gossips about every N/6 s, so a
# node keeps about the members it gossiped with in the last minute, its download peers and its trackers.
PEER_IDLE_CLOSE = 60.0
MAX_INCOMING = 512  # total accepted connections: a flood on the peer port cannot exhaust descriptors
# Connections from one address still in their handshake (HANDSHAKE_TIMEOUT at most each). Without it one host
# that kept 512 silent connections open, reopened within the handshake timeout, locked every peer out of the
# node, secret or not. A handshake takes milliseconds: even many nodes behind one address (loopback) stay far below.
MAX_HANDSHAKING_PER_IP = 32
# Stored blobs hashed at once to answer metainfo requests (each a pass over the whole blob in a thread).
HASHERS = 2
TRACKER_EXPIRE_EVERY = 2.0  # housekeeping of the tracker shard
METAINFO_POLL = 0.2  # how often a leecher refreshes piece hashes while the claim holder is still publishing
UPLOAD_SLOTS = 4  # pieces uploaded at once: a cold blob's first holder finishes pieces fast so they spread
MAX_STORED_ANNOUNCED = 10_000  # blobs found in the store at start-up that are announced (one small RPC each)
HOLDERS_LIMIT = 50  # holders asked for per lookup; the tracker samples them at random so load spreads
# A manifest is answered only while what the connection has queued for its peer, with it, stays within this (one
# alone always goes, however large); beyond, "not held". A member that asked for one 512 KB manifest 1000 times and
# read slowly had ~500 MB of answers queued (found in review); peer.MAX_CONTROL_BYTES closes a connection whose
# peer lets any frames pile up beyond that.
MANIFEST_ANSWER_QUEUE = 4 << 20
# Piece payloads are hashed in a worker thread (`_Fill._get_piece`), not by the decoder on the event loop: SHA-256
# runs ~1.4 GB/s on one core here, so hashing on the loop caps a node's intake near that and stalls every other
# connection while it runs; in a thread it overlaps the next piece's receive.
NO_LOOP_HASHING: frozenset[str] = frozenset()


@dataclass
class HolderInfo:
    node: str
    addr: str
    zone: str | None
    complete: bool


class SwarmError(Exception):
    """The swarm could not complete a download (the fetcher reports it as a failed download)."""


class SwarmService:
    """The swarm side of one node. `run()` serves until cancelled; the fetcher calls `fill`."""

    def __init__(self, settings: Settings, store: BlobStore, fetcher: Fetcher, upstream: Upstream,
                 metrics: Metrics, *, manifests: Any = None, tags: Any = None) -> None:
        from p2pcache.store.manifests import ManifestStore, TagCache

        self.settings = settings
        self.store = store
        self.fetcher = fetcher
        self.upstream = upstream
        self.metrics = metrics
        # Pass the resolver's instances so what it learns is served at once; else ours read the same disk.
        self.manifests = manifests if manifests is not None else ManifestStore(settings.data, store)
        self.tags = tags if tags is not None else TagCache(settings.data)
        self.secret = load_secret(settings.cluster_secret_file)
        self.node_id = uuid.uuid4().hex[:16]
        assert settings.peer_listen is not None, "the swarm needs --peer-listen"
        self.listen_host, self.listen_port = parse_hostport(settings.peer_listen)
        self.addr = settings.advertise or settings.peer_listen
        self.zone = settings.zone
        self.me = PeerInfo(self.node_id, self.addr, self.zone)
        # heartbeat starts from the wall clock so a restarted node's is always higher than its old one
        self.membership = Membership(self.node_id, self.addr, self.zone, heartbeat=int(time.time() * 10))
        self.tracker = Tracker(rng=random.Random(), announce_ttl=ANNOUNCE_TTL, claim_ttl=CLAIM_TTL)
        self.up_bucket = TokenBucket(settings.upload_limit, now=trio.current_time())
        self.up_meter = RateMeter(now=trio.current_time())  # what the upload limit let through lately
        # The node's one download limit: the fetcher's upstream downloads count against it too (paced.py). The
        # upstream stream and the peer reads are each assured half and take what the other leaves: the cluster's
        # upstream link is its scarcest resource (every node needs what only the claim holder can fetch), so the
        # claim holder's share of its own link must not shrink with the number of peers it reads from; nor may
        # the stream starve the peer reads that hold their uploaders' slots (`ratelimit.DownloadShare`).
        self.down_share = fetcher.down_share
        self.conns: dict[str, list[PeerConnection]] = {}
        self.uploads = UploadSlots(slots=UPLOAD_SLOTS, per_peer=MAX_REQUESTS_IN)
        self.bans = BanList()  # node ids that sent bad pieces or lying piece lists, shared by all downloads
        self._dial_locks: dict[str, trio.Lock] = {}
        self._incoming = 0
        self._nursery: trio.Nursery | None = None
        self._fills: dict[str, Any] = {}  # digest -> the _Fill driving it (routes have/bitfield)
        self._announced: dict[str, bool] = {}  # digest -> complete, re-announced every ANNOUNCE_EVERY
        self._claims: set[str] = set()  # digests whose upstream claim we hold
        self._claiming: set[str] = set()  # digests whose first claim request is on its way
        self._granted: dict[str, set[str]] = {}  # node -> digests whose claim our tracker shard granted it
        self._tracker_node: str | None = None  # node id behind --tracker, once connected
        self._meta_cache: dict[str, tuple[int, int, list[bytes]]] = {}  # piece hashes of complete blobs
        # Stored blobs being hashed for their piece hashes: one pass per digest however many ask (a peer sent
        # 200 metainfo requests for one 128 MiB blob: 200 passes, 41 threads), at most HASHERS at a time.
        self._hashing: dict[str, trio.Event] = {}
        self._hashers = trio.CapacityLimiter(HASHERS)
        self._handshaking: dict[str, int] = {}  # incoming connections still in their handshake, by source IP
        self.gossip = GossipDriver(self.membership, list(settings.join), self.connect_node, self.connect_addr)
        self.bound_port: int | None = None

    # =========================================================================================================
    # life
    # =========================================================================================================
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # the address family of the host given: an IPv6 --peer-listen ([::]:5002) failed with "address family
        # not supported" from an IPv4 socket (found in review)
        family = trio.socket.AF_INET6 if ":" in self.listen_host else trio.socket.AF_INET
        sock = trio.socket.socket(family)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind((self.listen_host, self.listen_port))
        sock.listen(128)
        self.bound_port = sock.getsockname()[1]
        if self.listen_port == 0 and self.settings.advertise is None:
            host = f"[{self.listen_host}]" if family == trio.socket.AF_INET6 else self.listen_host
            self.addr = f"{host}:{self.bound_port}"
            self.me = PeerInfo(self.node_id, self.addr, self.zone)
            self.membership.me.addr = self.addr
        log.info("swarm: node %s listening for peers on %s (advertised as %s)", self.node_id,
                 self.settings.peer_listen, self.addr)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept_loop, sock)
                nursery.start_soon(self.gossip.run)
                if self.settings.join_dns:
                    nursery.start_soon(run_dns_seeds, self.settings.join_dns, self.listen_port,
                                       self.gossip.add_seeds)
                nursery.start_soon(self._housekeeping)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            sock.close()

    async def _housekeeping(self) -> None:
        # What the store already holds (a restarted node) is announced like everything else, from the first
        # round on: tracker state is soft and the owners may never have heard of it.
        try:
            for digest in self.store.digests()[-MAX_STORED_ANNOUNCED:]:  # the most recently used
                self._announced.setdefault(digest, True)
        except OSError as e:
            log.warning("swarm: cannot list the store: %s", e)
        last_announce = -math.inf
        joined = self.membership.joined
        while True:
            await trio.sleep(TRACKER_EXPIRE_EVERY)
            now = trio.current_time()
            self.tracker.expire(now)
            self.metrics.tracked_digests.set(self.tracker.tracked())
            # A member that joined (or came back) may now own digests we hold, and an owner that knows of no
            # holder grants the claim: the next pull of a blob the cluster holds went upstream again (found in
            # review, nodes joining a cluster). So a join brings the next round forward, not 10 s later.
            moved = self.membership.joined != joined
            if now - last_announce >= ANNOUNCE_EVERY or moved:
                last_announce, joined = now, self.membership.joined
                renew, gone = renewal_round(self._announced, self._holds, set(self._fills),
                                            set(self.fetcher.downloads()))
                for digest in gone:
                    self._spawn(self._withdraw, digest)  # evicted or deleted since: stop sending peers here
                if renew:
                    if moved:
                        log.info("swarm: members joined: renewing %d tracker entries now", len(renew))
                    self._spawn(self._renew, renew)
                in_use = {id(c) for f in self._fills.values() for c in f.peers.values()}
                conns = [c for lst in self.conns.values() for c in lst]
                for c in idle_connections(conns, in_use, now, PEER_IDLE_CLOSE):
                    log.info("swarm: closing %r, idle for %.0fs", c, now - c.last_active)
                    c.close()

    def claims_elsewhere(self, digest: str) -> int:
        """Claims this node holds or is asking for, other than `digest`'s (see scheduler.claim_wait)."""
        return len((self._claims | self._claiming) - {digest})

    def _spawn(self, fn: Any, *args: Any) -> None:
        """A background task of the service: its failure is logged, never the node's end."""
        if self._nursery is not None:
            self._nursery.start_soon(_logged, fn, *args)

    # =========================================================================================================
    # connections
    # =========================================================================================================
    async def _throttle_tx(self, n: int) -> None:
        now = trio.current_time()
        delay = self.up_bucket.take(n, now)
        self.up_meter.add(n, now)
        if delay > 0:
            await trio.sleep(delay)

    async def _throttle_rx(self, n: int) -> None:
        delay = self.down_share.peer(n, trio.current_time())
        if delay > 0:
            await trio.sleep(delay)

    def _count_bytes(self, direction: str, n: int) -> None:
        self.metrics.peer_bytes.labels(direction=direction).inc(n)

    def _new_conn(self, sock: trio.socket.SocketType, peer: PeerInfo, dec: FrameDecoder,
                  outgoing: bool) -> PeerConnection:
        return PeerConnection(sock, peer, self, dec, outgoing=outgoing,
                              throttle_tx=self._throttle_tx if self.settings.upload_limit else None,
                              throttle_rx=self._throttle_rx if self.settings.download_limit else None,
                              on_bytes=self._count_bytes,
                              send_chunk=paced_chunk(self.settings.upload_limit, SEND_CHUNK),
                              recv_chunk=paced_chunk(self.settings.download_limit, RECV_CHUNK))

    def _register(self, conn: PeerConnection) -> bool:
        if self.bans.banned(conn.peer.node, trio.current_time()):
            log.info("swarm: refusing banned peer %s", conn.peer.node)
            return False
        lst = self.conns.setdefault(conn.peer.node, [])
        lst[:] = [c for c in lst if not c.closed]
        if len(lst) >= MAX_CONNS_PER_PEER:
            return False
        lst.append(conn)
        self.metrics.peers_connected.inc()
        self.membership.heard(conn.peer.node, conn.peer.addr, conn.peer.zone, trio.current_time())
        return True

    def on_closed(self, conn: PeerConnection) -> None:
        lst = self.conns.get(conn.peer.node)
        if lst and conn in lst:
            lst.remove(conn)
            self.metrics.peers_connected.dec()
            if not lst:
                del self.conns[conn.peer.node]
        for fill in list(self._fills.values()):
            fill.peer_closed(conn)
        if conn.peer.node not in self.conns:
            # Its last connection is gone (its process died, most likely): the claims we granted it would stall
            # every waiter until they expire, so they go now. A live node that only lost a connection finds out
            # at its next renewal; at worst two nodes fetch that blob from upstream.
            for digest in self._granted.pop(conn.peer.node, ()):
                self.tracker.release(digest, conn.peer.node)

    async def _accept_loop(self, sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    client, _ = await sock.accept()
                except OSError as e:  # out of descriptors, say: wait a moment, never give up listening
                    log.warning("swarm: accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                ip = _source_ip(client)
                if self._incoming >= MAX_INCOMING or self._handshaking.get(ip, 0) >= MAX_HANDSHAKING_PER_IP:
                    client.close()
                    continue
                # counted here, not when the task first runs: a burst of accepts must meet the limits it fills
                self._incoming += 1
                self._handshaking[ip] = self._handshaking.get(ip, 0) + 1
                nursery.start_soon(_logged, self._serve_incoming, client, ip)

    async def _serve_incoming(self, sock: trio.socket.SocketType, ip: str) -> None:
        """An accepted connection, counted by the accept loop in `_incoming` and (until its handshake ends)
        `_handshaking`."""
        try:
            dec = FrameDecoder(hash_kinds=NO_LOOP_HASHING)
            try:
                peer = await handshake(sock, Handshake("server", self.secret, self.me), dec)
            except (HandshakeError, ProtocolError, PeerGone, OSError, trio.TooSlowError) as e:
                log.info("swarm: refused an incoming peer connection: %s", e)
                sock.close()
                return
            finally:
                n = self._handshaking.pop(ip) - 1
                if n:
                    self._handshaking[ip] = n
            conn = self._new_conn(sock, peer, dec, outgoing=False)
            if not self._register(conn):
                sock.close()
                return
            await conn.run()
        finally:
            self._incoming -= 1

    def _open_conn(self, node: str) -> PeerConnection | None:
        for c in self.conns.get(node, ()):
            if not c.closed:
                return c
        return None

    async def connect_node(self, node: str) -> PeerConnection:
        """An open connection to member `node` (reused, or dialled at its address). Raises PeerGone."""
        conn = self._open_conn(node)
        if conn is not None:
            return conn
        m = self.membership.get(node)
        if m is None or node == self.node_id:
            raise PeerGone(f"unknown member {node}")
        lock = self._dial_locks.setdefault(node, trio.Lock())
        async with lock:
            conn = self._open_conn(node)
            if conn is not None:
                return conn
            try:
                conn = await self._dial(m.addr)
            except PeerGone:
                self.membership.unreachable(node, trio.current_time())
                raise
            if conn.peer.node != node:
                conn.close()
                raise PeerGone(f"{m.addr} is now {conn.peer.node}, not {node}")
            return conn

    async def connect_addr(self, addr: str) -> PeerConnection:
        """Dial an address whose node id we may not know yet (a seed, the --tracker)."""
        for lst in self.conns.values():
            for c in lst:
                if c.peer.addr == addr and not c.closed:
                    return c
        return await self._dial(addr)

    async def _dial(self, addr: str) -> PeerConnection:
        if self._nursery is None:
            raise PeerGone("swarm not running")
        try:
            sock = await open_peer_socket(addr)
        except (OSError, trio.TooSlowError) as e:
            raise PeerGone(f"cannot connect to {addr}: {e}") from None
        dec = FrameDecoder(hash_kinds=NO_LOOP_HASHING)
        try:
            peer = await handshake(sock, Handshake("client", self.secret, self.me), dec)
        except (HandshakeError, ProtocolError, PeerGone, OSError, trio.TooSlowError) as e:
            sock.close()
            raise PeerGone(f"handshake with {addr} failed: {e}") from None
        conn = self._new_conn(sock, peer, dec, outgoing=True)
        if not self._register(conn):
            sock.close()
            existing = self._open_conn(peer.node)
            if existing is None:
                raise PeerGone(f"too many connections to {peer.node}")
            return existing
        self._nursery.start_soon(_logged, conn.run)
        return conn

    # =========================================================================================================
    # what peers ask of us
    # =========================================================================================================
    def piece_source(self, digest: str, index: int) -> tuple[int, int, int] | None:
        src = self._piece_source(digest, index)
        if src is None:
            self.uploads.not_held(digest, index)
        return src

    def _piece_source(self, digest: str, index: int) -> tuple[int, int, int] | None:
        f = self.store.open(digest)
        if f is not None:
            try:
                size = os.fstat(f.fileno()).st_size
                piece_size = self._piece_size_of(digest, size)
                if not 0 <= index < piece_count(size, piece_size):
                    return None
                start, length = piece_span(index, size, piece_size)
                return os.dup(f.fileno()), start, length
            finally:
                f.close()
        d = self.fetcher.downloads().get(digest)
        partial = d.partial if d is not None else None
        if partial is None or not 0 <= index < partial.n_pieces or not partial.have(index):
            return None
        start, length = piece_span(index, partial.size, partial.piece_size)
        try:
            return os.dup(partial.file.fileno()), start, length
        except (OSError, ValueError):
            return None

    def _piece_size_of(self, digest: str, size: int) -> int:
        cached = self._meta_cache.get(digest)
        if cached is not None:
            return cached[1]
        m = self.tracker.metainfo(digest)
        if m is not None and m.size == size:
            return m.piece_size
        from p2pcache.swarm.metainfo import piece_size_for

        return piece_size_for(size, self.settings.piece_size)

    def _bitfield(self, digest: str) -> bytes:
        size = self.store.stat(digest, touch=False)
        if size is not None:
            n = piece_count(size, self._piece_size_of(digest, size))
            bits = bytearray(b"\xff" * ((n + 7) // 8))
            if n % 8:
                bits[-1] = (0xFF << (8 - n % 8)) & 0xFF
            return bytes(bits)
        d = self.fetcher.downloads().get(digest)
        if d is not None and d.partial is not None:
            return d.partial.bitfield()
        return b""

    # -- upload slots (UploadSlots decides, connections send) ---------------------------------------------------
    def upload_request(self, conn: PeerConnection, digest: str, index: int) -> bool:
        # room on the upload link: less than SPARE_SHARE of the limit sent over the last second (no limit: room
        # as far as we know), as the simulator reads it off its allocation
        limit = self.settings.upload_limit
        spare = limit is None or self.up_meter.rate(trio.current_time()) < SPARE_SHARE * limit
        serves = self.uploads.request(conn, digest, index, spare=spare)
        if serves is None:
            return False
        self._start_uploads(serves)
        return True

    def upload_done(self, conn: PeerConnection, digest: str, index: int) -> None:
        if (conn, digest, index) in self.uploads.active:
            self._start_uploads(self.uploads.finished(conn, digest, index))
        else:
            self._start_uploads(self.uploads.cancel(conn, digest, index))

    def _start_uploads(self, serves: list[Serve]) -> None:
        for sv in serves:
            sv.peer.start_upload(sv.key, sv.index)

    def on_message(self, conn: PeerConnection, msg: Message) -> list[tuple[str, dict[str, Any], bytes]]:
        k = msg.kind
        now = trio.current_time()
        peer = conn.peer
        if k == "gossip":
            # no heartbeat runs ahead of the wall clock its node started from (x10); an hour of skew allowed
            self.membership.merge(msg["members"], now, max_heartbeat=int(time.time() * 10) + 36_000)
            return []
        if k == "ping":
            return [("pong", {"id": msg["id"]}, b"")]
        if k in ("announce", "renew", "withdraw", "claim", "publish"):
            out = self._tracker_handle(peer, msg.kind, msg.fields, now)
            return [] if out is None else [(out[0], out[1], b"")]
        if k == "metainfo-req":
            ans = self._metainfo_answer(msg["digest"])
            if ans is None and self.store.stat(msg["digest"], touch=False) is not None:
                self._spawn(self._answer_metainfo_later, conn, msg["id"], msg["digest"])
                return []
            return [("metainfo", self._metainfo_fields(msg["id"], msg["digest"], ans), b"")]
        if k == "interested":
            conn.want_haves(msg["digest"])
            fill = self._fills.get(msg["digest"])
            if fill is not None:
                fill.consider(conn)  # a peer fetching the same blob: we want its pieces as much as it wants ours
            return [("bitfield", {"digest": msg["digest"], "bits": self._bitfield(msg["digest"])}, b"")]
        if k in ("have", "bitfield"):
            fill = self._fills.get(msg["digest"])
            if fill is not None:
                fill.peer_message(conn, msg)
            return []
        if k == "tag-req":
            return [("tag", self._tag_answer(msg), b"")]
        if k == "manifest-req":
            got = self.manifests.get(msg["digest"])
            queued = conn.queued_bytes()
            if got is not None and queued and queued + len(got[1]) > MANIFEST_ANSWER_QUEUE:
                # Answered "not held" (the asker tries another peer): the answers it has not read yet are enough.
                log.debug("swarm: %s has %d bytes of answers unread: manifest %s refused", conn.peer.node, queued,
                         msg["digest"][:19])
                got = None
            if got is None:
                return [("manifest", {"id": msg["id"], "digest": msg["digest"], "media_type": None}, b"")]
            return [("manifest", {"id": msg["id"], "digest": msg["digest"], "media_type": got[0]}, got[1])]
        raise ProtocolError(f"{k} is not a request")

    # -- tracker shard ------------------------------------------------------------------------------------------
    def _tracker_handle(self, peer: PeerInfo, kind: str, f: dict[str, Any],
                        now: float) -> tuple[str, dict[str, Any]] | None:
        """One tracker RPC, from a peer or from ourselves (same code either way)."""
        t = self.tracker
        if kind == "renew":
            for digest, pieces, complete in f["entries"]:
                t.announce(now, digest, peer.node, peer.addr, peer.zone, pieces=pieces, complete=complete,
                           ttl=ANNOUNCE_TTL)
            return None
        digest = f["digest"]
        if kind == "announce":
            t.announce(now, digest, peer.node, peer.addr, peer.zone, pieces=f["pieces"], complete=f["complete"],
                       ttl=ANNOUNCE_TTL)
            hs = t.holders(digest, now, limit=HOLDERS_LIMIT, prefer_zone=peer.zone, exclude=peer.node)
            return "holders", {"id": f["id"], "digest": digest, "claim": t.claim_holder(digest, now),
                               "holders": [[h.node, h.address, h.zone, h.complete] for h in hs]}
        if kind == "withdraw":
            t.withdraw(digest, peer.node)
            return None
        if kind == "claim":
            if f["release"]:
                t.release(digest, peer.node)
                self._granted.get(peer.node, set()).discard(digest)
                return "claim-answer", {"id": f["id"], "digest": digest, "granted": False, "holder": None,
                                        "addr": None, "complete": False, "ttl": 0.0}
            holder = t.claim_holder(digest, now)
            known = self.membership.get(holder) if holder is not None else None
            if holder != peer.node and known is not None and not self.membership.is_live(known.node):
                # The holder stopped answering gossip (a hung process keeps its connections open, so closing
                # them released nothing): its claim goes now, not at the end of its TTL. If it comes back, its
                # next renewal is refused and its stream stops (scheduler.claim_denied).
                log.info("swarm: claim of %s held by %s, which is not alive: released", digest[:19], holder)
                t.release(digest, holder)
                self._granted.get(holder, set()).discard(digest)
            ans = t.claim(digest, peer.node, now, ttl=CLAIM_TTL, address=peer.addr)
            if isinstance(ans, ClaimGranted):
                if peer.node != self.node_id:
                    self._granted.setdefault(peer.node, set()).add(digest)
                return "claim-answer", {"id": f["id"], "digest": digest, "granted": True, "holder": peer.node,
                                        "addr": peer.addr, "complete": False, "ttl": CLAIM_TTL}
            return "claim-answer", {"id": f["id"], "digest": digest, "granted": False, "holder": ans.holder,
                                    "addr": ans.address, "complete": ans.complete,
                                    "ttl": max(0.0, ans.expires_at - now)}
        if kind == "publish":
            hashes = f["hashes"]
            if all(h is not None for h in hashes):
                t.publish_metainfo(digest, peer.node, now, f["size"], f["piece_size"], f["first"], hashes)
            return None
        raise AssertionError(kind)

    def _owners(self, digest: str) -> list[str]:
        if self.settings.tracker:
            return [self._tracker_node] if self._tracker_node else []
        return rendezvous.owners(digest, [m.node for m in self.membership.live()], TRACKER_REPLICAS)

    async def _tracker_call(self, owner: str, kind: str, **fields: Any) -> dict[str, Any] | None:
        """A tracker RPC to `owner` (ourselves: no network). None when it has no answer (one-way kinds)."""
        if owner == self.node_id:
            out = self._tracker_handle(self.me, kind, {"id": 0, **fields}, trio.current_time())
            return None if out is None else out[1]
        conn = await self.connect_node(owner)
        if kind in ("withdraw", "publish", "renew"):
            conn.send(kind, **fields)
            return None
        try:
            return (await conn.call(kind, **fields)).fields
        except CallTimedOut:
            # A silent owner, as a failed dial is: suspect until it is heard from again, so the calls after this
            # one go to the next owners instead of each waiting RPC_TIMEOUT on it (a pull's announce and claim
            # each waited 3 s on it, one after the other, until the membership's own timeout caught up).
            self.membership.unreachable(owner, trio.current_time())
            raise

    async def _owner_conns(self, digest: str) -> list[str]:
        if self.settings.tracker and self._tracker_node is None and self.settings.tracker in (
                self.addr, self.settings.peer_listen):
            self._tracker_node = self.node_id  # we are the --tracker
        if self.settings.tracker and self._tracker_node is None:
            try:
                conn = await self.connect_addr(self.settings.tracker)
                self._tracker_node = conn.peer.node
            except PeerGone as e:
                log.warning("tracker %s unreachable: %s", self.settings.tracker, e)
        return self._owners(digest)

    async def _announce(self, digest: str, complete: bool, pieces: int = 0) -> tuple[list[HolderInfo], str | None]:
        """Tell every owner we hold (part of) `digest`; returns the holders they know and the claim holder."""
        holders: dict[str, HolderInfo] = {}
        claim: str | None = None
        for owner in await self._owner_conns(digest):
            try:
                ans = await self._tracker_call(owner, "announce", digest=digest, pieces=pieces, complete=complete)
            except PeerGone as e:
                log.info("announce of %s to %s failed: %s", digest[:19], owner, e)
                continue
            assert ans is not None
            claim = claim or ans["claim"]
            for node, addr, zone, full in ans["holders"]:
                if node != self.node_id:
                    h = holders.get(node)
                    holders[node] = HolderInfo(node, addr, zone, full or (h is not None and h.complete))
        return list(holders.values()), claim

    async def _renew(self, held: list[tuple[str, bool]]) -> None:
        """Renew our tracker entries for `held` (digest, complete): one-way "renew" frames of up to MAX_RENEW
        entries to each owner, instead of an "announce" RPC per digest and owner. What an owner misses (it is
        down, the frame is lost) costs that digest's entry until the next round, as with any soft state."""
        if not held:
            return
        await self._owner_conns(held[0][0])  # with --tracker: find out which node the tracker is
        by_owner: dict[str, list[list[Any]]] = {}
        for digest, complete in held:
            for owner in self._owners(digest):
                by_owner.setdefault(owner, []).append([digest, 0, complete])
        for owner, entries in by_owner.items():
            self._spawn(self._renew_at, owner, entries)  # owners in parallel: one slow to dial delays no other

    async def _renew_at(self, owner: str, entries: list[list[Any]]) -> None:
        for i in range(0, len(entries), MAX_RENEW):
            try:
                await self._tracker_call(owner, "renew", entries=entries[i:i + MAX_RENEW])
            except PeerGone as e:
                log.info("renewal at %s failed: %s", owner, e)
                return

    async def _withdraw(self, digest: str) -> None:
        self._announced.pop(digest, None)
        for owner in self._owners(digest):
            try:
                await self._tracker_call(owner, "withdraw", digest=digest)
            except PeerGone:
                pass

    async def _claim(self, digest: str) -> dict[str, Any] | None:
        """Ask every owner of `digest` (as we see them) for the claim; granted only if every owner that answers
        grants it. Two nodes whose member lists differ for a moment (a join still gossiping) compute different
        owners, but rendezvous sets of two almost always share one, and that one grants only one of them. Where we
        were granted but the answer is no, we release at once so the grant does not block others. None when no
        owner answers (we are on our own)."""
        answers: list[tuple[str, dict[str, Any]]] = []
        for owner in await self._owner_conns(digest):
            try:
                ans = await self._tracker_call(owner, "claim", digest=digest, release=False)
            except PeerGone as e:
                log.info("claim of %s at %s failed: %s", digest[:19], owner, e)
                continue
            assert ans is not None
            answers.append((owner, ans))
        if not answers:
            return None
        denied = [a for _, a in answers if not a["granted"]]
        if not denied:
            return answers[0][1]
        for owner, a in answers:
            if a["granted"]:
                self._spawn(functools.partial(self._tracker_call, owner, "claim", digest=digest, release=True))
        return max(denied, key=lambda a: a["complete"])  # a complete holder is the better news

    async def _release_claim(self, digest: str) -> None:
        """Release our claim on `digest` at every owner at once, waiting at most CLAIM_RELEASE_WAIT for each (a
        silent owner lets it expire instead). Not at an owner we reach after a new fill of ours for `digest`
        began: the claim it asks for or holds is the same entry at the tracker."""

        async def at(owner: str) -> None:
            with trio.move_on_after(CLAIM_RELEASE_WAIT):
                if owner != self.node_id:
                    await self.connect_node(owner)
                if digest not in self._fills:
                    await self._tracker_call(owner, "claim", digest=digest, release=True)

        async def logged(owner: str) -> None:
            try:
                await at(owner)
            except PeerGone as e:
                log.info("release of %s at %s failed: %s", digest[:19], owner, e)

        owners = await self._owner_conns(digest)
        async with trio.open_nursery() as nursery:
            for owner in owners:
                nursery.start_soon(logged, owner)

    # -- metainfo ---------------------------------------------------------------------------------------------
    def _metainfo_answer(self, digest: str) -> tuple[int, int, list[bytes | None]] | None:
        """Piece hashes we can vouch for: the tracker's (published by the claim holder), the download we fetch
        from upstream under the claim, or a complete blob's (computed once, with its whole digest checked)."""
        m = self.tracker.metainfo(digest)
        if m is not None:
            return m.size, m.piece_size, list(m.hashes)
        if digest in self._claims:
            d = self.fetcher.downloads().get(digest)
            if d is not None and d.size is not None and d.piece_size is not None:
                return d.size, d.piece_size, d.piece_hashes()
        return self._cached_meta(digest)

    def _cached_meta(self, digest: str) -> tuple[int, int, list[bytes | None]] | None:
        cached = self._meta_cache.get(digest)
        return None if cached is None else (cached[0], cached[1], list(cached[2]))

    @staticmethod
    def _metainfo_fields(rid: int, digest: str, ans: tuple[int, int, list[bytes | None]] | None) -> dict[str, Any]:
        if ans is None:
            return {"id": rid, "digest": digest, "size": None, "piece_size": None, "hashes": []}
        return {"id": rid, "digest": digest, "size": ans[0], "piece_size": ans[1], "hashes": ans[2]}

    async def _answer_metainfo_later(self, conn: PeerConnection, rid: int, digest: str) -> None:
        ans = await self._hash_complete_blob(digest)
        try:
            conn.send("metainfo", **self._metainfo_fields(rid, digest, ans))
        except PeerGone:
            pass

    async def _hash_complete_blob(self, digest: str) -> tuple[int, int, list[bytes | None]] | None:
        """Piece hashes of a stored blob, computed in a thread. The whole digest is checked on the way: a blob
        that rotted on disk is deleted and never vouched for. One pass per digest at a time (others wait for
        it and take its answer), at most HASHERS passes at once."""
        running = self._hashing.get(digest)
        if running is not None:
            await running.wait()
            return self._cached_meta(digest)
        done = self._hashing[digest] = trio.Event()
        try:
            async with self._hashers:
                return await self._hash_stored(digest)
        finally:
            del self._hashing[digest]
            done.set()

    async def _hash_stored(self, digest: str) -> tuple[int, int, list[bytes | None]] | None:
        f = self.store.open(digest)
        if f is None:
            return None
        st = os.fstat(f.fileno())
        size, inode = st.st_size, st.st_ino
        piece_size = self._piece_size_of(digest, size)

        def work() -> tuple[list[bytes], str]:
            # One pass: the chain's links are the piece hashes, its end the whole digest (swarm/chain.py).
            chain = ChainHasher()
            out = []
            n = piece_count(size, piece_size)
            with f:
                for i in range(n):
                    start, length = piece_span(i, size, piece_size)
                    data = os.pread(f.fileno(), length, start)
                    chain.update(data)
                    out.append(chain.link() if i < n - 1 else hashlib.sha256(data).digest())
            return out, "sha256:" + chain.digest().hex()

        hashes, got = await trio.to_thread.run_sync(work)
        if got != digest:
            log.error("stored blob %s is corrupt (hashes to %s): deleting it", digest, got)
            self.metrics.digest_mismatches.labels(source="store").inc()
            # As the fetcher's check does (fetch.StoreCheck): gone also while a client reads it (store.delete
            # refuses a pinned blob, and the damaged file stayed to be served whole).
            self.store.remove_damaged(digest, inode)
            self._spawn(self._withdraw, digest)
            return None
        self.fetcher.checked(digest, inode)  # this whole-digest pass counts for its clients too: not hashed twice
        self._meta_cache[digest] = (size, piece_size, hashes)
        return size, piece_size, list(hashes)

    # -- tags and manifests -----------------------------------------------------------------------------------
    def _tag_answer(self, msg: Message) -> dict[str, Any]:
        from p2pcache.oci.reference import Repo

        entry = None
        try:
            entry = self.tags.get(Repo(msg["ns"], msg["name"]), msg["tag"], msg["accept"])
        except Exception:  # a malformed name is just "not known here"
            entry = None
        if entry is None:
            return {"id": msg["id"], "digest": None, "media_type": None, "size": None, "checked_at": 0.0}
        return {"id": msg["id"], "digest": entry.digest, "media_type": entry.media_type, "size": entry.size,
                "checked_at": float(entry.checked_at)}

    def _some_peers(self, k: int) -> list[str]:
        others = [m.node for m in self.membership.live() if m.node != self.node_id]
        random.shuffle(others)
        return others[:k]

    async def peer_tag(self, repo: Repo, tag: str, accept_key: str, k: int = 8) -> Any:
        """Ask up to k peers what `repo:tag` resolved to; the newest answer (a TagEntry) or None."""
        from p2pcache.store.manifests import TagEntry

        best: list[TagEntry] = []

        async def ask(node: str) -> None:
            try:
                conn = await self.connect_node(node)
                a = await conn.call("tag-req", ns=repo.ns, name=repo.name, tag=tag, accept=accept_key)
            except PeerGone:
                return
            if a["digest"] is not None and a["media_type"] is not None and a["size"] is not None:
                best.append(TagEntry(a["digest"], a["media_type"], a["size"], a["checked_at"]))

        async with trio.open_nursery() as nursery:
            for node in self._some_peers(k):
                nursery.start_soon(ask, node)
        return max(best, key=lambda e: e.checked_at) if best else None

    async def peer_manifest(self, digest: str, k: int = 8) -> tuple[str, bytes] | None:
        """A manifest by digest from any peer that has it; its bytes are checked against the digest."""
        for node in self._some_peers(k):
            try:
                conn = await self.connect_node(node)
                a = await conn.call("manifest-req", digest=digest)
            except PeerGone:
                continue
            if a["media_type"] is None:
                continue
            body = bytes(a.payload)
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                log.warning("peer %s sent a manifest that does not match %s", node, digest)
                continue
            return a["media_type"], body
        return None

    # =========================================================================================================
    # fill: the BlobSwarm the fetcher calls
    # =========================================================================================================
    async def fill(self, download: Download, repo: Repo) -> None:
        fill = _Fill(self, download, repo)
        self._fills[download.digest] = fill
        try:
            await fill.run()
        except BaseException:
            # The fill announced itself as a holder in progress; renewal_round would renew that for ever (found in
            # review: 1000 failed pulls of unknown digests, 1000 entries renewed at the trackers every round).
            if self._announced.get(download.digest) is False:
                del self._announced[download.digest]
                self._spawn(self._withdraw, download.digest)
            raise
        finally:
            if self._fills.get(download.digest) is fill:
                del self._fills[download.digest]
            self._share_sources()
            # The client's last bytes wait for this return (the fetcher then checks the whole digest), so the
            # tracker bookkeeping runs in the service's nursery: an owner that never answers added up to 5 s to
            # every pull (3 s for the complete announce, 2 s for the claim release; found in review).
            self._spawn(self._after_fill, download, fill)

    def _share_sources(self) -> None:
        """Split the node's sources among the downloads it drives, oldest first (`source_shares`): called
        whenever one gets its scheduler or ends."""
        driven = [(f, f.sched) for f in self._fills.values() if f.sched is not None and not f.done.is_set()]
        if not driven:
            return
        now = trio.current_time()
        shares = source_shares(driven[0][1].cfg.max_sources, len(driven))
        for (f, sched), n in zip(driven, shares, strict=True):
            if sched.max_sources != n:
                f._apply(sched.set_max_sources(n, now))

    async def _after_fill(self, download: Download, fill: _Fill) -> None:
        """After a fill, in the service's nursery (the client's bytes do not wait for it): tell the owners we hold
        the whole blob, then release the claim, in that order so nobody claims a blob the cluster already has.
        Once the fetcher checked the whole digest: if it failed, withdraw, forget the hashes and ban whoever gave
        us the piece list (the fetcher refetches from upstream); if it passed but the commit failed, withdraw."""
        if fill.complete:
            with trio.move_on_after(RPC_META_TIMEOUT):
                await self._announce(download.digest, True, download.n_pieces)
        if fill.release_claim:
            await self._release_claim(download.digest)
        meta_source = fill.meta_source
        if not fill.complete or download.size is None:
            return
        try:
            await download.readable(max(0, download.size - 1))
        except Exception:
            self._meta_cache.pop(download.digest, None)
            if meta_source is not None and meta_source != self.node_id:
                log.error("%s failed its digest: banning %s, whose piece list it was", download.digest, meta_source)
                self.bans.ban(meta_source, trio.current_time() + BAN_SECONDS)
                self.metrics.peer_bans.inc()
                for c in list(self.conns.get(meta_source, ())):
                    c.close()
            await self._withdraw(download.digest)
            return
        # Verified, but the commit can still fail (a full disk): the blob is then nowhere here, and peers sent to
        # us for it were refused until the next renewal round noticed (up to ANNOUNCE_EVERY). So the round's own
        # rule runs for this digest as soon as the download has ended (and left the fetcher's list): it also
        # spares a download of the digest begun meanwhile, whose commit may still land (withdrawing that told the
        # cluster a stored blob was gone, for good: found in review).
        await download.done.wait()
        digest = download.digest
        if digest in self._announced:
            _, gone = renewal_round({digest: self._announced[digest]}, self._holds, set(self._fills),
                                    set(self.fetcher.downloads()))
            if gone:
                log.warning("swarm: %s was verified but not stored: withdrawn", digest[:19])
                await self._withdraw(digest)

    def _holds(self, digest: str) -> bool:
        """Whether the store holds `digest` whole (not an access: no LRU touch)."""
        return self.store.stat(digest, touch=False) is not None

    def have_piece(self, digest: str, index: int) -> None:
        """A piece of `digest` was verified and written here: tell the peers that asked to know."""
        for lst in list(self.conns.values()):
            for c in lst:
                if digest in c.interested and not c.closed:
                    try:
                        c.send("have", digest=digest, index=index)
                    except PeerGone:
                        pass

    def live_nodes(self) -> Iterable[str]:
        return (m.node for m in self.membership.live())


class _Fill:
    """Drives one DownloadScheduler for one download: its decisions become trio tasks, their outcomes events.

    Every scheduler call happens on the event loop without an await between the call and the application of
    its decisions, so the scheduler always sees a consistent world.
    """

    def __init__(self, svc: SwarmService, download: Download, repo: Repo) -> None:
        self.svc = svc
        self.download = download
        self.repo = repo
        self.digest = download.digest
        self.sched: DownloadScheduler | None = None
        self.peers: dict[str, PeerConnection] = {}  # node -> the connection we request pieces on
        self.asked: set[str] = set()  # nodes we sent "interested" to
        self.piece_tasks: dict[tuple[str, int], trio.CancelScope] = {}
        self.hashes: list[bytes | None] = []
        self.meta_source: str | None = None
        self.claim_holder: str | None = None
        self.claimed = False
        self.upstream_stop = False
        self._upstream_gen = 0  # each FetchUpstream starts a new generation; older streams stop
        self._upstream_lock = trio.Lock()
        self._writing: set[int] = set()  # pieces from peers being written (the piece listener skips them)
        self.done = trio.Event()
        self.error: BaseException | None = None
        self._nursery: trio.Nursery | None = None
        self._writes = 0  # verified pieces being written
        self._writes_idle = trio.Event()
        # What peers said before the scheduler existed: per connection, its latest bitfield with the "have"s
        # since ORed in (_keep_early)
        self._early: dict[PeerConnection, bytearray] = {}
        self.complete = False  # every piece verified (run returned): to announce
        self.release_claim = False  # the claim was ours when run ended: to release
        self._tick_scope: trio.CancelScope | None = None  # the tick loop's sleep (_apply moves its deadline)

    # -- entry ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        svc, d = self.svc, self.download
        d.add_piece_listener(self._on_piece)
        t0 = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._task, self._holders_loop)
                try:
                    await self._drive(nursery, t0)
                except Exception as e:  # raised below, outside the nursery, as itself (not in a group)
                    self._finish(e)
                nursery.cancel_scope.cancel()
            sc = self.sched
            log.info("%s: pieces %s after %.2fs: %d bytes from peers, %d from upstream, %d rejected",
                     self.digest[:19], "done" if self.error is None else "failed", trio.current_time() - t0,
                     sc.bytes_from_peers if sc else 0, sc.bytes_from_upstream if sc else 0,
                     sc.pieces_rejected if sc else 0)
            if self.error is None:
                # Every piece verified: remember the layout and hashes (to serve and vouch for them). The owners
                # hear of it after we return (SwarmService._after_fill), before the claim is released.
                assert d.size is not None and d.piece_size is not None
                svc._meta_cache[self.digest] = (d.size, d.piece_size, list(self.hashes))
                svc._announced[self.digest] = True
                self.complete = True
        finally:
            self._nursery = None
            if self.claimed:
                self.claimed = False
                self.release_claim = True
                svc._claims.discard(self.digest)
                svc.metrics.claims_held.dec()
        if self.error is not None:
            raise self.error

    async def _drive(self, nursery: trio.Nursery, t0: float) -> None:
        svc, d = self.svc, self.download
        size, piece_size, hashes = await self._learn_layout()
        log.info("%s: layout known after %.2fs (claim %s, %d hashes)", self.digest[:19],
                 trio.current_time() - t0, self.claimed, _known(hashes))
        await d.start(size, piece_size)
        assert d.size is not None and d.piece_size is not None and d.partial is not None
        self.hashes = list(hashes) + [None] * (d.n_pieces - len(hashes))
        d.link_hints = self.hashes  # updated in place as hashes are learnt
        have_mask = mask_of(d.partial.bitfield(), d.n_pieces)
        known = [i for i in range(d.n_pieces) if checkable(self.hashes, i)]
        now = trio.current_time()
        self.sched = DownloadScheduler(d.size, d.piece_size, rng=random.Random(), zone=svc.zone,
                                       have=have_mask, known=known, bans=svc.bans, now=now)
        if self.meta_source is not None:
            self.sched.meta_source = self.meta_source
        if self.claimed:
            nursery.start_soon(self._task, self._publish, 0, [])  # the layout at once: leechers can start
        self._apply(self.sched.start(now))
        svc._share_sources()
        early, self._early = self._early, {}
        for conn, bits in early.items():
            self.peer_message(conn, Message("bitfield", {"digest": self.digest, "bits": bytes(bits)}))
        nursery.start_soon(self._task, self._tick_loop)
        nursery.start_soon(self._task, self._metainfo_loop)
        await self.done.wait()

    def _finish(self, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    async def _learn_layout(self) -> tuple[int, int | None, list[bytes | None]]:
        """The blob's size and piece size: from the metainfo the cluster has, else (granted the claim) from an
        upstream HEAD. Without either, wait: the claim holder publishes the layout as soon as it starts."""
        from p2pcache.fetch import FetchFailed

        svc = self.svc
        deadline = trio.current_time() + 3 * CLAIM_TTL + 10
        waited = 0.0
        while True:
            meta = await self._fetch_metainfo()
            if meta is not None:
                return meta
            # Let a node with no claim yet ask first (scheduler.claim_wait); counted again after each wait.
            wait = claim_wait(svc.claims_elsewhere(self.digest), waited, CLAIM_CONFIG)
            if wait > 0:
                waited += wait
                await trio.sleep(wait)
                continue
            svc._claiming.add(self.digest)
            try:
                ans = await svc._claim(self.digest)
            finally:
                svc._claiming.discard(self.digest)
            if ans is None or ans["granted"]:
                # Granted (or no owner reachable at all: then we are on our own).
                self._claim_taken()
                size = await svc.upstream.head_blob(self.repo, self.digest)
                return size, None, []
            self.claim_holder = ans["holder"]
            if ans["complete"] and ans["addr"]:
                meta = await self._metainfo_from(ans["holder"], ans["addr"])
                if meta is not None:
                    return meta
            if trio.current_time() > deadline:
                raise FetchFailed(f"{self.digest}: neither the swarm nor the claim gave this blob's layout")
            await trio.sleep(METAINFO_POLL)

    def _claim_taken(self) -> None:
        if not self.claimed:
            self.claimed = True
            self.svc._claims.add(self.digest)
            self.svc.metrics.claims_held.inc()

    # -- metainfo ---------------------------------------------------------------------------------------------
    def _accept_meta(self, fields: dict[str, Any], source: str) -> tuple[int, int, list[bytes | None]] | None:
        if fields.get("digest") != self.digest:
            # (PeerConnection.call already refuses an answer about another digest; this is the last line)
            log.warning("%s: metainfo from %s is about %s; ignored", self.digest[:19], source,
                        str(fields.get("digest"))[:19])
            return None
        size, piece_size, hashes = fields["size"], fields["piece_size"], fields["hashes"]
        if not valid_layout(size, piece_size) or len(hashes) != piece_count(size, piece_size):
            return None
        d = self.download
        if d.size is not None and (size, piece_size) != (d.size, d.piece_size):
            log.warning("%s: metainfo from %s disagrees with the layout in use; ignored", self.digest[:19], source)
            return None
        if self.meta_source is None and any(h is not None for h in hashes):
            self.meta_source = source
        return size, piece_size, hashes

    async def _metainfo_from(self, node: str, addr: str | None = None) -> tuple[int, int, list[bytes | None]] | None:
        svc = self.svc
        try:
            if node == svc.node_id:
                ans = svc._metainfo_answer(self.digest)
                if ans is None:
                    return None
                fields = svc._metainfo_fields(0, self.digest, ans)
            else:
                if svc.membership.get(node) is None and addr:
                    conn = await svc.connect_addr(addr)
                else:
                    conn = await svc.connect_node(node)
                fields = (await conn.call("metainfo-req", digest=self.digest, timeout=RPC_META_TIMEOUT)).fields
        except PeerGone:
            return None
        return self._accept_meta(fields, node)

    async def _fetch_metainfo(self) -> tuple[int, int, list[bytes | None]] | None:
        """Owners first (they hold what the claim holder published), then the claim holder itself."""
        best = None
        for node in [*self.svc._owners(self.digest), self.claim_holder]:
            if node is None:
                continue
            meta = await self._metainfo_from(node)
            if meta is not None and (best is None or _known(meta[2]) > _known(best[2])):
                best = meta
            if best is not None and _known(best[2]) == len(best[2]):
                break
        return best

    async def _metainfo_loop(self) -> None:
        while any(h is None for h in self.hashes):
            await trio.sleep(METAINFO_POLL)
            if self.claimed and self.sched is not None and self.sched.upstream is not None:
                continue  # we are the publisher
            meta = await self._fetch_metainfo()
            if meta is None or self.sched is None:
                continue
            new = False
            for i, h in enumerate(meta[2]):
                if h is None:
                    continue
                if self.hashes[i] is None:
                    self.hashes[i] = h
                    new = True
                elif self.hashes[i] != h:
                    log.warning("%s: piece %d hash changed between metainfo answers; keeping the first",
                                self.digest[:19], i)
            if new:
                self._apply(self.sched.metainfo_known(self.hashes, trio.current_time()))

    # -- peers ------------------------------------------------------------------------------------------------
    async def _holders_loop(self) -> None:
        """Announce ourselves (with our progress) and connect to the holders the owners name, now and then."""
        svc = self.svc
        while True:
            d = self.download
            pieces = d.partial.held() if d.partial is not None else 0
            svc._announced[self.digest] = False
            holders, claim = await svc._announce(self.digest, False, pieces)
            if claim is not None and claim != svc.node_id:
                self.claim_holder = claim
            for h in holders:
                m = svc.membership.get(h.node)
                if m is not None and not svc.membership.is_live(h.node):
                    continue  # known to be down: its soft state at the tracker has not expired yet
                if h.node not in self.asked and not svc.bans.banned(h.node, trio.current_time()):
                    self._nursery_spawn(self._connect_holder, h)
            await trio.sleep(HOLDERS_REFRESH)

    def _nursery_spawn(self, fn: Any, *args: Any) -> None:
        """A task of this download: if it fails unexpectedly, the download fails (not the node)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._task, fn, *args)

    async def _task(self, fn: Any, *args: Any) -> None:
        try:
            await fn(*args)
        except Exception as e:
            log.exception("%s: swarm task %s failed", self.digest[:19], getattr(fn, "__name__", fn))
            self._finish(e)

    async def _connect_holder(self, h: HolderInfo) -> None:
        svc = self.svc
        self.asked.add(h.node)
        try:
            if svc.membership.get(h.node) is None:
                conn = await svc.connect_addr(h.addr)
            else:
                conn = await svc.connect_node(h.node)
        except PeerGone as e:
            self.asked.discard(h.node)
            log.info("%s: holder %s unreachable: %s", self.digest[:19], h.node, e)
            return
        self.consider(conn)

    def consider(self, conn: PeerConnection) -> None:
        """Ask `conn`'s peer for its bitfield of our digest (once per connection)."""
        node = conn.peer.node
        if node in self.peers and not self.peers[node].closed:
            return
        self.asked.add(node)
        self.peers[node] = conn
        try:
            conn.send("interested", digest=self.digest)
        except PeerGone:
            self.peers.pop(node, None)

    def peer_message(self, conn: PeerConnection, msg: Message) -> None:
        if conn.closed:
            # A bitfield kept from before the scheduler existed, whose connection closed meanwhile (peer_closed
            # ran then, with nothing to tell): replayed, its dead peer stayed a source of every piece, so the
            # claim was never asked again and the download waited for the stall timeout (found in review).
            return
        node = conn.peer.node
        if self.sched is None:
            self._keep_early(conn, msg)
            return
        now = trio.current_time()
        if msg.kind == "bitfield":
            if node not in self.peers or self.peers[node].closed:
                self.peers[node] = conn
            self._apply(self.sched.peer_added(node, conn.peer.zone, msg["bits"], now))
        elif msg.kind == "have" and node in self.sched.peers:
            if 0 <= msg["index"] < self.sched.n:
                self._apply(self.sched.peer_has(node, msg["index"], now))

    def _keep_early(self, conn: PeerConnection, msg: Message) -> None:
        """Before the scheduler exists (the layout is not known yet), keep what `conn` says of its pieces: its
        latest bitfield, with the "have"s since ORed in. A newer bitfield replaces it (it is all the peer's
        news); a "have" before any bitfield is dropped (the scheduler takes a peer's "have"s only after its
        bitfield: replayed, it was dropped there); bits past the longest layout (MAX_META_PIECES) are no piece.
        So a connection costs at most 2 KiB here however much it sends: every early bitfield was kept, and a
        member that sent 256 KiB ones as fast as it could took the node from 39 MiB to 1.5 GB (found in
        review)."""
        if msg.kind == "bitfield":
            self._early[conn] = bytearray(msg["bits"][:EARLY_BITS_MAX])
            return
        bits = self._early.get(conn)
        i = msg["index"]
        if bits is not None and i < 8 * EARLY_BITS_MAX:
            if len(bits) <= i >> 3:  # (a peer with nothing yet answers with an empty bitfield)
                bits.extend(bytes((i >> 3) + 1 - len(bits)))
            bits[i >> 3] |= 0x80 >> (i & 7)

    def peer_closed(self, conn: PeerConnection) -> None:
        node = conn.peer.node
        self._early.pop(conn, None)
        if self.peers.get(node) is not conn:
            return
        del self.peers[node]
        self.asked.discard(node)
        if self.sched is not None:
            self._apply(self.sched.peer_gone(node, trio.current_time()))
        other = self.svc._open_conn(node)
        if other is not None and not self.done.is_set():
            self.consider(other)

    # -- decisions --------------------------------------------------------------------------------------------
    def _apply(self, decisions: list[Decision]) -> None:
        if _TRACE and decisions:
            log.info("%s: decisions %s", self.digest[:19], decisions)
        for dec in decisions:
            if isinstance(dec, Request):
                self._nursery_spawn(self._get_piece, dec.peer, dec.index)
            elif isinstance(dec, Cancel):
                scope = self.piece_tasks.get((dec.peer, dec.index))
                if scope is not None:
                    scope.cancel()
            elif isinstance(dec, Ban):
                self.svc.metrics.peer_bans.inc()
                log.warning("%s: banning peer %s: %s", self.digest[:19], dec.peer, dec.reason)
                for c in list(self.svc.conns.get(dec.peer, ())):
                    c.close()
            elif isinstance(dec, AskClaim):
                self._nursery_spawn(self._ask_claim)
            elif isinstance(dec, FetchUpstream):
                # a new stream from dec.start_piece (the scheduler's `upstream`): an older one stops at its
                # next chunk and hands over the download (_upstream_lock)
                self.upstream_stop = False
                self._upstream_gen += 1
                self._nursery_spawn(self._upstream, self._upstream_gen)
            elif isinstance(dec, StopUpstream):
                self.upstream_stop = True
            elif isinstance(dec, Done):
                self._done_pieces()
            elif isinstance(dec, Fail):
                from p2pcache.fetch import FetchFailed

                self._finish(FetchFailed(f"{self.digest}: {dec.reason}"))
        # Every scheduler call ends here, decisions or not: one can move the next deadline earlier with nothing
        # to send (the last piece in flight arrived while the peer with more said "busy": its back-off ends
        # the wait). The tick loop then wakes at that deadline, not at its own (up to TICK_MAX later).
        scope = self._tick_scope
        if scope is not None:
            at = self._tick_at()
            if at < scope.deadline:
                scope.deadline = at

    def _done_pieces(self) -> None:
        if self._writes == 0:
            self._finish()
        else:
            self._nursery_spawn(self._finish_after_writes)

    async def _finish_after_writes(self) -> None:
        while self._writes:
            await self._writes_idle.wait()
        self._finish()

    def _tick_at(self) -> float:
        """When the tick loop wakes next: the scheduler's next deadline, at least TICK_MIN from now (a deadline
        already past must not spin the loop) and at most TICK_MAX (a safety net: _apply moves it earlier)."""
        assert self.sched is not None
        nxt = self.sched.next_deadline()
        now = trio.current_time()
        return now + TICK_MAX if nxt is None else max(now + TICK_MIN, min(now + TICK_MAX, nxt))

    async def _tick_loop(self) -> None:
        while True:
            assert self.sched is not None
            with trio.CancelScope(deadline=self._tick_at()) as scope:
                self._tick_scope = scope
                await trio.sleep_forever()
            self._tick_scope = None
            self._apply(self.sched.tick(trio.current_time()))

    async def _ask_claim(self) -> None:
        svc = self.svc
        ans = await svc._claim(self.digest)
        assert self.sched is not None
        now = trio.current_time()
        refused_by_liar = (ans is not None and not ans["granted"] and ans["complete"]
                           and ans["holder"] is not None and svc.bans.banned(ans["holder"], now))
        if ans is None or ans["granted"] or refused_by_liar:
            # No owner answers (we are on our own), or the tracker points us at the one complete holder, which
            # we banned for sending bad pieces: upstream is the only honest source left.
            if ans is not None and ans["granted"]:
                self._claim_taken()
            self._apply(self.sched.claim_granted(now))
        else:
            if self.claimed:
                self.claimed = False
                svc._claims.discard(self.digest)
                svc.metrics.claims_held.dec()
            self.claim_holder = ans["holder"]
            self._apply(self.sched.claim_denied(ans["holder"], now))

    async def _get_piece(self, node: str, index: int) -> None:
        """One request: the piece from `node`, hashed against the metainfo, written, reported."""
        sched = self.sched
        assert sched is not None
        conn = self.peers.get(node)
        key = (node, index)
        data: bytes | bytearray | None = None
        not_held = False
        with trio.CancelScope() as scope:
            self.piece_tasks[key] = scope
            try:
                if conn is None or conn.closed:
                    raise PeerGone("no connection")
                data = (await conn.request_piece(self.digest, index)).payload
            except (PeerGone, PieceRejected) as e:
                log.debug("%s: piece %d from %s: %s", self.digest[:19], index, node, e)
                data = None
                not_held = isinstance(e, PieceRejected) and e.reason == "not held"
            finally:
                if self.piece_tasks.get(key) is scope:
                    del self.piece_tasks[key]
        if scope.cancelled_caught:
            return  # the scheduler cancelled it: it has already forgotten the request
        now = trio.current_time()
        if data is None:
            if conn is not None and conn.closed:
                return  # peer_closed reports it as peer_gone
            if not_held:
                self._apply(sched.piece_not_held(node, index, now))
            else:
                self._apply(sched.piece_refused(node, index, now))
            return
        want = self.hashes[index] if index < len(self.hashes) else None
        link_from = prev_link(self.hashes, index) if index < sched.n - 1 else None
        ok = False
        if index < len(self.hashes) and checkable(self.hashes, index) and len(data) == sched.piece_len(index):
            # Checked in a worker thread (NO_LOOP_HASHING) while the loop receives the next: its link in the
            # blob's SHA-256 chain, from the link before it (swarm/chain.py).
            offset = index * self.download.piece_size  # type: ignore[operator]
            got = await trio.to_thread.run_sync(piece_hash, index, sched.n, link_from, data, offset)
            ok = got == want
        if not ok:
            self.svc.metrics.pieces_rejected.inc()
            log.warning("%s: piece %d from %s failed its hash check", self.digest[:19], index, node)
            self._apply(sched.piece_received(node, index, False, len(data), trio.current_time()))
            return
        assert want is not None
        self.svc.metrics.pieces_verified.inc()
        # Verified: tell the scheduler now, so the next request goes out while this piece is written (the write
        # is in a worker thread). "Done" waits for the writes in flight (see _done_pieces).
        self._writes += 1
        self._writing.add(index)
        try:
            self._apply(sched.piece_received(node, index, True, len(data), trio.current_time()))
            if not self.download.have(index):
                await self.download.write_piece(index, data, want, link_from)
        except Exception as e:
            self._finish(e)
        finally:
            self._writing.discard(index)
            self._writes -= 1
            if self._writes == 0:
                self._writes_idle.set()
                self._writes_idle = trio.Event()

    async def _upstream(self, gen: int) -> None:
        """Fetch the pieces the scheduler wants from upstream, from `sched.upstream` on, until it says stop.

        The bytes come through `Download.fetch_from_upstream`, the reader a node without the swarm uses (hashing
        and writing in worker threads, whole-blob hash as it goes, resumes with Range); each piece it marks
        reaches `_on_piece` through the download's piece listener, which publishes the hash and reports it to the
        scheduler. The Range ends where the run of pieces that no peer has ends (for the first claim holder of a
        cold blob: the blob's end), so a takeover holder pulls only what the swarm lacks; if the scheduler still
        wants the piece after that run when it ends, the loop asks again from there.
        """
        d, sched = self.download, self.sched
        assert sched is not None and d.size is not None and d.piece_size is not None
        size, ps = d.size, d.piece_size

        def stopped() -> bool:
            return self.upstream_stop or self.done.is_set() or gen != self._upstream_gen or sched.upstream is None

        try:
            async with self._upstream_lock:  # one stream at a time: the download's piece hasher is shared
                while not stopped():
                    first = sched.upstream
                    assert first is not None
                    end = self._upstream_run_end(first)
                    try:
                        await d.fetch_from_upstream(self._paced_upstream(), self.repo, start=first * ps,
                                                    end=min(size, end * ps), stop=stopped)
                    except Exception as e:
                        log.warning("%s: upstream stream failed from piece %d: %s", self.digest[:19], first, e)
                        if gen == self._upstream_gen and not self.done.is_set():
                            self._apply(sched.upstream_failed(str(e), trio.current_time()))
                        return
                    if not stopped() and sched.upstream == first:
                        # the stream ended without the piece the scheduler waits for: never loop on it
                        self._apply(sched.upstream_failed(f"no progress at piece {first}", trio.current_time()))
                        return
        finally:
            self.svc.uploads.stream_ended(self.digest)  # any piece may go twice again

    def _upstream_run_end(self, first: int) -> int:
        """The first piece after `first` the upstream stream should not fetch: one we hold, or (unless the
        scheduler takes any piece from upstream) one a peer has."""
        sched = self.sched
        assert sched is not None
        p = sched.picker
        any_piece = sched.upstream_reason == "stall"
        j = first + 1
        while j < sched.n and not p.have(j) and (any_piece or p.avail[j] == 0):
            j += 1
        return j

    def _paced_upstream(self) -> Any:
        return paced(self.svc.upstream, self.svc.down_share)

    def _on_piece(self, index: int, sha256: bytes) -> None:
        """Download piece listener: a piece was marked (written and hashed). Peers that asked hear of it; a piece
        the upstream stream marked (not one `_get_piece` wrote) is published and reported to the scheduler."""
        self.svc.have_piece(self.digest, index)
        sched = self.sched
        if sched is None or self.done.is_set():
            return
        if index in self._writing and sched.upstream != index:
            return  # from a peer: _get_piece already reported it
        self.svc.uploads.fresh(self.digest, index)  # sent once before any piece is sent twice (UploadSlots)
        if 0 <= index < len(self.hashes):
            if self.hashes[index] is not None and self.hashes[index] != sha256:
                # the published hash (from an earlier claim holder) is wrong, or upstream changed
                log.error("%s: upstream piece %d differs from the published hash", self.digest[:19], index)
            self.hashes[index] = sha256
        if self.claimed:
            self.svc._spawn(self._publish, index, [sha256])
        self._apply(sched.upstream_progress(index, sched.piece_len(index), trio.current_time()))

    async def _publish(self, index: int, hashes: list[bytes]) -> None:
        svc, d = self.svc, self.download
        assert d.size is not None and d.piece_size is not None
        for owner in svc._owners(self.digest):
            try:
                await svc._tracker_call(owner, "publish", digest=self.digest, size=d.size,
                                        piece_size=d.piece_size, first=index, hashes=hashes)
            except PeerGone:
                pass


RPC_META_TIMEOUT = 3.0
CLAIM_RELEASE_WAIT = 2.0  # for each owner's answer to a release; a claim not released expires (CLAIM_TTL)
EARLY_BITS_MAX = MAX_META_PIECES // 8  # bytes of the longest bitfield a layout has (metainfo.valid_layout)
CLAIM_CONFIG = SchedulerConfig()  # the downloads' scheduler settings (claim_stagger) before a scheduler exists
TICK_MAX = 0.5  # a safety net: _apply moves the tick loop's wake-up to each new earlier deadline
TICK_MIN = 0.01  # under the scheduler's shortest busy back-off (20 ms), so its wake-up is not late
BAN_SECONDS = 600.0  # like the scheduler's: a liar stays out for ten minutes


HOLDERS_REFRESH = 3.0  # re-announce progress and pick up new holders this often while downloading


async def _logged(fn: Any, *args: Any) -> None:
    try:
        await fn(*args)
    except Exception:
        log.exception("swarm: background task %s failed", getattr(fn, "__name__", fn))


def idle_connections(conns: Iterable[PeerConnection], in_use: Container[int], now: float,
                     idle: float) -> list[PeerConnection]:
    """The connections to close as idle: open, not used by a download of ours (`in_use`: their ids), nothing
    outstanding either way, and no frame sent or received for `idle` seconds."""
    return [c for c in conns
            if not c.closed and id(c) not in in_use and not c.busy() and now - c.last_active >= idle]


def renewal_round(announced: dict[str, bool], stored: Callable[[str], bool], filling: Container[str],
                  downloading: Container[str]) -> tuple[list[tuple[str, bool]], list[str]]:
    """One announce round: the (digest, complete) entries to renew at the trackers, and the digests to withdraw.

    A complete blob the store no longer holds was evicted or deleted: withdrawn. But not while its download is
    still in flight: between the end of the swarm's fill (which announced it complete) and the store's commit
    (an fsync of the whole blob) the store does not show it yet, and withdrawing then told the cluster it was
    gone, for good (nothing re-announces it): the next node to pull it got the claim and fetched it from
    upstream again although this node held it (seen in bench/swarm_bench.py). A digest being filled is left
    out: its fill announces its progress itself."""
    renew: list[tuple[str, bool]] = []
    gone: list[str] = []
    for digest, complete in list(announced.items()):
        if complete and digest not in downloading and not stored(digest):
            gone.append(digest)
        elif digest not in filling:
            renew.append((digest, complete))
    return renew, gone


def _known(hashes: list[bytes | None]) -> int:
    return sum(h is not None for h in hashes)


def _source_ip(sock: trio.socket.SocketType) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return ""
