"""Scenario files for the simulator: TOML in, a validated `Scenario` out.

Never runs anything. A bad value raises `ScenarioError` whose message names the key (`cluster.upload: ...`), so
the CLI prints one line and exits 2. Unknown keys are errors too: a typo must not silently fall back to a default.

The keys (all optional unless marked; sizes take MB/MiB/GB/GiB, rates MB/s/MiB/s/Mbit/s/Gbit/s, times ms/s):

    seed = 7
    [cluster]
    nodes = 500                    # required
    upload = "1 Gbit/s"            # per node (required)
    download = "1 Gbit/s"          # per node (required)
    latency = "1 ms"               # one way, per message, between nodes of a zone
    zones = ["a", "b"]             # or a number; nodes are spread round-robin
    inter_zone_latency = "5 ms"    # one way, between zones
    inter_zone_bandwidth = "10 Gbit/s"  # one shared link between each pair of zones (default: not a bottleneck)
    [[cluster.group]]              # heterogeneous nodes: these replace the first `nodes` of the cluster
    nodes = 50
    upload = "100 Mbit/s"
    download = "1 Gbit/s"
    [upstream]
    bandwidth = "1 Gbit/s"         # required: the registry's egress toward the cluster
    latency = "20 ms"              # one way
    requests_per_second = 10       # optional request-rate limit (token bucket), like Docker Hub
    burst = 10
    [[image]]                      # at least one
    name = "app:1"
    layers = ["400 MB", "100 MB", {name = "base-os", size = "80 MB"}]   # named layers are shared by name
    [rollout]
    start = "all"                  # all | waves | poisson
    waves = 5                      # waves: how many equal groups ...
    interval = "30 s"              # ... this far apart
    rate = 20                      # poisson: arrivals per second
    jitter = "0 s"                 # all/waves: each node starts uniformly within this after its wave
    images = "all"                 # all: every node pulls every image; one: each zone's nodes take turns
    concurrent_layers = 3          # layers a node pulls at once (Docker's default)
    layer_jitter = "0 s"           # each layer's first request comes uniformly within this after it is due
    [churn]
    kill = 0.05                    # fraction of nodes killed ...
    between = ["0 s", "10 s"]      # ... at uniform times in this window after each one's arrival
    restart_after = "20 s"         # optional: killed nodes come back (resuming their partial pieces)
    kill_claim_holder = "2 s"      # optional: kill the node granted the first layer's claim at this time
                                   # (or when it is granted, if later)
    [p2p]
    enabled = true
    piece_size = "auto"            # or a size
    pipeline = 2                   # SchedulerConfig fields; see swarm/scheduler.py
    max_sources = 8
    upload_slots = 4               # concurrent piece uploads per node (UploadSlots)
    upload_queue = 0               # requests a node queues beyond those; more are refused ("busy")
    peers = 20                     # holders asked of the tracker per download (others connect to us too)
    claim_ttl = "12 s"             # a dead claim holder is replaced after at most this (swarm/service.py uses 12 s)
    [sim]
    max_time = "24 h"              # stop there; unfinished pulls are reported as such
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2pcache.swarm.chain import BLOCK
from p2pcache.swarm.metainfo import MAX_META_PIECES, MAX_PIECE, piece_count, piece_size_for
from p2pcache.swarm.scheduler import SchedulerConfig
from p2pcache.units import format_size, parse_duration, parse_rate, parse_size

__all__ = ["ScenarioError", "Scenario", "Group", "Layer", "Image", "load_scenario", "parse_scenario", "apply_override"]


class ScenarioError(ValueError):
    """A scenario value we cannot use; the message starts with the key."""


@dataclass
class Group:
    nodes: int
    upload: float
    download: float


@dataclass
class Layer:
    name: str
    size: int


@dataclass
class Image:
    name: str
    layers: list[Layer]


@dataclass
class Scenario:
    seed: int = 0
    nodes: int = 1
    upload: float = 125e6
    download: float = 125e6
    latency: float = 0.001
    zones: list[str] = field(default_factory=lambda: ["default"])
    inter_zone_latency: float | None = None
    inter_zone_bandwidth: float | None = None
    groups: list[Group] = field(default_factory=list)
    upstream_bandwidth: float = 125e6
    upstream_latency: float = 0.02
    upstream_rps: float | None = None
    upstream_burst: float | None = None
    images: list[Image] = field(default_factory=list)
    start: str = "all"
    waves: int = 1
    interval: float = 30.0
    rate: float = 10.0
    jitter: float = 0.0
    image_choice: str = "all"
    concurrent_layers: int = 3
    layer_jitter: float = 0.0
    kill: float = 0.0
    kill_between: tuple[float, float] = (0.0, 10.0)
    restart_after: float | None = None
    kill_claim_holder: float | None = None
    p2p: bool = True
    piece_size: int | None = None
    upload_slots: int = 4
    upload_queue: int = 0
    # Holders a download asks the tracker for, once. The node asks for 50 (HOLDERS_LIMIT) and again every 3 s; the
    # simulator stays below that for its speed (HAVEs go to every connection). 20 rather than 10: rollout-500
    # 1.31x -> 1.26x the bound, piece-size 1.23x -> 1.18x, two-zones 1.50x -> 1.54x, for 1.4-2x the CPU.
    peers: int = 20
    claim_ttl: float = 12.0
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    # keys given that this scenario does not use (e.g. rollout.waves with start = "all"): said, not refused,
    # since a sweep over rollout.start keeps one file for every mode
    unused: list[str] = field(default_factory=list)
    max_time: float = 86400.0

    def node_caps(self) -> list[tuple[float, float]]:
        """(upload, download) of every node: the groups first, then the cluster's default."""
        caps: list[tuple[float, float]] = []
        for g in self.groups:
            caps.extend([(g.upload, g.download)] * g.nodes)
        caps = caps[: self.nodes]
        caps.extend([(self.upload, self.download)] * (self.nodes - len(caps)))
        return caps

    def unique_layers(self) -> list[Layer]:
        seen: dict[str, Layer] = {}
        for img in self.images:
            for layer in img.layers:
                seen.setdefault(layer.name, layer)
        return list(seen.values())

    def piece_transfers(self) -> int:
        """Pieces all nodes together receive in a p2p run (each node pulls each piece of its layers once): what
        the simulator's running time is proportional to."""
        def pieces(layers: list[Layer]) -> int:
            return sum(piece_count(la.size, piece_size_for(la.size, self.piece_size)) for la in layers)

        if self.image_choice == "one" and self.images:
            per_image = [pieces(list({la.name: la for la in img.layers}.values())) for img in self.images]
            return sum(per_image[self.image_of(i)] for i in range(self.nodes))
        return self.nodes * pieces(self.unique_layers())

    def zone_of(self, i: int) -> int:
        """Node i's zone: round-robin."""
        return i % len(self.zones)

    def image_of(self, i: int) -> int:
        """Node i's image with `images = "one"`: round-robin over the nodes of each zone, so every zone runs every
        image (i mod M put all of an image's nodes in one zone when M and the zone count shared a factor: found in
        review, 2 zones and images [A, B] against [A, B, B, A], the same workload, 16.9 s against 3.2 min)."""
        return (i // len(self.zones)) % len(self.images)


def _err(key: str, msg: str) -> ScenarioError:
    return ScenarioError(f"{key}: {msg}")


def _table(doc: dict, key: str, allowed: set[str]) -> dict:
    t = doc.get(key, {})
    if not isinstance(t, dict):
        raise _err(key, "must be a table")
    for k in t:
        if k not in allowed:
            raise _err(f"{key}.{k}", "unknown key")
    return t


def _get(t: dict, prefix: str, key: str, conv, default: Any = None, required: bool = False) -> Any:
    if key not in t:
        if required:
            raise _err(f"{prefix}.{key}" if prefix else key, "missing")
        return default
    try:
        v = conv(t[key])
    except (ValueError, TypeError, OverflowError) as e:
        raise _err(f"{prefix}.{key}" if prefix else key, str(e)) from None
    return v


# Bounds on what a scenario may ask for, so an absurd one is an error, not a MemoryError or a clock that no
# longer moves: at 10^18 simulated seconds, adding a millisecond of latency leaves a float where it was.
MAX_NODES = 1_000_000
MAX_SECONDS = 1e9
MAX_LAYER = MAX_META_PIECES * MAX_PIECE  # 256 GiB: the largest layout a node makes (16,384 pieces of 16 MiB)


def _at_most(limit: float, conv, show=None):
    def f(x):
        v = conv(x)
        if v > limit:
            raise ValueError(f"at most {show(limit) if show else f'{limit:g}'}, got {x!r}")
        return v
    return f


def _positive(conv):
    def f(x):
        v = conv(x)
        if not v > 0 or (isinstance(v, float) and math.isinf(v)):
            raise ValueError(f"must be positive, got {x!r}")
        return v
    return f


_layer_size = _at_most(MAX_LAYER, _positive(parse_size), format_size)


def _piece_size(x):
    """A piece size a node would take (config.py refuses the same): at most 16 MiB, on SHA-256's 64-byte blocks."""
    v = _at_most(MAX_PIECE, _positive(parse_size))(x)
    if v % BLOCK:
        raise ValueError(f"{x!r} is not a multiple of {BLOCK} bytes (pieces end on SHA-256 blocks)")
    return v


def _nonneg(conv):
    def f(x):
        v = conv(x)
        if v < 0:
            raise ValueError(f"must not be negative, got {x!r}")
        return v
    return f


def _int(x):
    if isinstance(x, bool) or not isinstance(x, int | str):
        raise ValueError(f"not an integer: {x!r}")
    return int(x)


def _float(x):
    # float(True) is 1.0: a boolean where a number belongs ran as 1 (found in review)
    if isinstance(x, bool) or not isinstance(x, int | float | str):
        raise ValueError(f"not a number: {x!r}")
    return float(x)


def _bool(x):
    if not isinstance(x, bool):
        raise ValueError(f"not true/false: {x!r}")
    return x


def _fraction(x):
    v = _float(x)  # `kill = true` ran as 1.0 and killed every node (found in review)
    if not 0 <= v <= 1:
        raise ValueError(f"must be between 0 and 1, got {x!r}")
    return v


def parse_scenario(doc: dict) -> Scenario:
    top = {"seed", "cluster", "upstream", "image", "rollout", "churn", "p2p", "sim"}
    for k in doc:
        if k not in top:
            raise _err(k, "unknown key")
    s = Scenario()
    s.seed = _get(doc, "", "seed", _int, 0)
    c = _table(doc, "cluster", {"nodes", "upload", "download", "latency", "zones", "inter_zone_latency",
                                "inter_zone_bandwidth", "group"})
    if "cluster" not in doc:
        raise _err("cluster", "missing")
    s.nodes = _get(c, "cluster", "nodes", _at_most(MAX_NODES, _positive(_int)), required=True)
    s.upload = _get(c, "cluster", "upload", _positive(parse_rate), required=True)
    s.download = _get(c, "cluster", "download", _positive(parse_rate), required=True)
    s.latency = _get(c, "cluster", "latency", _nonneg(parse_duration), 0.001)
    zones = c.get("zones", 1)
    if isinstance(zones, int) and not isinstance(zones, bool) and 1 <= zones <= s.nodes:
        s.zones = [f"z{i}" for i in range(zones)] if zones > 1 else ["default"]
    elif isinstance(zones, list) and zones and all(isinstance(z, str) for z in zones) and len(set(zones)) == len(zones):
        s.zones = list(zones)
    else:
        raise _err("cluster.zones", f"a number (1 to the node count) or a list of distinct names, got {zones!r}")
    s.inter_zone_latency = _get(c, "cluster", "inter_zone_latency", _nonneg(parse_duration))
    s.inter_zone_bandwidth = _get(c, "cluster", "inter_zone_bandwidth", _positive(parse_rate))
    groups = c.get("group", [])
    if not isinstance(groups, list):
        raise _err("cluster.group", "use [[cluster.group]] tables")
    for i, g in enumerate(groups):
        key = f"cluster.group[{i}]"
        if not isinstance(g, dict):
            raise _err(key, "must be a table")
        for k in g:
            if k not in {"nodes", "upload", "download"}:
                raise _err(f"{key}.{k}", "unknown key")
        s.groups.append(Group(
            _get(g, key, "nodes", _at_most(MAX_NODES, _positive(_int)), required=True),
            _get(g, key, "upload", _positive(parse_rate), s.upload),
            _get(g, key, "download", _positive(parse_rate), s.download),
        ))
    # found in review: groups adding up to more nodes than the cluster has were cut short without a word
    grouped = sum(g.nodes for g in s.groups)
    if grouped > s.nodes:
        raise _err("cluster.group", f"the groups hold {grouped} nodes, more than cluster.nodes = {s.nodes}")
    if len(s.zones) == 1:
        for k in ("inter_zone_latency", "inter_zone_bandwidth"):
            if k in c:
                raise _err(f"cluster.{k}", "means nothing with one zone (set cluster.zones)")
    u = _table(doc, "upstream", {"bandwidth", "latency", "requests_per_second", "burst"})
    if "upstream" not in doc:
        raise _err("upstream", "missing")
    s.upstream_bandwidth = _get(u, "upstream", "bandwidth", _positive(parse_rate), required=True)
    s.upstream_latency = _get(u, "upstream", "latency", _nonneg(parse_duration), 0.02)
    s.upstream_rps = _get(u, "upstream", "requests_per_second", _positive(_float))
    s.upstream_burst = _get(u, "upstream", "burst", _positive(_float))
    if s.upstream_burst is not None and s.upstream_rps is None:
        raise _err("upstream.burst", "only means something with requests_per_second")
    if s.upstream_burst is not None and s.upstream_burst < 1:
        raise _err("upstream.burst", f"at least 1 request, got {s.upstream_burst}")
    images = doc.get("image")
    if not isinstance(images, list) or not images:
        raise _err("image", "at least one [[image]] with layers is required")
    for i, img in enumerate(images):
        key = f"image[{i}]"
        if not isinstance(img, dict):
            raise _err(key, "must be a table")
        for k in img:
            if k not in {"name", "layers"}:
                raise _err(f"{key}.{k}", "unknown key")
        name = str(img.get("name", f"image{i}"))
        layers_doc = img.get("layers")
        if not isinstance(layers_doc, list) or not layers_doc:
            raise _err(f"{key}.layers", "a non-empty list of sizes")
        layers = []
        for j, ld in enumerate(layers_doc):
            lkey = f"{key}.layers[{j}]"
            if isinstance(ld, dict):
                for k in ld:
                    if k not in {"name", "size"}:
                        raise _err(f"{lkey}.{k}", "unknown key")
                size = _get(ld, lkey, "size", _layer_size, required=True)
                lname = str(ld.get("name", f"{name}#{j}"))
            else:
                try:
                    size = _layer_size(ld)
                except (ValueError, TypeError, OverflowError) as e:
                    raise _err(lkey, str(e)) from None
                lname = f"{name}#{j}"
            layers.append(Layer(lname, size))
        s.images.append(Image(name, layers))
    sizes: dict[str, int] = {}
    for img in s.images:
        for layer in img.layers:
            if sizes.setdefault(layer.name, layer.size) != layer.size:
                raise _err("image", f"layer {layer.name!r} is given two different sizes")
    r = _table(doc, "rollout", {"start", "waves", "interval", "rate", "jitter", "images", "concurrent_layers",
                                "layer_jitter"})
    s.start = _get(r, "rollout", "start", str, "all")
    if s.start not in {"all", "waves", "poisson"}:
        raise _err("rollout.start", f"use all, waves or poisson, got {s.start!r}")
    s.waves = _get(r, "rollout", "waves", _positive(_int), 1)
    s.interval = _get(r, "rollout", "interval", _at_most(MAX_SECONDS, _nonneg(parse_duration)), 30.0)
    s.rate = _get(r, "rollout", "rate", _positive(_float), 10.0)
    if s.rate < 1 / MAX_SECONDS:
        raise _err("rollout.rate", f"at least one arrival in {MAX_SECONDS:g} s, got {s.rate}")
    s.jitter = _get(r, "rollout", "jitter", _at_most(MAX_SECONDS, _nonneg(parse_duration)), 0.0)
    s.layer_jitter = _get(r, "rollout", "layer_jitter", _at_most(MAX_SECONDS, _nonneg(parse_duration)), 0.0)
    ignored = {"all": ("waves", "interval", "rate"), "waves": ("rate",), "poisson": ("waves", "interval", "jitter")}
    s.unused += [f"rollout.{k} (start = {s.start!r} does not use it)" for k in ignored[s.start] if k in r]
    s.image_choice = _get(r, "rollout", "images", str, "all")
    if s.image_choice not in {"all", "one"}:
        raise _err("rollout.images", f"use all or one, got {s.image_choice!r}")
    s.concurrent_layers = _get(r, "rollout", "concurrent_layers", _positive(_int), 3)
    ch = _table(doc, "churn", {"kill", "between", "restart_after", "kill_claim_holder"})
    s.kill = _get(ch, "churn", "kill", _fraction, 0.0)
    if "between" in ch:
        b = ch["between"]
        try:
            if not isinstance(b, list) or len(b) != 2:
                # a string was taken apart: between = "12" meant 1 s to 2 s (found in review)
                raise ValueError(f"a list of two, got {b!r}")
            lo, hi = (parse_duration(x) for x in b)
            if hi < lo:
                raise ValueError("end before start")
        except (ValueError, TypeError) as e:
            raise _err("churn.between", f"two times [start, end]: {e}") from None
        s.kill_between = (lo, hi)
    s.restart_after = _get(ch, "churn", "restart_after", _nonneg(parse_duration))
    s.kill_claim_holder = _get(ch, "churn", "kill_claim_holder", _nonneg(parse_duration))
    sched_fields = {f.name: f.type for f in fields(SchedulerConfig)}
    p = _table(doc, "p2p", {"enabled", "piece_size", "upload_slots", "upload_queue", "peers",
                                  "claim_ttl", *sched_fields})
    s.p2p = _get(p, "p2p", "enabled", _bool, True)
    ps = p.get("piece_size", "auto")
    if ps != "auto":
        s.piece_size = _get(p, "p2p", "piece_size", _piece_size)
    s.upload_slots = _get(p, "p2p", "upload_slots", _positive(_int), 4)
    s.upload_queue = _get(p, "p2p", "upload_queue", _nonneg(_int), 0)
    s.peers = _get(p, "p2p", "peers", _positive(_int), Scenario.peers)
    s.claim_ttl = _get(p, "p2p", "claim_ttl", _positive(parse_duration), 12.0)
    cfg = SchedulerConfig()
    for k in sched_fields:
        if k in p:
            default = getattr(cfg, k)
            conv = _positive(_int) if isinstance(default, int) else _positive(parse_duration)
            if k in {"assumed_rate"}:
                conv = _positive(parse_rate)
            elif k == "ewma_alpha":
                conv = _at_most(1.0, _positive(_float))  # a weight: above 1 the average runs away
            elif k in {"zone_bonus", "timeout_factor", "busy_backoff_pieces"}:
                conv = _positive(_float)
            elif k in {"claim_stagger", "claim_stagger_max"}:
                conv = _nonneg(parse_duration)  # 0: no wait before a first claim request
            setattr(cfg, k, _get(p, "p2p", k, conv))
    s.sched = cfg
    sim = _table(doc, "sim", {"max_time"})
    s.max_time = _get(sim, "sim", "max_time", _at_most(MAX_SECONDS, _positive(parse_duration)), 86400.0)
    return s


def apply_override(doc: dict, key: str, value: str) -> None:
    """Set a dotted key ("cluster.nodes", "p2p.piece_size") in a parsed TOML document from a --sweep value."""
    parts = key.split(".")
    t = doc
    for part in parts[:-1]:
        if part == "image":
            t = t.setdefault("image", [{}])[0]
            continue
        t = t.setdefault(part, {})
        if not isinstance(t, dict):
            raise _err(key, "is not a table")
    v: Any = value
    if value.lower() in {"true", "false"}:
        v = value.lower() == "true"
    else:
        try:
            v = int(value)
        except ValueError:
            try:
                v = float(value)
            except ValueError:
                v = value
    t[parts[-1]] = v


def load_scenario(path: str | Path, overrides: dict[str, str] | None = None) -> Scenario:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not valid TOML: not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    for k, v in (overrides or {}).items():
        apply_override(doc, k, v)
    return parse_scenario(doc)
