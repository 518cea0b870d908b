"""p2pcache: a peer-to-peer pull-through cache for container-image layers."""

__version__ = "0.1.0"
