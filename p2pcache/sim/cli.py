"""`p2pcache simulate`: load a scenario, run it (and its no-p2p baseline), print/write the results.

Bad input (a scenario key, a --sweep spec, a missing matplotlib for --plot) is one line on stderr naming the
problem and exit status 2, never a traceback. A sweep runs its grid points in parallel processes, one row each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pcache.sim.engine import simulate
from p2pcache.sim.report import plot, summary, sweep_row, table
from p2pcache.sim.scenario import ScenarioError, load_scenario

__all__ = ["run_simulate", "run_point"]

LONG_RUN_TRANSFERS = 500_000  # ~2-10 minutes of one core (bench/sim_speed.py: 0.21 ms a transfer at 1,000 nodes)


def _fail(msg: str) -> int:
    print(f"p2pcache: simulate: {msg}", file=sys.stderr)
    return 2


def parse_sweep(specs: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ScenarioError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. cluster.nodes=100,500)")
        if any(k == key.strip() for k, _ in out):
            raise ScenarioError(f"--sweep {key.strip()} given twice: put all its values in one (KEY=V1,V2,...)")
        out.append((key.strip(), vals))
    return out


def run_point(args: tuple[str, dict[str, str], int | None, bool]) -> dict[str, Any]:
    """Run one scenario (with overrides) and its baseline; return the summary. Used by sweeps' workers."""
    path, overrides, seed, progress = args
    sc = load_scenario(path, overrides)
    if seed is not None and "seed" not in overrides:  # a swept seed is the point's own (--seed ran every one)
        sc.seed = seed
    r = simulate(sc, progress=progress, label="p2p      ")
    base = simulate(sc, p2p=False, progress=progress, label="baseline ") if sc.p2p else None
    return summary(sc, r, base, source=path)


def run_simulate(args: argparse.Namespace) -> int:
    try:
        sweep = parse_sweep(list(getattr(args, "sweep", None) or []))
        sc = load_scenario(args.scenario)  # validate before anything runs
        keys = [k for k, _ in sweep]
        points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in sweep))]
        # With a sweep its points run (each a combination of the values), not the file as written.
        runs = [load_scenario(args.scenario, p) for p in points] if sweep else [sc]
        transfers = max(r.piece_transfers() for r in runs)
    except ScenarioError as e:
        return _fail(str(e))
    for what in sorted({u for r in runs for u in r.unused}):
        print(f"p2pcache: simulate: ignored: {what}", file=sys.stderr)
    if args.plot:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return _fail("--plot needs matplotlib (pip install 'p2pcache[plot]')")
        kinds = Figure().canvas.get_supported_filetypes()
        suffix = Path(args.plot).suffix.lstrip(".").lower()
        if suffix not in kinds:
            return _fail(f"--plot {args.plot}: use one of the file types {', '.join(sorted(kinds))} (e.g. out.png)")
    # Where the results go is checked before the run, not after minutes of it.
    for flag, out in (("--json", args.json_out), ("--plot", args.plot)):
        problem = _unwritable(out) if out is not None else None
        if problem:
            return _fail(f"{flag} {out}: {problem}")
    progress = sys.stderr.isatty()
    if transfers >= LONG_RUN_TRANSFERS:
        # Say so up front: the engine's cost is per piece transfer, and grows with the node count (measured with
        # bench/sim_speed.py on a quiet core: 0.15 ms a transfer at 300 nodes, 0.21 ms at 1,000, 0.48 ms at
        # 10,000; with the machine's other core busy, up to 1.2 ms at 10,000).
        lo, hi = transfers * 200e-6 / 60, transfers * 1200e-6 / 60
        what = "the sweep's largest point" if sweep else "the p2p run"
        print(f"p2pcache: simulate: {transfers:,} piece transfers (nodes x pieces): expect roughly {lo:.0f}-{hi:.0f} "
              f"min of one core for {what}; a bigger piece size (p2p.piece_size) or fewer nodes runs faster",
              file=sys.stderr)
    if not sweep:
        seed = args.seed
        if seed is not None:
            sc.seed = seed
        r = simulate(sc, progress=progress, label="p2p      ")
        base = simulate(sc, p2p=False, progress=progress, label="baseline ") if sc.p2p else None
        s = summary(sc, r, base, source=args.scenario)
        print(table(s))
        for flag, out, write in (("--json", args.json_out, lambda path: _dump_json(path, s)),
                                 ("--plot", args.plot, lambda path: plot(path, sc, r, base, title=args.scenario))):
            problem = _write_results(flag, out, write) if out else None
            if problem:
                return _fail(problem)
        return 0
    jobs = [(args.scenario, p, args.seed, False) for p in points]
    procs = min(len(jobs), os.cpu_count() or 1)
    rows = []
    header = [*keys, "p50", "p99", "max", "bound", "max/bound", "upstream/image", "baseline", "unfinished"]
    print("  ".join(f"{h:>12}" for h in header))
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(procs) if procs > 1 else _Serial() as pool:
        for p, s in zip(points, pool.imap(run_point, jobs), strict=True):
            row = sweep_row(p, s)
            rows.append({"point": p, "summary": s})
            cells = [*(str(p[k]) for k in keys)]
            for k in ("p50", "p99", "max", "bound"):
                cells.append("-" if row[k] is None else f"{row[k]:.2f}")
            cells.append("-" if row["max_over_bound"] is None else f"{row['max_over_bound']:.2f}")
            cells.append(f"{row['upstream_over_image']:.2f}")
            cells.append("-" if row["baseline"] is None else f"{row['baseline']:.2f}")
            cells.append(str(row["unfinished"]))
            print("  ".join(f"{c:>12}" for c in cells), flush=True)
    if args.json_out:
        problem = _write_results("--json", args.json_out, lambda path: _dump_json(path, {"sweep": rows}))
        if problem:
            return _fail(problem)
    if args.plot:
        print("p2pcache: simulate: --plot is ignored with --sweep", file=sys.stderr)
    return 0


def _unwritable(path: str) -> str | None:
    """Why a results file cannot be written at `path`, or None. Tried, not judged from permission bits: root
    passes every `os.access` check, and /sys or a read-only mount refuse the write itself (found in review: the
    run went through and ended in a traceback)."""
    if not path:
        return "an empty file name"
    p = Path(path)
    if p.is_dir():
        return "is a directory"
    parent = p.parent
    if not parent.is_dir():
        return f"no directory {parent}"
    if p.exists():
        try:
            with open(p, "r+b"):
                pass
        except OSError as e:
            return e.strerror or str(e)
        return None
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".p2pcache-probe-"):
            pass
    except OSError as e:
        return f"cannot create a file in {parent}: {e.strerror or e}"
    return None


def _write_results(flag: str, path: str, write: Callable[[str], None]) -> str | None:
    """Write one results file; the error to print instead of a traceback (the probe before the run can be
    outrun: a disk that fills up meanwhile)."""
    try:
        write(path)
    except OSError as e:
        return f"{flag} {path}: {e.strerror or e}"
    return None


def _dump_json(path: str, doc: object) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


class _Serial:
    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap(self, fn, items):
        return map(fn, items)
