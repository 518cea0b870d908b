import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcache.swarm.ratelimit import TokenBucket


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
