"""Prometheus metrics of one node: the names here are the interface dashboards script against.

One module so every metric is declared once; each node process has its own registry (tests may run several
nodes' logic in one process, so nothing registers on the global default registry).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """All metrics of one node, on a private registry served at /metrics."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "p2pcache_requests", "Registry API requests by route and status", ["route", "method", "status"],
            registry=r,
        )
        self.cache_hits = Counter("p2pcache_cache_hits", "Blobs and manifests served from the store", ["kind"],
                                  registry=r)
        self.cache_misses = Counter("p2pcache_cache_misses", "Blobs and manifests not in the store", ["kind"],
                                    registry=r)
        self.upstream_bytes = Counter("p2pcache_upstream_bytes", "Bytes received from upstream registries",
                                      registry=r)
        self.upstream_requests = Counter("p2pcache_upstream_requests", "Requests sent upstream",
                                         ["method", "kind", "status"], registry=r)
        self.served_bytes = Counter("p2pcache_served_bytes", "Blob and manifest bytes sent to clients",
                                    registry=r)
        self.downloads_in_flight = Gauge("p2pcache_downloads_in_flight", "Blob downloads in progress",
                                         registry=r)
        self.stale_tag_serves = Counter("p2pcache_stale_tag_serves",
                                        "Tags answered from cache because the upstream was unreachable",
                                        registry=r)
        self.digest_mismatches = Counter("p2pcache_digest_mismatches",
                                         "Blobs discarded because their bytes did not match the digest",
                                         ["source"], registry=r)
        self.store_bytes = Gauge("p2pcache_store_bytes", "Bytes of complete blobs in the store", registry=r)
        self.evictions = Counter("p2pcache_evictions", "Blobs evicted by the disk quota", registry=r)
        # swarm (issue 3)
        self.peer_bytes = Counter("p2pcache_peer_bytes", "Piece bytes by direction", ["direction"], registry=r)
        self.pieces_verified = Counter("p2pcache_pieces_verified", "Pieces whose SHA-256 matched", registry=r)
        self.pieces_rejected = Counter("p2pcache_pieces_rejected", "Pieces whose SHA-256 failed", registry=r)
        self.peer_bans = Counter("p2pcache_peer_bans", "Peers banned for bad pieces or protocol errors",
                                 registry=r)
        self.peers_connected = Gauge("p2pcache_peers_connected", "Open peer connections", registry=r)
        self.claims_held = Gauge("p2pcache_claims_held", "Upstream fetch claims this node holds", registry=r)
        self.tracked_digests = Gauge("p2pcache_tracked_digests",
                                     "Digests whose holders and claim this node tracks (its tracker shard)", registry=r)
        self.request_seconds = Histogram("p2pcache_request_seconds", "Registry API request time", ["route"],
                                         registry=r)
