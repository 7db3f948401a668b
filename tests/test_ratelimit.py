"""Token bucket and per-server connection limits, with a fake clock."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from mailingestd.config import LimitsConfig, ServerLimits
from mailingestd.sched.ratelimit import ConnectionLimits, Refusal, TokenBucket


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 600), burst=st.integers(1, 50),
       gaps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=300))
def test_bucket_never_grants_more_than_rate_plus_burst_over_any_window(rate: int, burst: int,
                                                                       gaps: list[float]) -> None:
    now = 0.0
    bucket = TokenBucket(rate, burst, now)
    granted_at = []
    for gap in gaps:
        now += gap
        if bucket.try_take(now):
            granted_at.append(now)
    for first in range(len(granted_at)):
        for last in range(first, len(granted_at)):
            window = granted_at[last] - granted_at[first]
            assert last - first + 1 <= burst + rate * window / 60.0 + 1e-6


def test_wait_time_says_when_the_next_token_comes() -> None:
    bucket = TokenBucket(60, 2, now=0.0)
    assert bucket.try_take(0.0) and bucket.try_take(0.0) and not bucket.try_take(0.0)
    assert bucket.wait_time(0.0) == 1.0
    assert bucket.wait_time(0.25) == 0.75
    assert not bucket.try_take(0.9)
    assert bucket.try_take(1.0)
    assert TokenBucket(0, 0, 0.0).wait_time(5.0) == float("inf")


def test_per_server_overrides_and_refusals() -> None:
    limits = ConnectionLimits(LimitsConfig(
        max_connections_per_server=3, connects_per_minute=600, max_connections_per_account=1,
        servers={"tight.example": ServerLimits(max_connections_per_server=1)}))
    assert limits.limits_for("tight.example").max_connections_per_server == 1
    assert limits.limits_for("tight.example").connects_per_minute == 600
    assert limits.admit("tight.example", "a", 0.0)
    assert limits.refusal("tight.example", "b", 0.0) is Refusal.SERVER_FULL
    assert not limits.admit("tight.example", "b", 0.0)
    assert limits.admit("other.example", "a", 0.0)
    assert limits.refusal("other.example", "a", 0.0) is Refusal.ACCOUNT_FULL
    limits.release("tight.example", "a")
    limits.release("tight.example", "a")  # a second release does not go below zero
    assert limits.connections("tight.example") == 0
    assert limits.admit("tight.example", "b", 0.0)
    status = limits.status("tight.example", 0.0)
    assert (status.connections, status.max_connections, status.connects_per_minute) == (1, 1, 600)


def test_rate_refusal_when_the_bucket_is_empty() -> None:
    limits = ConnectionLimits(LimitsConfig(connects_per_minute=6, max_connections_per_server=100),
                              burst_seconds=10.0)
    assert limits.admit("s", "a", 0.0)
    assert limits.refusal("s", "b", 0.0) is Refusal.RATE
    assert limits.wait_time("s", 0.0) == 10.0
    assert limits.admit("s", "b", 10.0)


@settings(max_examples=150, deadline=None)
@given(max_server=st.integers(0, 6), max_account=st.integers(0, 3), seed=st.integers(),
       steps=st.integers(1, 300))
def test_concurrency_caps_are_never_exceeded(max_server: int, max_account: int, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    limits = ConnectionLimits(LimitsConfig(max_connections_per_server=max_server, connects_per_minute=120,
                                           max_connections_per_account=max_account))
    open_connections: list[tuple[str, str]] = []
    now = 0.0
    for _ in range(steps):
        now += rng.random()
        server, account = rng.choice(["s1", "s2"]), rng.choice("abcd")
        if open_connections and rng.random() < 0.4:
            limits.release(*open_connections.pop(rng.randrange(len(open_connections))))
        elif limits.admit(server, account, now):
            open_connections.append((server, account))
        for name in ("s1", "s2"):
            assert limits.connections(name) == sum(1 for s, _ in open_connections if s == name) <= max_server
            for who in "abcd":
                assert limits.account_connections(name, who) <= max_account
