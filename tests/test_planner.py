"""Planner: orders, waits on server limits, backoff, auth circuit breaker, IDLE, lost orders."""

from __future__ import annotations

import copy
import random
from collections import Counter

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailingestd.config import LimitsConfig, SchedulerConfig, ServerLimits
from mailingestd.histogram import LAG_BUCKETS, Histogram
from mailingestd.sched.planner import AccountPlan, AccountState, Order, Planner
from mailingestd.sched.priority import AdaptivePriority, PriorityRules, Tier
from mailingestd.sched.table import adaptive_intervals

SCHEDULER = SchedulerConfig(high_interval=60, medium_interval=300, low_interval=900, idle_safety_interval=900,
                            backoff_base=5, backoff_max=900, auth_failure_limit=3, tick=0.1)
OPEN_LIMITS = LimitsConfig(max_connections_per_server=100_000, connects_per_minute=10**9,
                           max_connections_per_account=2)


def planner_with(accounts: int, limits: LimitsConfig = OPEN_LIMITS, priority: str = "high",
                 server: str = "imap.example") -> Planner:
    planner = Planner(SCHEDULER, limits, now=0.0, rng=random.Random(1))
    for index in range(accounts):
        planner.add(AccountPlan(account_id=f"a{index}", server=server, priority=priority), 0.0)
    return planner


def drain(planner: Planner, until: float, step: float = 0.1, limit: int = 10**9) -> list[tuple[float, Order]]:
    orders, now = [], 0.0
    while now <= until:
        orders += [(now, order) for order in planner.due(now, limit)]
        now = round(now + step, 6)
    return orders


def test_accounts_added_together_are_spread_over_the_first_poll_window() -> None:
    planner = planner_with(10_000, priority="medium")
    orders = drain(planner, 300.0)
    per_tick = Counter(round(order.due_at, 1) for _, order in orders)
    assert sum(per_tick.values()) == 10_000
    assert max(order.due_at for _, order in orders) <= SCHEDULER.first_poll_spread  # connected in seconds
    assert len(per_tick) >= 95 and max(per_tick.values()) < 200  # 10,000 over 100 ticks: about 100 a tick
    wide = Planner(msgspec.structs.replace(SCHEDULER, first_poll_spread=300), OPEN_LIMITS, now=0.0,
                   rng=random.Random(1))
    for index in range(10_000):
        wide.add(AccountPlan(account_id=f"a{index}", server="imap.example", priority="medium"), 0.0)
    per_tick = Counter(round(order.due_at, 1) for _, order in drain(wide, 300.0))
    assert max(per_tick.values()) < 30  # never more than the tier's interval: 3,000 ticks, about 3.3 a tick


def test_a_polled_account_comes_back_after_its_interval_without_a_new_connection() -> None:
    planner = planner_with(1)
    (now, order), = drain(planner, 60.0)
    assert order.need_connect and 0 <= order.lag <= 0.2  # one tick, plus rounding of now / tick
    planner.on_result("a0", now, ok=True, connected=True, idling=False)
    assert planner.state_of("a0") is AccountState.SCHEDULED
    due_at = planner.due_at("a0")
    assert now + 54 <= due_at <= now + 66  # 60 s with 10 % jitter
    again = planner.due(due_at + 0.1, 10)
    assert [o.account_id for o in again] == ["a0"] and not again[0].need_connect


def test_waits_on_a_server_limit_are_visible_and_served_in_order_when_the_bucket_refills() -> None:
    limits = LimitsConfig(servers={"slow.example": ServerLimits(connects_per_minute=6, max_connections_per_server=50)})
    planner = planner_with(20, limits, server="slow.example")
    first = drain(planner, 60.0)
    snapshot = planner.snapshot(60.0)
    server, = snapshot.servers
    # the first due at 0.2 takes the one-token burst (10 s of 6/min), then one every 10 s
    assert len(first) == 6 and server.connections == 6
    assert server.waiting == 14 == snapshot.states["waiting"]
    later = drain_from(planner, 60.1, 200.0)
    assert len(later) == 14 and planner.snapshot(200.0).servers[0].waiting == 0
    ids = [order.account_id for _, order in first + later]
    assert len(set(ids)) == 20
    assert all(order.lag >= 0 for _, order in first + later)


def drain_from(planner: Planner, start: float, until: float) -> list[tuple[float, Order]]:
    orders, now = [], start
    while now <= until:
        orders += [(now, order) for order in planner.due(now, 10**9)]
        now = round(now + 0.1, 6)
    return orders


def test_limit_keeps_the_rest_for_the_next_call() -> None:
    planner = planner_with(100)
    first = planner.due(60.0, 30)
    second = planner.due(60.0, 1000)
    assert len(first) == 30 and len(second) == 70
    assert {o.account_id for o in first}.isdisjoint(o.account_id for o in second)
    assert planner.snapshot().due_backlog == 0


def test_auth_failures_open_the_circuit_until_credentials_change() -> None:
    planner = planner_with(1)
    now = 0.0
    for attempt in range(3):
        (order,) = next_orders(planner, now)
        now = order[0]
        planner.on_result("a0", now, ok=False, failure_kind="auth", connected=False, idling=False)
    assert planner.state_of("a0") is AccountState.AUTH_FAILED
    assert planner.due(now + 10**5, 100) == [] and planner.due_at("a0") is None
    planner.update(AccountPlan(account_id="a0", server="imap.example", priority="high"), now + 10)
    assert planner.state_of("a0") is AccountState.AUTH_FAILED  # same credentials: still open
    planner.update(AccountPlan(account_id="a0", server="imap.example", priority="high",
                               credentials_version="v2"), now + 20)
    assert [o.account_id for o in planner.due(now + 20.1, 10)] == ["a0"]


def next_orders(planner: Planner, now: float, horizon: float = 2000.0) -> list[tuple[float, Order]]:
    while now <= horizon:
        now = round(now + 0.1, 6)
        orders = planner.due(now, 100)
        if orders:
            return [(now, order) for order in orders]
    raise AssertionError("nothing became due")


def test_throttled_honours_retry_after_and_success_resets_backoff() -> None:
    planner = planner_with(1)
    ((now, _),) = next_orders(planner, 0.0)
    planner.on_result("a0", now, ok=False, failure_kind="throttled", retry_after=120.0, connected=False,
                      idling=False)
    assert planner.state_of("a0") is AccountState.BACKOFF and planner.due_at("a0") >= now + 120.0
    ((now, _),) = next_orders(planner, now)
    planner.on_result("a0", now, ok=True, connected=True, idling=False)
    assert planner.state_of("a0") is AccountState.SCHEDULED


def test_idle_needs_only_the_safety_poll_and_losing_it_is_due_at_once() -> None:
    planner = planner_with(1)
    ((now, _),) = next_orders(planner, 0.0)
    planner.on_result("a0", now, ok=True, connected=True, idling=True)
    assert planner.state_of("a0") is AccountState.IDLING and planner.due_at("a0") == now + 900
    planner.on_new_mail("a0", now + 5, 3)
    planner.on_idle("a0", now + 10, idling=False)
    assert [o.account_id for o in planner.due(now + 10, 10)] == ["a0"]
    planner.on_result("a0", now + 11, ok=True, connected=True, idling=True)
    planner.on_connection_closed("a0", now + 20)
    orders = planner.due(now + 20, 10)
    assert [(o.account_id, o.need_connect) for o in orders] == [("a0", True)]


def test_orders_without_results_are_expired_or_requeued() -> None:
    planner = planner_with(3)
    orders = drain(planner, 60.0)
    assert len(orders) == 3 and planner.snapshot().in_flight == 3
    assert planner.requeue(["a0"], 61.0) == 1
    assert planner.state_of("a0") is AccountState.SCHEDULED
    assert planner.expire_orders(61.0, timeout=120.0) == []
    assert sorted(planner.expire_orders(200.0, timeout=120.0)) == ["a1", "a2"]
    assert planner.state_of("a1") is AccountState.BACKOFF
    assert planner.snapshot().servers[0].connections == 0
    assert {o.account_id for o in planner.due(61.1, 10)} == {"a0"}


def test_snapshot_counts_and_lag_histogram() -> None:
    planner = planner_with(50)
    planner.add(AccountPlan(account_id="off", server="imap.example", enabled=False), 0.0)
    planner.add(AccountPlan(account_id="auto", server="other.example"), 0.0)
    drain(planner, 60.0)
    snapshot = planner.snapshot(60.0)
    assert snapshot.accounts == 52 and sum(snapshot.states.values()) == 52
    assert snapshot.states["disabled"] == 1 and snapshot.states["polling"] == 51  # first polls within 10 s
    assert snapshot.tiers == {"high": 50, "medium": 2, "low": 0} and snapshot.auto_accounts == 2
    assert snapshot.lag.count == 51 and sum(snapshot.lag.counts) == 51
    wire = snapshot.lag.to_wire()
    assert 0.0 <= Histogram.quantile(LAG_BUCKETS, wire, 0.5) <= Histogram.quantile(LAG_BUCKETS, wire, 0.99) <= 0.25
    assert len(snapshot.lag.counts) == len(snapshot.lag.bounds) + 1
    assert [s.server for s in snapshot.servers] == ["imap.example", "other.example"]


action = st.one_of(
    st.tuples(st.just("due"), st.floats(0.0, 200.0), st.integers(0, 8)),
    st.tuples(st.just("result"), st.integers(0, 11), st.sampled_from(["ok", "idle", "auth", "throttled",
                                                                       "network", "closed"])),
    st.tuples(st.just("idle_lost"), st.integers(0, 11), st.just(0)),
    st.tuples(st.just("closed"), st.integers(0, 11), st.just(0)),
    st.tuples(st.just("requeue"), st.integers(0, 11), st.just(0)),
    st.tuples(st.just("expire"), st.floats(0.0, 300.0), st.just(0)),
    st.tuples(st.just("toggle"), st.integers(0, 11), st.sampled_from(["disable", "enable", "creds", "server",
                                                                       "remove", "priority"])),
)


@settings(max_examples=70, deadline=None)
@given(actions=st.lists(action, max_size=120), seed=st.integers(0, 2**32))
def test_no_account_is_lost_or_ordered_twice_and_caps_hold(actions: list, seed: int) -> None:
    limits = LimitsConfig(max_connections_per_server=3, connects_per_minute=12, max_connections_per_account=1)
    planner = Planner(SCHEDULER, limits, now=0.0, rng=random.Random(seed))
    rng = random.Random(seed)
    plans = {f"a{i}": AccountPlan(account_id=f"a{i}", server=f"s{i % 2}", priority=("auto", "high", "low")[i % 3])
             for i in range(12)}
    for plan in plans.values():
        planner.add(plan, 0.0)
    now = 0.0
    out: set[str] = set()  # orders out, as the process would see them
    for kind, first, second in actions:
        if kind == "due":
            now += first
            for order in planner.due(now, second):
                assert order.account_id not in out, "ordered twice"
                assert order.lag >= -1e-9
                out.add(order.account_id)
        elif kind == "result" and f"a{first}" in out:
            account_id = f"a{first}"
            out.discard(account_id)
            ok = second in ("ok", "idle")
            planner.on_result(account_id, now, ok=ok, new_messages=rng.randrange(4),
                              failure_kind=None if ok else second, retry_after=rng.choice([None, 30.0]),
                              connected=second in ("ok", "idle"), idling=second == "idle")
        elif kind == "idle_lost":
            planner.on_idle(f"a{first}", now, idling=False)
        elif kind == "closed":
            planner.on_connection_closed(f"a{first}", now)
        elif kind == "requeue":
            planner.requeue([f"a{first}"], now)
            out.discard(f"a{first}")
        elif kind == "expire":
            for account_id in planner.expire_orders(now, first):
                out.discard(account_id)
        elif kind == "toggle":
            account_id = f"a{first}"
            plan = plans[account_id]
            if second == "remove":
                if account_id in planner:
                    planner.remove(account_id)
                else:
                    planner.add(plan, now)
                out.discard(account_id)
                continue
            if account_id not in planner:
                continue
            if second == "disable":
                plan = AccountPlan(**{**to_dict(plan), "enabled": False})
                out.discard(account_id)
            elif second == "enable":
                plan = AccountPlan(**{**to_dict(plan), "enabled": True})
            elif second == "creds":
                plan = AccountPlan(**{**to_dict(plan), "credentials_version": rng.randrange(10**6)})
            elif second == "server":
                plan = AccountPlan(**{**to_dict(plan), "server": "s1" if plan.server == "s0" else "s0"})
                if planner.state_of(account_id) is AccountState.POLLING:
                    out.discard(account_id)
            elif second == "priority":
                plan = AccountPlan(**{**to_dict(plan), "priority": rng.choice(["auto", "high", "medium", "low"])})
            plans[account_id] = plan
            planner.update(plan, now)
        check_invariants(planner, out)
    # Given time and results, every enabled, non-auth-failed account is ordered again.
    for account_id in list(out):
        planner.on_result(account_id, now, ok=True, connected=False, idling=False)
    out.clear()
    seen = set()
    for _ in range(400):
        now += 5.0
        for order in planner.due(now, 10**6):
            assert order.account_id not in out
            seen.add(order.account_id)
            planner.on_result(order.account_id, now, ok=True, connected=False, idling=False)
        check_invariants(planner, out)
    expected = {a for a in planner.account_ids()
                if planner.state_of(a) not in (AccountState.DISABLED, AccountState.AUTH_FAILED)}
    assert expected <= seen


def to_dict(plan: AccountPlan) -> dict:
    return {field: getattr(plan, field) for field in plan.__struct_fields__}


def check_invariants(planner: Planner, out: set[str]) -> None:
    snapshot = planner.snapshot()
    assert sum(snapshot.states.values()) == snapshot.accounts == len(planner)
    assert sum(snapshot.tiers.values()) == snapshot.accounts
    accounts = [(a, planner.state_of(a), planner.server_of(a), planner.holds_slot(a)) for a in planner.account_ids()]
    assert {a for a, state, _, _ in accounts if state is AccountState.POLLING} == out
    assert snapshot.in_flight == len(out)
    in_wheel_states = {AccountState.NEW, AccountState.SCHEDULED, AccountState.IDLING, AccountState.BACKOFF}
    for account_id, state, _, _ in accounts:
        in_wheel = planner.in_wheel(account_id)
        if state in in_wheel_states:
            assert in_wheel or planner.in_due_backlog(account_id), (account_id, state)
        else:
            assert not in_wheel, (account_id, state)
    for account_id in planner.account_ids():  # the arrays the hot path reads mirror the priority objects
        index = planner.index_of(account_id)
        priority = planner._priority[index]
        assert planner._kind[index] == priority.tier | (4 if priority.adaptive else 0)
        if priority.adaptive:
            assert tuple(planner._adaptive[index].tolist()) == (priority.rate, priority.rate_at,
                                                                priority.last_mail_at, priority.changed_at)
    for server in snapshot.servers:
        assert server.connections <= server.max_connections
        on_server = [(state, holds) for _, state, name, holds in accounts if name == server.server]
        assert server.waiting == sum(1 for state, _ in on_server if state is AccountState.WAITING)
        assert server.connections == sum(1 for _, holds in on_server if holds)


def test_batched_adaptive_intervals_match_the_priority_objects() -> None:
    """The planner's numpy pass over adaptive accounts gives what AdaptivePriority.interval gives,
    and flags exactly the accounts that interval would demote."""
    rules = PriorityRules(SCHEDULER)
    rng = random.Random(7)
    demoted = 0
    for _ in range(300):
        priorities = []
        for _ in range(20):
            priority = AdaptivePriority(rules, rng.uniform(0, 5000), Tier(rng.randrange(3)))
            for _ in range(rng.randrange(8)):
                priority.observe(rng.randrange(7), priority.rate_at + rng.uniform(0, 2000))
            if rng.random() < 0.1:
                priority.rate = 0.0
            priorities.append(priority)
        now = max(p.rate_at for p in priorities) + rng.choice([0, 1, 100, 4000])
        if rng.random() < 0.1:
            now = min(p.rate_at for p in priorities)  # rates observed after now are not decayed
        state = [np.array([getattr(p, name) for p in priorities]) for name in
                 ("tier", "rate", "rate_at", "last_mail_at", "changed_at")]
        intervals, demote = adaptive_intervals(rules, now, state[0].astype(np.int8), *state[1:])
        for priority, interval, flagged in zip(priorities, intervals.tolist(), demote.tolist()):
            scalar = copy.copy(priority)
            expected = scalar.interval(now)
            assert flagged == (scalar.tier != priority.tier)
            demoted += flagged
            if not flagged:
                assert interval == pytest.approx(expected, rel=1e-12)  # np.exp may differ from libm by an ulp
    assert demoted > 100


def test_lag_histogram_counts_every_order_however_the_batches_come() -> None:
    bounds = np.array(LAG_BUCKETS)
    limits = LimitsConfig(max_connections_per_server=10**6, connects_per_minute=10**9, max_connections_per_account=2)
    planner = Planner(SCHEDULER, limits, now=0.0, rng=random.Random(3))
    for index in range(70_000):  # due at once: one batch larger than the planner's lag buffer
        planner.add(AccountPlan(account_id=f"a{index}", server="imap.example", priority="high"), 0.0, spread=False)
    for index in range(70_000, 140_000):  # spread over 10 s: many smaller batches
        planner.add(AccountPlan(account_id=f"a{index}", server="imap.example", priority="high"), 0.0)
    lags = []
    now = 0.0
    while now <= 20.0:
        lags.append(planner.due_batch(now, 10**9).lag)
        now = round(now + 0.1, 6)
    lags = np.concatenate(lags)
    assert len(lags) == 140_000
    histogram = planner.snapshot(now).lag
    assert histogram.counts == np.bincount(np.searchsorted(bounds, lags), minlength=len(bounds) + 1).tolist()
    assert histogram.count == 140_000 and histogram.total == pytest.approx(float(lags.sum()))
