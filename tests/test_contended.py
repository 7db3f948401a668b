"""A contended server: more accounts than its connection cap (docs/contended-servers.md).

The planner's part with a fake clock (who holds, who rotates, who gets a freed slot, who is late
when the limits cannot carry the tiers), then the whole daemon against a polling-only Dovecot.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict

import pytest

from mailingestd.config import LimitsConfig, SchedulerConfig
from mailingestd.planner import AccountPlan, Planner
from mailingestd.ratelimit import ServerShare, deficit_line, share_server

TIERED = SchedulerConfig(high_interval=10, medium_interval=20, low_interval=40, tick=0.1, jitter=0.1,
                         first_poll_spread=2)


def contended_planner(cap: int, rate: int, tiers: dict[str, int]) -> Planner:
    limits = LimitsConfig(max_connections_per_server=cap, connects_per_minute=rate, max_connections_per_account=2)
    planner = Planner(TIERED, limits, now=0.0, rng=random.Random(7))
    for tier, count in tiers.items():
        for n in range(count):
            planner.add(AccountPlan(account_id=f"{tier}{n}", server="imap.example", priority=tier), 0.0)
    return planner


def simulate(planner: Planner, until: float, session: float = 0.3, cap: int | None = None,
             step: float = 0.1) -> dict[str, list[tuple[float, float, bool]]]:
    """Run orders and results on a fake clock: every poll takes ``session`` seconds; an order with
    ``release`` logs out, the others keep their connection. Returns, per account, (due_at, ordered
    at, release) of every order; asserts the planner never has more than ``cap`` connections open."""
    orders: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    finishing: list[tuple[float, str, bool]] = []
    connected: set[str] = set()
    now = 0.0
    while now <= until:
        while finishing and finishing[0][0] <= now:
            _, account_id, release = heapq.heappop(finishing)
            if release:
                connected.discard(account_id)
            planner.on_result(account_id, now, ok=True, connected=not release, idling=False)
        for order in planner.due(now, 10_000):
            orders[order.account_id].append((order.due_at, now, order.release))
            if order.need_connect:
                connected.add(order.account_id)
            heapq.heappush(finishing, (now + session, order.account_id, order.release))
        if cap is not None:
            assert len(connected) <= cap
        now = round(now + step, 6)
    return orders


def worst_gap(times: list[tuple[float, float, bool]], after: float) -> float:
    """The longest time between two polls of one account after ``after`` (its first poll's start)."""
    started = [ordered for _, ordered, _ in times if ordered >= after]
    return max((b - a for a, b in zip(started, started[1:])), default=float("inf"))


def test_the_often_polled_accounts_hold_connections_and_the_rarely_polled_rotate() -> None:
    # 20 high (10 s), 60 medium (20 s), 40 low (40 s) behind a cap of 90: the high and medium
    # accounts keep their connections, low ones log in for each poll; every tier on time.
    planner = contended_planner(90, 600, {"high": 20, "medium": 60, "low": 40})
    orders = simulate(planner, 200.0, cap=90)
    late = [a for a in orders if worst_gap(orders[a], 40.0) > {"h": 10, "m": 20, "l": 40}[a[0]] * 1.15 + 0.5]
    assert not late, late[:10]
    share = planner.share_of("imap.example")
    rotating = set()
    for account_id, times in orders.items():
        released = [release for _, ordered, release in times if ordered >= 40.0]
        assert all(released) or not any(released), account_id  # the choice is stable
        if all(released):
            rotating.add(account_id)
    # The low tier rotates, the first low accounts fill the connections left after the reserve.
    assert len(rotating) == share.rotating and all(account_id.startswith("low") for account_id in rotating)
    assert share.holders == 90 - share.reserve and share.rotating == 120 - share.holders
    assert share.polls_needed == pytest.approx(20 * 6 + 60 * 3 + 40 * 1.5)
    assert share.polls_possible == pytest.approx(share.polls_needed) and not any(share.late)


def test_a_freed_slot_goes_to_the_nearest_deadline_not_the_first_in_line() -> None:
    # Cap 1, taken by low0; low1 starts waiting before high0, but when the slot frees, high0's
    # deadline (due + 10 s) is nearer than low1's (due + 40 s).
    planner = contended_planner(1, 600, {})
    for account_id, tier in (("low0", "low"), ("low1", "low"), ("high0", "high")):
        planner.add(AccountPlan(account_id=account_id, server="imap.example", priority=tier), 0.0, spread=False)
    assert [order.account_id for order in planner.due(0.0, 10)] == ["low0"]
    assert planner.due(1.0, 10) == []
    planner.on_result("low0", 2.0, ok=True, connected=False, idling=False)
    assert [order.account_id for order in planner.due(2.0, 10)] == ["high0"]


def test_overloaded_limits_make_the_lowest_tier_late_and_say_so() -> None:
    # 10 high, 40 medium, 100 low behind a cap of 30 and 120 logins a minute: 330 polls/min
    # wanted; 28 hold connections, and the 122 rotating would need 216 logins a minute of the 108
    # they may use. High and medium keep their intervals, the low tier is late (about 3.6 times
    # its interval) but polled: nothing starves.
    planner = contended_planner(30, 120, {"high": 10, "medium": 40, "low": 100})
    orders = simulate(planner, 700.0, cap=30)
    share = planner.share_of("imap.example")
    assert share.polls_needed == pytest.approx(10 * 6 + 40 * 3 + 100 * 1.5)
    assert share.polls_possible == pytest.approx(10 * 6 + 18 * 3 + 108)  # 10 high, 18 medium hold
    assert share.late == [0, 0, 100]
    gaps = {tier: sorted(worst_gap(orders[f"{tier}{n}"], 200.0) for n in range(count))
            for tier, count in (("high", 10), ("medium", 40), ("low", 100))}
    assert gaps["high"][-1] <= 10 * 1.5 + 2 and gaps["medium"][-1] <= 20 * 1.5 + 2, gaps
    assert 40 * 1.5 < gaps["low"][len(gaps["low"]) // 2] and gaps["low"][-1] < 40 * 3.6 * 1.5, gaps["low"]
    line = deficit_line("imap.example", share.polls_needed, share.polls_possible, share.late)
    assert line.startswith(f"imap.example: needs {share.polls_needed:,.0f} polls/min, limits allow ")
    assert line.endswith(f"{share.late[2]:,} low accounts will be late")


def test_the_worked_example_of_the_docs() -> None:
    # docs/contended-servers.md: 10,000 accounts (500 high at 1 m, 7,000 medium at 5 m, 2,500 low
    # at 15 m) on one server, 100 connections, 200 connects a minute, 1 s a rotating session.
    intervals = [60.0] * 500 + [300.0] * 7000 + [900.0] * 2500
    tiers = [0] * 500 + [1] * 7000 + [2] * 2500
    share = share_server(intervals, tiers, cap=100, connects_per_minute=200, session_seconds=1.0)
    assert isinstance(share, ServerShare)
    assert round(share.polls_needed) == 500 + 1400 + 167
    assert share.reserve == 6 and share.holders == 94 and share.rotating == 9906
    assert round(share.polls_possible) == 94 + 180
    assert share.late == [406, 7000, 2500]
    assert deficit_line("imap.example", share.polls_needed, share.polls_possible, share.late) == (
        "imap.example: needs 2,067 polls/min, limits allow 274: "
        "406 high, 7,000 medium and 2,500 low accounts will be late")
