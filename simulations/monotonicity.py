"""Search small heterogeneous clusters for rollouts that more bandwidth makes slower (issue 4: "more bandwidth
never makes it slower"), and print what it finds.

    .venv/bin/python simulations/monotonicity.py                  # 60 random cases, search seed 1
    .venv/bin/python simulations/monotonicity.py --cases 60 --search-seed 1 --seeds 1

Each case draws a cluster (2-10 nodes, 1-4 layers of 10-80 MB, uploads 5-50 MB/s, downloads 10-100 MB/s, a
registry of 10-50 MB/s, 1 ms latencies), picks one of upload, download or registry, and runs it three times with
that rate x1, x2 and x4; a case is a violation when a step is more than 3 % slower. `--seeds` > 1 takes the mean
over that many simulation seeds per point (one run is one random course of events, so single-seed violations
of a few percent can be noise: the truth tests use means). Runs the simulator only, a second or two per case.
The tests in tests/unit/test_sim_truth.py hold the cases this search found to their fixes.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pcache.sim.engine import simulate  # noqa: E402
from p2pcache.sim.scenario import parse_scenario  # noqa: E402


def slowest(nodes: int, layers: list[int], rates: dict[str, float], seeds: int) -> float:
    """The mean over `seeds` simulation seeds of the slowest node's pull time."""
    total = 0.0
    for seed in range(1, seeds + 1):
        doc = {"seed": seed,
               "cluster": {"nodes": nodes, "upload": f"{rates['up']} MB/s", "download": f"{rates['down']} MB/s",
                           "latency": "1 ms"},
               "upstream": {"bandwidth": f"{rates['registry']} MB/s", "latency": "1 ms"},
               "image": [{"name": "a", "layers": [f"{size} MB" for size in layers]}]}
        total += max(simulate(parse_scenario(doc)).pull_seconds)
    return total / seeds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--search-seed", type=int, default=1, help="seed of the random draw of cases")
    p.add_argument("--seeds", type=int, default=1, help="simulation seeds averaged per point")
    args = p.parse_args()
    rng = random.Random(args.search_seed)
    violations, worst = 0, 1.0
    for _ in range(args.cases):
        nodes = rng.choice([2, 3, 4, 6, 10])
        layers = [rng.choice([10, 20, 50, 80]) for _ in range(rng.randint(1, 4))]
        base = {"up": rng.choice([5, 10, 25, 50]), "down": rng.choice([10, 25, 50, 100]),
                "registry": rng.choice([10, 25, 50])}
        key = rng.choice(["up", "down", "registry"])
        times = [slowest(nodes, layers, {**base, key: base[key] * m}, args.seeds) for m in (1, 2, 4)]
        ratio = max(b / a for a, b in zip(times, times[1:], strict=False))
        worst = max(worst, ratio)
        if ratio > 1.03:
            violations += 1
            print(f"slower with more {key}: {nodes} nodes, layers {layers} MB, {base} MB/s, x1 x2 x4 -> "
                  f"{', '.join(f'{t:.2f} s' for t in times)}")
    print(f"{violations} of {args.cases} cases more than 3 % slower with more bandwidth; worst step {worst:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
