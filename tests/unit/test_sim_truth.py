"""The simulator against cases whose answer is known (small clusters, so the whole file runs in seconds)."""

import pytest

from p2pcache.sim.engine import simulate
from p2pcache.sim.report import lower_bound, summary
from p2pcache.sim.scenario import parse_scenario

MB = 10**6


def scenario(nodes=10, up="1 Gbit/s", down="1 Gbit/s", upstream="1 Gbit/s", layers=("200 MB",), latency="0 ms",
             upstream_latency="0 ms", **extra):
    doc = {
        "seed": extra.pop("seed", 1),
        "cluster": {"nodes": nodes, "upload": up, "download": down, "latency": latency},
        "upstream": upstream if isinstance(upstream, dict) else {"bandwidth": upstream, "latency": upstream_latency},
        "image": [{"name": "app:1", "layers": list(layers)}],
    }
    for k, v in extra.items():
        doc[k] = v
    return parse_scenario(doc)


@pytest.mark.parametrize("upstream,down", [("1 Gbit/s", "2 Gbit/s"), ("2 Gbit/s", "1 Gbit/s")])
@pytest.mark.parametrize("p2p", [True, False])
def test_single_node_takes_f_over_min_of_upstream_and_download(upstream, down, p2p):
    sc = scenario(nodes=1, upstream=upstream, down=down)
    r = simulate(sc, p2p=p2p)
    expected = 200 * MB / min(sc.upstream_bandwidth, sc.download)
    assert r.pull_seconds[0] == pytest.approx(expected, rel=1e-6)
    assert r.upstream_bytes == pytest.approx(200 * MB)


@pytest.mark.parametrize("upstream,down", [("1 Gbit/s", "1 Gbit/s"), ("100 Gbit/s", "1 Gbit/s")])
def test_baseline_is_max_of_n_f_over_us_and_f_over_d(upstream, down):
    sc = scenario(nodes=20, upstream=upstream, down=down)
    base = simulate(sc, p2p=False)
    f = 200 * MB
    assert max(base.pull_seconds) == pytest.approx(max(20 * f / sc.upstream_bandwidth, f / sc.download), rel=1e-6)
    assert base.upstream_bytes == pytest.approx(20 * f)


CASES = {
    "tight (u = d = u_s)": dict(nodes=12),
    "fast NICs, slow registry": dict(nodes=20, up="10 Gbit/s", down="10 Gbit/s"),
    "slow uploads": dict(nodes=15, up="200 Mbit/s", down="1 Gbit/s", upstream="2 Gbit/s"),
    "mixed": dict(nodes=16, layers=("120 MB", "40 MB"), latency="1 ms", upstream_latency="20 ms",
                  cluster_groups=[{"nodes": 4, "upload": "100 Mbit/s", "download": "400 Mbit/s"}]),
    "two zones": dict(nodes=16, zones=2),
}


def build(case):
    kw = dict(case)
    groups = kw.pop("cluster_groups", None)
    zones = kw.pop("zones", None)
    sc = scenario(**kw)
    if groups or zones:
        doc = {
            "seed": 1,
            "cluster": {"nodes": kw["nodes"], "upload": kw.get("up", "1 Gbit/s"),
                        "download": kw.get("down", "1 Gbit/s"), "latency": kw.get("latency", "0 ms")},
            "upstream": {"bandwidth": kw.get("upstream", "1 Gbit/s"), "latency": kw.get("upstream_latency", "0 ms")},
            "image": [{"name": "a", "layers": list(kw.get("layers", ("200 MB",)))}],
        }
        if groups:
            doc["cluster"]["group"] = groups
        if zones:
            doc["cluster"]["zones"] = zones
            doc["cluster"]["inter_zone_latency"] = "2 ms"
            doc["cluster"]["inter_zone_bandwidth"] = "5 Gbit/s"
        sc = parse_scenario(doc)
    return sc


@pytest.mark.parametrize("name", list(CASES))
def test_p2p_never_beats_the_bound_and_fetches_upstream_once(name):
    sc = build(CASES[name])
    r = simulate(sc)
    bound = lower_bound(sc, r.image_bytes, r.per_node_bytes)
    assert r.unfinished == 0
    assert max(r.pull_seconds) >= bound * (1 - 1e-9)
    assert r.upstream_bytes == pytest.approx(r.image_bytes)  # each layer from upstream exactly once


@pytest.mark.parametrize("name", ["tight (u = d = u_s)", "fast NICs, slow registry"])
def test_homogeneous_clusters_land_within_1_3x_of_the_bound(name):
    # In the tight case (registry as fast as the nodes, every node must download at full speed all along) the
    # slowest node lands at 1.25-1.32x the bound depending on the seed (seeds 1-8 measured), so the mean over
    # four seeds is what is held to 1.3x; with faster NICs than the registry it is ~1.01x on any seed.
    ratios = []
    for seed in (1, 2, 3, 4):
        sc = build(CASES[name])
        sc.seed = seed
        r = simulate(sc)
        ratios.append(max(r.pull_seconds) / lower_bound(sc, r.image_bytes, r.per_node_bytes))
    assert min(ratios) >= 1.0
    assert sum(ratios) / len(ratios) <= 1.3, ratios


@pytest.mark.parametrize("key", ["up", "down", "upstream"])
def test_more_bandwidth_never_makes_it_slower(key):
    # One run is one random course of events (rarest-first ties, who asks whom first): individual runs vary by a
    # few percent from seed to seed, so compare the mean over seeds of the slowest node's time.
    def mean_max(rate):
        runs = [max(simulate(scenario(nodes=8, seed=seed, layers=("100 MB",), **{key: rate})).pull_seconds)
                for seed in (1, 2, 3)]
        return sum(runs) / len(runs)

    times = [mean_max(rate) for rate in ("500 Mbit/s", "1 Gbit/s", "4 Gbit/s")]
    assert all(b <= a * 1.03 for a, b in zip(times, times[1:], strict=False)), times


def test_a_faster_registry_never_makes_it_slower_when_uploads_are_the_bottleneck():
    # Found in review: with the claim holder's upstream stream given strict priority at its download link, a
    # stream that filled the link starved the peer flows into the node while they held their uploaders' slots:
    # 8.0 s with a 25 MB/s registry, 10.0 s with 50 or 100 MB/s. Each class is now assured half the link.
    def slowest(registry):
        doc = {"seed": 1,
               "cluster": {"nodes": 2, "upload": "10 MB/s", "download": "25 MB/s", "latency": "0 ms"},
               "upstream": {"bandwidth": registry, "latency": "0 ms"},
               "image": [{"name": "a", "layers": ["80 MB", "50 MB"]}]}
        return max(simulate(parse_scenario(doc)).pull_seconds)

    times = [slowest(rate) for rate in ("25 MB/s", "50 MB/s", "100 MB/s")]
    assert all(b <= a * 1.01 for a, b in zip(times, times[1:], strict=False)), times


@pytest.mark.parametrize("nodes,layers,links,key,seeds", [
    # found by a random search over small heterogeneous clusters (mean over seeds 1-5 before -> after):
    # the stream's strict priority starved the holder's peer flows, 16.4 s -> 17.8 s with twice the upload.
    # 30 seeds: a slight slowdown with 4x the upload is left in this case (11.34, 11.34, 11.75 s for 1x, 2x, 4x
    # before the second back-off wake-up below, 11.52, 11.47, 11.80 s after), and the mean of 6 seeds moves by
    # more than that (1.02x, then 1.05x, for the last step)
    (3, ("10 MB", "80 MB", "10 MB"), {"up": 10, "down": 10, "upstream": 25}, "up", 30),
    # second copies once the holder's stream ended, 8.75 s -> 9.21 s with twice the registry
    (10, ("80 MB",), {"up": 10, "down": 50, "upstream": 10}, "upstream", 6),
    # 9.6 s -> 12.3 s with twice the registry
    (3, ("50 MB", "10 MB", "50 MB"), {"up": 10, "down": 25, "upstream": 50}, "upstream", 6),
    # one node's deep pipelines held every upload slot of a fast uploader: 7.05 s -> 8.24 s with twice the registry
    (3, ("10 MB", "80 MB", "50 MB"), {"up": 50, "down": 25, "upstream": 20}, "upstream", 6),
    # two holders said "busy" at once and only the first one's back-off woke the node (the scheduler's
    # _next_busy_wake): 8.56 s -> 9.67 s with twice the registry. 20 seeds: runs are bimodal here (8.0-8.7 s or
    # 9.8-10.7 s, as a layer's claim falls), so the mean of 6 moved by 9 % with the one-piece-time busy back-off
    # (11.14, 8.55, 9.33 s) where 20 seeds give 11.14, 9.13, 9.05 s (two piece times: 11.14, 9.12, 9.22 s)
    (3, ("50 MB", "10 MB", "50 MB"), {"up": 10, "down": 25, "upstream": 10}, "upstream", 20),
])
def test_more_bandwidth_never_makes_a_heterogeneous_cluster_slower(nodes, layers, links, key, seeds):
    def mean_max(mult):
        rates = {k: f"{v * (mult if k == key else 1)} MB/s" for k, v in links.items()}
        # six seeds at least: single runs of these small clusters spread +-10 % (7.9-10.1 s for the third case),
        # so the mean of three moved by more than the 3 % this allows with no change to the rule it checks
        runs = [max(simulate(scenario(nodes=nodes, seed=seed, layers=layers, latency="1 ms",
                                      upstream_latency="1 ms", **rates)).pull_seconds) for seed in range(1, seeds + 1)]
        return sum(runs) / len(runs)

    times = [mean_max(m) for m in (1, 2, 4)]
    assert all(b <= a * 1.03 for a, b in zip(times, times[1:], strict=False)), times


def test_a_busy_back_off_set_with_nothing_to_send_wakes_the_node():
    """The last piece in flight arrives while the one peer with more pieces is in its "busy" back-off: the
    scheduler sends nothing and its next deadline is that back-off. The simulator scheduled a wake-up only
    after decisions, so the node waited for its next timeout: 5.24 s for seed 1 of this case against 1.7-1.8 s
    for seeds 2-5 (4.4x the bound; found by simulations/monotonicity.py)."""
    sc = scenario(nodes=2, seed=1, layers=("20 MB", "20 MB", "20 MB"), up="25 MB/s", down="50 MB/s",
                  upstream="50 MB/s", latency="1 ms")
    r = simulate(sc)
    assert max(r.pull_seconds) < 1.6 * lower_bound(sc, r.image_bytes, r.per_node_bytes)


def test_deterministic_per_seed():
    sc = scenario(nodes=12, latency="1 ms", layers=("100 MB", "50 MB"))
    a = summary(sc, simulate(sc), None)
    b = summary(sc, simulate(sc), None)
    for s in (a, b):
        s.pop("sim")
    assert a == b


def test_claim_holder_killed_mid_fetch_another_takes_over():
    sc = scenario(nodes=10, latency="1 ms", churn={"kill_claim_holder": "0.5 s"})
    r = simulate(sc)
    assert r.unfinished == 1  # the killed node (no restart)
    assert len(r.pull_seconds) == 9
    # the takeover fetched what the swarm did not have yet; some pieces may be fetched twice, not the whole blob
    assert 200 * MB <= r.upstream_bytes < 1.5 * 200 * MB


def test_churned_nodes_come_back_and_finish():
    sc = scenario(nodes=20, latency="1 ms", churn={"kill": 0.2, "between": ["0 s", "1 s"], "restart_after": "2 s"})
    r = simulate(sc)
    assert r.unfinished == 0 and len(r.pull_seconds) == 20


def test_shared_layers_are_fetched_once_per_cluster():
    doc = {
        "cluster": {"nodes": 12, "upload": "1 Gbit/s", "download": "1 Gbit/s"},
        "upstream": {"bandwidth": "1 Gbit/s"},
        "image": [
            {"name": "a", "layers": [{"name": "base", "size": "60 MB"}, "20 MB"]},
            {"name": "b", "layers": [{"name": "base", "size": "60 MB"}, "30 MB"]},
        ],
        "rollout": {"images": "one"},
    }
    sc = parse_scenario(doc)
    r = simulate(sc)
    assert r.unfinished == 0
    assert r.upstream_bytes == pytest.approx(110 * MB)
    base = simulate(sc, p2p=False)
    assert base.upstream_bytes == pytest.approx(6 * 80 * MB + 6 * 90 * MB)


def test_rate_limited_upstream_delays_the_baseline_not_the_swarm():
    sc = scenario(nodes=10, layers=("20 MB",) * 3, upstream={"bandwidth": "1 Gbit/s", "requests_per_second": 0.5,
                                                              "burst": 3})
    r = simulate(sc)
    base = simulate(sc, p2p=False)
    assert r.upstream_requests == 3
    assert base.upstream_requests == 30
    assert max(base.pull_seconds) > 50  # 27 requests beyond the burst at one every 2 s
    assert max(r.pull_seconds) < 5


def test_a_node_splits_its_sources_among_the_layers_it_pulls(monkeypatch):
    # The simulator gives each download its share of the node's sources as the node does (source_shares): every
    # time a node's downloads change, their shares are the split of max_sources, oldest download first.
    from p2pcache.sim import engine
    from p2pcache.swarm.scheduler import source_shares

    seen = []
    share = engine.Simulation._share_sources

    def check(self, node, now):
        share(self, node, now)
        got = [s.max_sources for s in node.dl.values()]
        assert got == source_shares(self.cfg.max_sources, len(got))
        seen.append(tuple(got))

    monkeypatch.setattr(engine.Simulation, "_share_sources", check)
    r = simulate(scenario(nodes=6, latency="1 ms", layers=("30 MB", "20 MB", "10 MB")))
    assert r.unfinished == 0
    assert (2, 1, 1) in seen and (4,) in seen  # three layers at once, then the last one alone


def test_the_claim_holder_sends_first_copies_first(monkeypatch):
    # The simulator marks each piece its upstream stream delivers as the node does (UploadSlots.fresh), and while
    # it streams, the holder's upload goes to pieces nobody has before second copies of others: here 3 of ~160
    # uploads were second copies (without the rule, 33 of ~180, and the slowest node 7% slower).
    from p2pcache.sim import engine
    from p2pcache.swarm.scheduler import UploadSlots

    marked, ended, sent = [], [], []
    fresh, stream_ended, serve = UploadSlots.fresh, UploadSlots.stream_ended, engine.Simulation._serve
    monkeypatch.setattr(UploadSlots, "fresh", lambda self, k, i: (marked.append((id(self), k, i)),
                                                                  fresh(self, k, i))[1])
    monkeypatch.setattr(UploadSlots, "stream_ended", lambda self, k: (ended.append((id(self), k)),
                                                                      stream_ended(self, k))[1])

    def record(self, u, serves, now):
        sent.extend((u.id, s.index, now) for s in serves)
        serve(self, u, serves, now)

    monkeypatch.setattr(engine.Simulation, "_serve", record)
    sim = engine.Simulation(scenario(nodes=30, layers=("100 MB",), latency="1 ms"))
    r = sim.run()
    assert r.unfinished == 0
    holder = sim.first_claim[0]
    slots = id(sim.nodes[holder].slots)
    pieces = -(-100 * MB // r.piece_sizes["app:1#0"])
    assert sorted(i for _, _, i in marked) == list(range(pieces)) and {s for s, _, _ in marked} == {slots}
    assert (slots, 0) in ended
    stream_end = max(t for t, up in zip(r.piece_log_t, r.piece_log_upstream, strict=True) if up)
    uploads = [i for u, i, t in sent if u == holder and t <= stream_end]
    assert len(uploads) > pieces / 2
    assert len(uploads) - len(set(uploads)) <= 0.05 * len(uploads), uploads


# --- found in review (the second one): each was silently not what the scenario asked for -------------------
def test_waves_are_as_many_as_asked(monkeypatch):
    from p2pcache.sim import engine

    arrivals: list[float] = []
    orig = engine.Simulation.push

    def push(self, t, kind, *rest):
        if kind == engine.ARRIVE:
            arrivals.append(t)
        return orig(self, t, kind, *rest)

    monkeypatch.setattr(engine.Simulation, "push", push)
    simulate(scenario(nodes=7, layers=("2 MB",), rollout={"start": "waves", "waves": 5, "interval": "30 s"}))
    assert sorted(set(arrivals)) == [0, 30, 60, 90, 120]  # 4 waves, the last at 90 s, before


@pytest.mark.parametrize("rollout", [{"start": "waves", "waves": 4, "interval": "10 s"},
                                     {"start": "poisson", "rate": 1}])
def test_churn_kills_as_many_nodes_whatever_the_arrivals(rollout, monkeypatch):
    from p2pcache.sim import engine

    killed: list[int] = []
    orig = engine.Simulation._kill

    def kill(self, node, now):
        if node.alive:
            killed.append(node.id)
        return orig(self, node, now)

    monkeypatch.setattr(engine.Simulation, "_kill", kill)
    sc = scenario(nodes=20, layers=("20 MB",), latency="1 ms", seed=3, rollout=rollout,
                  churn={"kill": 0.5, "between": ["0 s", "5 s"]})
    simulate(sc)
    assert len(killed) == 10  # a kill drawn before a node's arrival was lost (4 and 2 of 10)


def test_kill_claim_holder_before_any_claim_kills_the_first_claimant():
    r = simulate(scenario(nodes=10, latency="1 ms", churn={"kill_claim_holder": "0 s"}))
    assert r.unfinished == 1  # nobody, before: no claim was granted at 0 s


def test_a_node_pulling_one_of_two_images_is_never_below_the_bound():
    doc = {"seed": 1, "cluster": {"nodes": 1, "upload": "1 Gbit/s", "download": "1 Gbit/s", "latency": "1 ms"},
           "upstream": {"bandwidth": "1 Gbit/s"}, "rollout": {"images": "one"},
           "image": [{"name": "a", "layers": ["6 MB"]}, {"name": "b", "layers": ["30 MB"]}]}
    sc = parse_scenario(doc)
    r = simulate(sc)
    assert r.image_bytes == 6 * MB  # image b is pulled by nobody
    assert max(r.pull_seconds) >= lower_bound(sc, r.image_bytes, r.per_node_bytes)
