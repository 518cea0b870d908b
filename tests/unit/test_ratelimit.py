import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcache.swarm.ratelimit import DownloadShare, TokenBucket


def test_burst_then_paced():
    b = TokenBucket(rate=1000, burst=500)
    assert b.take(500, now=0.0) == 0.0
    assert b.take(100, now=0.0) == pytest.approx(0.1)
    assert b.take(100, now=0.0) == pytest.approx(0.2)  # queued behind the previous taker
    assert b.take(100, now=10.0) == 0.0  # refilled (capped at burst)


def test_more_than_burst_is_paced_not_refused():
    b = TokenBucket(rate=1e6, burst=65536)
    assert b.take(16 << 20, now=0) == pytest.approx(((16 << 20) - 65536) / 1e6)


def test_unlimited():
    b = TokenBucket(rate=None)
    assert b.take(10**12, now=0) == 0.0


def test_bad_rate():
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 10_000)), min_size=1, max_size=50))
def test_long_run_rate_never_exceeds_limit(steps):
    rate, burst = 5000.0, 1000.0
    b = TokenBucket(rate, burst)
    now = 0.0
    sent = 0
    finish = 0.0
    for dt, n in steps:
        now += dt
        delay = b.take(n, now)
        sent += n
        finish = max(finish, now + delay)
    # everything granted by `finish` fits in burst + rate * finish
    assert sent <= burst + rate * finish + 1e-6


def _share_run(peers: list[float | None], upstream: bool, seconds: float = 200.0) -> tuple[float, list[float]]:
    """Drive a DownloadShare of 10 MB/s in virtual time with one greedy upstream stream (if `upstream`) and a
    peer reader per entry of `peers` (its own pace in MB/s, None for greedy); the rates each one got, in MB/s."""
    share = DownloadShare(10e6, now=0.0, ahead=1.0)
    chunk = 100e3
    heap = [(0.0, i) for i in range(len(peers) + 1)]
    got = [0.0] * (len(peers) + 1)
    while heap:
        heap.sort()
        t, who = heap.pop(0)
        if t >= seconds:
            continue
        if who == 0:
            if not upstream:
                continue
            taken, delay = share.upstream(chunk, t)
            if taken:
                got[0] += chunk
            heap.append((t + delay, 0))
        else:
            delay = share.peer(chunk, t)
            got[who] += chunk
            pace = peers[who - 1]
            heap.append((t + max(delay, chunk / (pace * 1e6) if pace else 0.0), who))
    return got[0] / seconds / 1e6, [g / seconds / 1e6 for g in got[1:]]


def test_download_share_upstream_alone_takes_the_whole_limit():
    ups, _ = _share_run([], upstream=True)
    assert ups == pytest.approx(10, rel=0.03)


def test_download_share_greedy_peers_and_stream_get_half_each():
    # a FIFO bucket would give the stream a quarter against three readers; strict priority would starve them
    ups, peers = _share_run([None, None, None], upstream=True)
    assert ups == pytest.approx(5, rel=0.05)
    assert sum(peers) == pytest.approx(5, rel=0.05)


def test_download_share_peer_reads_within_their_half_are_not_slowed_by_the_stream():
    # the case strict priority got wrong: a peer paced at 2 MB/s by its uploader got almost nothing while the
    # stream filled the link, and held the uploader's slot all along
    ups, peers = _share_run([2.0], upstream=True)
    assert peers[0] == pytest.approx(2, rel=0.05)
    assert ups == pytest.approx(8, rel=0.05)


def test_download_share_never_exceeds_the_limit():
    ups, peers = _share_run([None, 3.0], upstream=True, seconds=100.0)
    # over 100 s: at most the limit, plus one burst (1 MB) and the stream's one second ahead (10 MB)
    assert ups + sum(peers) <= 10 + (1 + 10) / 100
    assert ups + sum(peers) >= 9.5


def test_rate_meter_counts_about_the_last_second():
    from p2pcache.swarm.ratelimit import RateMeter

    m = RateMeter(window=1.0, now=0.0)
    for i in range(10):
        m.add(100, i / 10)  # 1000 bytes over the first second
    assert m.rate(0.99) == pytest.approx(1000, rel=0.02)
    assert m.rate(1.5) == pytest.approx(500, rel=0.02)  # half of the last second is the first one's
    assert m.rate(2.0) == 0.0
    m.add(300, 5.0)  # after a pause nothing old is left over
    assert m.rate(5.0) == pytest.approx(300)
