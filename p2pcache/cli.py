"""The `p2pcache` command: `node` runs a node, `simulate` runs the capacity planner, `configure` points a client at a
node.

Bad input ends with a one-line message naming the problem and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from p2pcache.config import ConfigError, add_node_flags, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2pcache", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = p.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="run a node: registry mirror + swarm member")
    add_node_flags(node)
    sim = sub.add_parser("simulate", help="simulate a rollout in virtual time")
    sim.add_argument("scenario", help="scenario TOML file")
    sim.add_argument("--json", dest="json_out", help="write the results as JSON to this file")
    sim.add_argument("--plot", help="draw completion and throughput over time to this PNG")
    sim.add_argument("--seed", type=int, help="override the scenario's seed")
    sim.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,…",
                     help="run a grid over a scenario key (repeatable), one row per point")
    conf = sub.add_parser("configure", help="point a client at a node")
    clients = conf.add_subparsers(dest="client", required=True)
    ctrd = clients.add_parser("containerd", help="write containerd hosts.toml files (certs.d) for the node")
    ctrd.add_argument("--mirror", default="http://127.0.0.1:5000", help="the node's registry URL (default %(default)s)")
    ctrd.add_argument("--hosts-dir", default=None,
                      help="containerd's config_path (default /etc/containerd/certs.d)")
    ctrd.add_argument("--registry", action="append", default=[], metavar="HOST",
                      help="registry to mirror (repeatable; default docker.io)")
    ctrd.add_argument("--force", action="store_true",
                      help="replace a hosts.toml that says something else (kept as hosts.toml.bak)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "node":
            settings = settings_from_args(args)
            from p2pcache.node import run_node_blocking

            return run_node_blocking(settings)
        if args.command == "configure":
            from p2pcache.clientconf import DEFAULT_HOSTS_DIR, write_containerd_hosts

            hosts_dir = DEFAULT_HOSTS_DIR if args.hosts_dir is None else args.hosts_dir  # a str: '' is no '.'

            for path in write_containerd_hosts(hosts_dir, args.mirror,
                                               args.registry or ["docker.io"], force=args.force):
                print(f"wrote {path}")
            return 0
        if args.command == "simulate":
            from p2pcache.sim.cli import run_simulate

            return run_simulate(args)
    except ConfigError as e:
        print(f"p2pcache: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
