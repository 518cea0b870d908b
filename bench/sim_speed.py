"""How fast the simulator is: 10,000 nodes x a 1 GiB image at the default piece size, on one core.

    .venv/bin/python bench/sim_speed.py                  # the benchmark (goal: under 2 minutes)
    .venv/bin/python bench/sim_speed.py --nodes 1000      # a quicker look

Prints the wall time of the p2p simulation alone (the baseline is cheap and not counted), the event count and
what the simulation predicts, so a speed-up that changes the answer is noticed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from p2pcache.sim.engine import simulate
from p2pcache.sim.report import lower_bound
from p2pcache.sim.scenario import parse_scenario
from p2pcache.units import format_size, parse_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--size", default="1 GiB")
    ap.add_argument("--piece-size", default="auto")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    doc = {
        "seed": a.seed,
        "cluster": {"nodes": a.nodes, "upload": "1 Gbit/s", "download": "1 Gbit/s", "latency": "1 ms"},
        "upstream": {"bandwidth": "1 Gbit/s"},
        "image": [{"name": "app:1", "layers": [a.size]}],
        "rollout": {"start": "all"},
        "p2p": {"piece_size": a.piece_size},
    }
    sc = parse_scenario(doc)
    t0 = time.process_time()
    w0 = time.monotonic()
    r = simulate(sc, progress=sys.stderr.isatty())
    cpu = time.process_time() - t0
    wall = time.monotonic() - w0
    bound = lower_bound(sc, r.image_bytes, r.per_node_bytes)
    pieces = ", ".join(format_size(p) for p in sorted(set(r.piece_sizes.values())))
    print(f"{a.nodes} nodes x {format_size(parse_size(a.size))} (pieces {pieces}): "
          f"wall {wall:.1f} s, cpu {cpu:.1f} s, {r.events} events ({r.events / max(cpu, 1e-9):,.0f}/s cpu)")
    print(f"  predicts: slowest {max(r.pull_seconds):.2f} s, p50 {statistics.median(r.pull_seconds):.2f} s, "
          f"bound {bound:.2f} s ({max(r.pull_seconds) / bound:.2f}x), "
          f"upstream {r.upstream_bytes / r.image_bytes:.3f}x image, unfinished {r.unfinished}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
