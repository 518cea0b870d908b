"""Turning simulation results into figures: the summary dict (--json), the terminal table, the plot.

Never runs a simulation and never reads a clock. matplotlib is optional and imported only by `plot`.

The figures:
- pull_seconds: from a node's arrival to its last layer verified, over the nodes that finished (nearest-rank
  percentiles).
- lower_bound_seconds: Kumar & Ross, `max(F/u_s, F/d_min, N*F/(u_s + sum u_i))` for one file; with several
  images or layers it is generalised the obvious way: max(unique bytes / u_s, max_n F_n/d_n,
  sum_n F_n / (u_s + sum u_i)). It is a bound for an all-at-once rollout; with waves, Poisson arrivals or
  jitter it is only a reference (`bound_is_reference`, and the table says so).
- baseline_*: the same rollout with p2p disabled (every node pulls through its own cache from upstream).
  `baseline_seconds` is the slowest node that finished; check `baseline_unfinished` (a run stops at
  sim.max_time, 24 h by default).
"""

from __future__ import annotations

import math
from typing import Any

from p2pcache.sim.engine import Result
from p2pcache.sim.scenario import Scenario
from p2pcache.units import format_size

__all__ = ["lower_bound", "percentiles", "summary", "table", "plot", "sweep_row"]


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    s = sorted(xs)

    def rank(p: float) -> float:
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": s[-1], "mean": sum(s) / len(s)}


def lower_bound(sc: Scenario, image_bytes: int, per_node: list[int]) -> float:
    caps = sc.node_caps()
    us = sc.upstream_bandwidth
    total_up = sum(u for u, _ in caps)
    return max(
        image_bytes / us,
        max(f / d for f, (_, d) in zip(per_node, caps, strict=True)),
        sum(per_node) / (us + total_up),
    )


def summary(sc: Scenario, r: Result, base: Result | None, source: str = "") -> dict[str, Any]:
    bound = lower_bound(sc, r.image_bytes, r.per_node_bytes)
    pulls = percentiles(r.pull_seconds)
    up = sorted(r.node_upload)
    out: dict[str, Any] = {
        "scenario": source,
        "seed": sc.seed,
        "nodes": sc.nodes,
        "p2p": sc.p2p,
        "image_bytes": r.image_bytes,
        "bytes_per_node": max(r.per_node_bytes) if r.per_node_bytes else 0,
        "piece_sizes": r.piece_sizes,
        "pull_seconds": pulls,
        "unfinished": r.unfinished,
        "upstream_bytes": r.upstream_bytes,
        "upstream_requests": r.upstream_requests,
        "upstream_over_image": r.upstream_bytes / r.image_bytes if r.image_bytes else None,
        "peer_bytes": r.peer_bytes,
        "lower_bound_seconds": bound,
        "max_over_bound": pulls["max"] / bound if pulls["max"] is not None and bound > 0 else None,
        # arrivals spread out (waves, Poisson, jitter): late nodes find the swarm full and may beat the formula
        "bound_is_reference": sc.start != "all" or sc.jitter > 0,
        "node_upload": {
            "mean": sum(up) / len(up) if up else 0.0,
            "p50": percentiles(up)["p50"],
            "p99": percentiles(up)["p99"],
            "max": up[-1] if up else 0.0,
            "max_over_image": (up[-1] / r.image_bytes) if up and r.image_bytes else None,
        },
        "node_upload_bytes": r.node_upload,
        "bans": r.bans,
        "failures": r.failures,
        "sim": {"events": r.events, "wall_seconds": r.wall_seconds, "end_time": r.end_time},
    }
    if base is not None:
        bp = percentiles(base.pull_seconds)
        out["baseline_seconds"] = bp["max"]
        out["baseline_pull_seconds"] = bp
        out["baseline_upstream_bytes"] = base.upstream_bytes
        out["baseline_upstream_requests"] = base.upstream_requests
        out["baseline_unfinished"] = base.unfinished
        if bp["max"] and pulls["max"] and not base.unfinished:
            out["speedup_over_baseline"] = bp["max"] / pulls["max"]
    return out


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    if x >= 120:
        return f"{x / 60:.1f} min"
    return f"{x:.2f} s"


def table(s: dict[str, Any]) -> str:
    pieces = sorted(set(s["piece_sizes"].values()))
    head = (f"{s['scenario'] or 'scenario'}: {s['nodes']} nodes, {format_size(s['bytes_per_node'])} per node, "
            f"{format_size(s['image_bytes'])} unique, pieces {', '.join(format_size(p) for p in pieces)}, "
            f"seed {s['seed']}")
    has_base = "baseline_pull_seconds" in s
    name = "p2p" if s["p2p"] else "no p2p"
    rows = [("", name, "baseline (no p2p)" if has_base else "")]
    b = s.get("baseline_pull_seconds", {})
    for k in ("p50", "p95", "p99", "max"):
        rows.append((f"pull time {k}", _s(s["pull_seconds"][k]), _s(b.get(k)) if has_base else ""))
    rows.append(("unfinished nodes", str(s["unfinished"]), str(s.get("baseline_unfinished", "")) if has_base else ""))
    rows.append(("upstream bytes", f"{format_size(s['upstream_bytes'])} ({s['upstream_over_image']:.2f}x image)",
                 format_size(s["baseline_upstream_bytes"]) if has_base else ""))
    rows.append(("upstream requests", str(s["upstream_requests"]),
                 str(s.get("baseline_upstream_requests", "")) if has_base else ""))
    rows.append(("peer bytes", format_size(s["peer_bytes"]), ""))
    nu = s["node_upload"]
    rows.append(("upload per node", f"mean {format_size(nu['mean'])}, max {format_size(nu['max'])}", ""))
    ratio = s["max_over_bound"]
    if s["unfinished"]:  # the slowest node is one that never finished: no ratio says anything about it
        where = f"{s['unfinished']} nodes did not finish"
    else:
        where = f"slowest node at {ratio:.2f}x the bound" if ratio else ""
    if s.get("bound_is_reference"):
        # found in review: with jitter the baseline's slowest node took 0.45x "the lower bound", unexplained
        rows.append(("Kumar-Ross, a reference", _s(s["lower_bound_seconds"]),
                     "(arrivals spread out: not a bound) " + where.replace("the bound", "it")))
    else:
        rows.append(("lower bound (Kumar-Ross)", _s(s["lower_bound_seconds"]), where))
    speedup = s.get("speedup_over_baseline")
    if speedup and not s["unfinished"]:
        rows.append(("slowest node vs baseline",
                     f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower", ""))
    elif s.get("baseline_unfinished"):
        rows.append(("baseline", f"{s['baseline_unfinished']} nodes did not finish "
                                 "(killed, or still pulling at sim.max_time)", ""))
    rows.append(("simulated", f"{s['sim']['events']} events in {s['sim']['wall_seconds']:.1f} s wall", ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [head] + [f"  {a:<{w0}}  {b_:<{w1}}  {c}".rstrip() for a, b_, c in rows]
    return "\n".join(lines)


def sweep_row(point: dict[str, str], s: dict[str, Any]) -> dict[str, Any]:
    return {
        **point,
        "p50": s["pull_seconds"]["p50"], "p99": s["pull_seconds"]["p99"], "max": s["pull_seconds"]["max"],
        "bound": s["lower_bound_seconds"], "max_over_bound": s["max_over_bound"],
        "upstream_over_image": s["upstream_over_image"], "baseline": s.get("baseline_seconds"),
        "unfinished": s["unfinished"], "wall": s["sim"]["wall_seconds"],
    }


def throughput_bins(r: Result, bins: int) -> tuple[float, list[float], list[float]]:
    """(the time axis' end, bytes from upstream per bin, bytes from peers per bin), bins of equal width from 0."""
    # to the last byte delivered, not the last node's finish: nodes that never finished received bytes after it,
    # and binned at the end they showed more than the cluster can take in (found in review: 14.8 Gbit/s, 9 max)
    end = max([r.end_time, *r.piece_log_t[-1:], 1e-9])
    width = end / bins
    up = [0.0] * bins
    peer = [0.0] * bins
    for t, b, is_up in zip(r.piece_log_t, r.piece_log_bytes, r.piece_log_upstream, strict=True):
        i = min(bins - 1, int(t / width))
        if is_up:
            up[i] += b
        else:
            peer[i] += b
    return end, up, peer


def plot(path: str, sc: Scenario, r: Result, base: Result | None, title: str = "") -> None:
    """Completion over time, and upstream vs peer throughput over time, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=False)
    n = sc.nodes

    def steps(times: list[float]) -> tuple[list[float], list[float]]:
        xs, ys = [0.0], [0.0]
        for i, t in enumerate(times, 1):
            xs.append(t)
            ys.append(100.0 * i / n)
        return xs, ys

    xs, ys = steps(r.completions)
    ax1.step(xs, ys, where="post", label="p2p" if sc.p2p else "no p2p")
    if base is not None:
        bx, by = steps(base.completions)
        ax1.step(bx, by, where="post", label="baseline (no p2p)", linestyle="--")
    bound = lower_bound(sc, r.image_bytes, r.per_node_bytes)
    ax1.axvline(bound, color="grey", linestyle=":", label=f"Kumar-Ross bound {bound:.1f} s")
    ax1.set_ylabel("nodes done (%)")
    ax1.set_xlabel("time (s)")
    ax1.legend(loc="lower right")
    ax1.set_title(title or "completion over time")
    if sc.p2p:
        end, up, peer = throughput_bins(r, bins=100)
        width = end / len(up)
        centers = [(i + 0.5) * width for i in range(len(up))]
        ax2.plot(centers, [x * 8 / width / 1e9 for x in peer], label="from peers")
        ax2.plot(centers, [x * 8 / width / 1e9 for x in up], label="from upstream")
        ax2.legend(loc="upper right")
    else:
        # a baseline run moves whole layers, not pieces: binned at their ends they showed 80 Gbit/s from a 1
        # Gbit/s registry (found in review), so nothing is drawn rather than a curve that lies
        ax2.text(0.5, 0.5, "no pieces without p2p: each node pulls whole layers from upstream",
                 ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("throughput (Gbit/s, by piece completion)")
    ax2.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
