"""Token bucket and per-server connection limits (the batched admission the planner uses), with a fake clock."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from mailingestd.config import LimitsConfig, SchedulerConfig, ServerLimits
from mailingestd.sched.planner import AccountPlan, AccountState, Planner
from mailingestd.sched.ratelimit import ConnectionLimits, TokenBucket


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
    tight = limits.server("tight.example", 0.0)
    assert tight.limits.max_connections_per_server == 1
    assert tight.limits.connects_per_minute == 600
    assert tight.admit_many(1, 0.0) == 1
    assert tight.admit_many(1, 0.0) == 0  # the server is full
    assert limits.server("other.example", 0.0).admit_many(2, 0.0) == 2
    tight.release_many(1)
    tight.release_many(1)  # a second release does not go below zero
    assert tight.open_connections == 0
    assert tight.admit_many(1, 0.0) == 1
    status = limits.status("tight.example", 0.0)
    assert (status.connections, status.max_connections, status.connects_per_minute) == (1, 1, 600)
    # An account cap of 0 admits nothing.
    closed = ConnectionLimits(LimitsConfig(max_connections_per_account=0)).server("s", 0.0)
    assert closed.admit_many(1, 0.0) == 0 and closed.open_connections == 0


def test_an_account_with_a_connection_is_never_admitted_a_second() -> None:
    """The account's cap as the planner applies it: an account holding a connection polls on it,
    without a new admission, even when its server is full or its bucket empty."""
    limits = LimitsConfig(max_connections_per_server=1, connects_per_minute=6, max_connections_per_account=1)
    planner = Planner(SchedulerConfig(high_interval=60, jitter=0.0), limits, now=0.0, rng=random.Random(1))
    planner.add(AccountPlan(account_id="a", server="s", priority="high"), 0.0, spread=False)
    planner.add(AccountPlan(account_id="b", server="s", priority="high"), 0.0, spread=False)
    first = planner.due(0.1, 10)
    assert [(order.account_id, order.need_connect) for order in first] == [("a", True)]
    planner.on_result("a", 0.2, ok=True, connected=True, idling=False)
    again = planner.due(61.0, 10)
    assert [(order.account_id, order.need_connect) for order in again] == [("a", False)]
    assert planner.snapshot(61.0).servers[0].connections == 1 and planner.state_of("b") is AccountState.WAITING


def test_rate_refusal_when_the_bucket_is_empty() -> None:
    limits = ConnectionLimits(LimitsConfig(connects_per_minute=6, max_connections_per_server=100),
                              burst_seconds=10.0)
    server = limits.server("s", 0.0)
    assert server.admit_many(1, 0.0) == 1
    assert server.admit_many(1, 0.0) == 0  # the bucket is empty
    assert server.connect_bucket.wait_time(0.0) == 10.0
    assert server.admit_many(1, 10.0) == 1


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
            name, _ = open_connections.pop(rng.randrange(len(open_connections)))
            limits.server(name, now).release_many(1)
        elif (server, account) not in open_connections:  # the planner asks only for accounts holding none
            for _ in range(limits.server(server, now).admit_many(1, now)):
                open_connections.append((server, account))
        for name in ("s1", "s2"):
            assert limits.server(name, now).open_connections == sum(1 for s, _ in open_connections if s == name)
            assert limits.server(name, now).open_connections <= max_server
            for who in "abcd":
                assert sum(1 for entry in open_connections if entry == (name, who)) <= min(1, max_account)
