"""Run a small scenario in the simulator and with real node processes, and print both (issue 4's check).

    .venv/bin/python simulations/validate.py                               # simulations/bench-8x100.toml
    .venv/bin/python simulations/validate.py simulations/bench-8x100.toml --runs 3

The real side is `bench/swarm_bench.py` (swarm part only): N node processes on loopback with `--upload-limit` and
`--download-limit` at the scenario's rate, in front of a real docker-registry behind a proxy throttled to the
scenario's upstream bandwidth, every node pulling the image at once (manifest, then every blob at once). So the
scenario must be one that harness can build: one homogeneous group of nodes whose upload, download and upstream
bandwidth are equal, one image of equal layers, every node starting at once, no churn, every layer pulled at
once (`concurrent_layers` >= the layer count). Anything else is refused with the reason.

Both sides are random: which node wins which layer's upstream claim decides how evenly the upload work spreads
(in the simulator, one seed gives 11.4 s, another 15.9 s for the same scenario), and real runs differ the same
way. So the simulator runs `--seeds` seeds (from the scenario's own) and the real cluster `--runs` times, and the
medians are compared, with each side's range printed beside them.

Goal (issue 4): pull times within ±20% of each other, upstream bytes equal. Prints the figures and the ratios;
the exit status is 0 whether or not the goal is met (this is a measurement, not a test), 2 on a bad scenario.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pcache.sim.engine import simulate  # noqa: E402
from p2pcache.sim.scenario import Scenario, ScenarioError, load_scenario  # noqa: E402

MB = 10**6
_SWARM = re.compile(r"^swarm:\s+slowest ([\d.]+) s, median ([\d.]+) s")
_UPSTREAM = re.compile(r"^upstream:\s+([\d.]+) MB of blobs for a ([\d.]+) MB image")


def check(sc: Scenario) -> str | None:
    """Why the real harness cannot run `sc`, or None."""
    if sc.groups or sc.zones != ["default"]:
        return "validate needs one homogeneous group of nodes (no [[group]], no zones)"
    if not (sc.upload == sc.download == sc.upstream_bandwidth):
        return "validate needs upload = download = upstream bandwidth (the benchmark's one --rate)"
    if len(sc.images) != 1 or len({layer.size for layer in sc.images[0].layers}) != 1:
        return "validate needs one image whose layers are all the same size"
    if sc.start != "all" or sc.jitter or sc.kill or sc.kill_claim_holder is not None:
        return "validate needs every node starting at once and no churn"
    if sc.concurrent_layers < len(sc.images[0].layers):
        return "validate needs concurrent_layers >= the layer count (the benchmark pulls every blob at once)"
    if not sc.p2p:
        return "validate compares the swarm: [p2p] enabled = true"
    return None


def real_runs(sc: Scenario, runs: int) -> list[tuple[float, float, float]]:
    """(slowest, median, upstream MB) of each real run."""
    layers = sc.images[0].layers
    cmd = [sys.executable, str(REPO / "bench" / "swarm_bench.py"), "--nodes", str(sc.nodes),
           "--image-mb", f"{sum(layer.size for layer in layers) / MB:g}", "--layers", str(len(layers)),
           "--rate", f"{sc.upload:g}", "--skip-baseline", "--skip-p2p"]
    if sc.piece_size:
        cmd.append(f"--node-arg=--piece-size={sc.piece_size}")
    out = []
    for i in range(runs):
        print(f"[real run {i + 1}/{runs}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        text = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800).stdout
        slowest = median = up = None
        for line in text.splitlines():
            if m := _SWARM.match(line):
                slowest, median = float(m.group(1)), float(m.group(2))
            if m := _UPSTREAM.match(line):
                up = float(m.group(1))
        if slowest is None or median is None or up is None:
            raise RuntimeError(f"swarm_bench printed no figures:\n{text}")
        out.append((slowest, median, up))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario", nargs="?", default=str(REPO / "simulations" / "bench-8x100.toml"))
    p.add_argument("--runs", type=int, default=1, help="real runs (the median of each figure is printed)")
    p.add_argument("--seeds", type=int, default=20,
                   help="simulator runs, seeds from the scenario's on (the median of each figure is printed)")
    args = p.parse_args(argv)
    try:
        sc = load_scenario(args.scenario)
    except (OSError, ScenarioError) as e:
        print(f"validate: {e}", file=sys.stderr)
        return 2
    why = check(sc)
    if why is not None:
        print(f"validate: {args.scenario}: {why}", file=sys.stderr)
        return 2

    if args.seeds < 1 or args.runs < 1:
        print("validate: --seeds and --runs must be at least 1", file=sys.stderr)
        return 2
    sims = [simulate(dataclasses.replace(sc, seed=sc.seed + k)) for k in range(args.seeds)]
    r = sims[0]
    sim_all = [(max(x.pull_seconds), statistics.median(x.pull_seconds), x.upstream_bytes / MB) for x in sims]
    sim_slowest = statistics.median(x[0] for x in sim_all)
    sim_median = statistics.median(x[1] for x in sim_all)
    sim_up = statistics.median(x[2] for x in sim_all)
    real = real_runs(sc, args.runs)
    slowest = statistics.median(x[0] for x in real)
    median = statistics.median(x[1] for x in real)
    up = statistics.median(x[2] for x in real)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    layers = sc.images[0].layers
    print(f"validate {args.scenario}: {sc.nodes} nodes, {len(layers)} layers of {layers[0].size / MB:g} MB, "
          f"every link and the registry at {sc.upload / MB:g} MB/s, pieces of "
          f"{', '.join(f'{n >> 10} KiB' for n in sorted(set(r.piece_sizes.values())))}; "
          f"medians of {args.seeds} simulator seed(s) and {args.runs} real run(s)")
    print(f"{'':16}{'simulator':>12}{'real nodes':>13}{'real/sim':>10}   goal")
    print(f"{'slowest pull':16}{sim_slowest:>10.2f} s{slowest:>11.2f} s{ratio(slowest, sim_slowest):>10}   0.80-1.20x")
    print(f"{'median pull':16}{sim_median:>10.2f} s{median:>11.2f} s{ratio(median, sim_median):>10}   0.80-1.20x")
    print(f"{'upstream bytes':16}{sim_up:>9.1f} MB{up:>10.1f} MB{ratio(up, sim_up):>10}   1.00x")

    def spread(xs: list[tuple[float, float, float]]) -> str:
        lo, hi = min(x[0] for x in xs), max(x[0] for x in xs)
        return f"{lo:.1f}-{hi:.1f} s"

    print(f"slowest pull over the runs: simulator {spread(sim_all)} (seeds {sc.seed}-{sc.seed + args.seeds - 1}), "
          f"real {spread(real)}")
    if len(real) > 1:
        print("real runs (slowest, median, upstream MB): " + "; ".join(f"{a:.1f} s, {b:.1f} s, {c:.1f}"
                                                                      for a, b, c in real))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
