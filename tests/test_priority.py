"""Adaptive priority: promotion after a burst, demotion when quiet, no flapping, fixed stays fixed."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from mailingestd.config import SchedulerConfig
from mailingestd.sched.priority import AdaptivePriority, PriorityRules, Tier, make_priority

CONFIG = SchedulerConfig(high_interval=60, medium_interval=300, low_interval=900, promote_messages=5,
                         promote_window=900, demote_after=3600)


def test_a_burst_promotes_one_tier_only() -> None:
    rules = PriorityRules(CONFIG)
    priority = AdaptivePriority(rules, now=0.0, tier=Tier.LOW)
    priority.observe(4, 10.0)
    assert priority.tier == Tier.LOW
    priority.observe(1, 20.0)
    assert priority.tier == Tier.MEDIUM
    priority.observe(3, 30.0)
    assert priority.tier == Tier.MEDIUM  # the burst that promoted is spent
    priority.observe(2, 40.0)
    assert priority.tier == Tier.HIGH


def test_messages_spread_wider_than_the_window_do_not_promote() -> None:
    priority = AdaptivePriority(PriorityRules(CONFIG), now=0.0)
    for index in range(20):
        priority.observe(1, index * 250.0)  # 4 per 1000 s: never 5 within 900 s
    assert priority.tier == Tier.MEDIUM


def test_quiet_demotes_one_tier_per_demote_after() -> None:
    rules = PriorityRules(CONFIG)
    priority = make_priority("auto", rules, 0.0)
    priority.observe(5, 0.0)
    assert priority.tier == Tier.HIGH and rules.tier_counts == [1, 0, 0]
    priority.interval(3599.0)
    assert priority.tier == Tier.HIGH
    priority.interval(3600.0)
    assert priority.tier == Tier.MEDIUM
    priority.interval(3600.0 + 3599.0)
    assert priority.tier == Tier.MEDIUM
    priority.interval(7200.0)
    assert priority.tier == Tier.LOW and rules.tier_counts == [0, 0, 1]
    priority.interval(100000.0)
    assert priority.tier == Tier.LOW


def test_fixed_priorities_stay_fixed_and_are_shared() -> None:
    rules = PriorityRules(CONFIG)
    shared: dict = {}
    high = make_priority("high", rules, 0.0, shared)
    assert make_priority("high", rules, 0.0, shared) is high
    high.observe(1000, 1.0)
    assert high.tier == Tier.HIGH and high.interval(10**6) == 60.0
    assert rules.tier_counts == [2, 0, 0]


def test_interval_stays_inside_the_tier_bounds_and_follows_the_rate() -> None:
    priority = AdaptivePriority(PriorityRules(CONFIG), now=0.0)
    assert priority.interval(0.0) == 300.0  # the prior: one message per medium interval
    assert priority.interval(10**6) == 900.0 * 1.5  # quiet for long: demoted, stretched
    busy = AdaptivePriority(PriorityRules(CONFIG), now=0.0, tier=Tier.HIGH)
    busy.observe(4, 0.0)
    assert busy.interval(0.0) > 60.0  # 5 messages per 900 s is slow for a 60 s tier: stretched
    busy.observe(40, 1.0)
    assert 30.0 <= busy.interval(1.0) < 60.0  # about 3 per interval: shortened


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(min_value=226.0, max_value=3599.0), min_size=1, max_size=60),
       start=st.sampled_from(list(Tier)))
def test_no_flapping_between_the_thresholds(gaps: list[float], start: Tier) -> None:
    """Mail one message at a time, never 5 within 900 s, never 3600 s apart: the tier never moves."""
    priority = AdaptivePriority(PriorityRules(CONFIG), now=0.0, tier=start)
    now = 0.0
    for gap in gaps:
        now += gap
        priority.observe(1, now)
        priority.interval(now)
        assert priority.tier == start


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.tuples(st.floats(0, 7200), st.integers(0, 8)), max_size=80))
def test_tier_changes_are_separated_and_bounded(events: list[tuple[float, int]]) -> None:
    rules = PriorityRules(CONFIG)
    priority = make_priority("auto", rules, 0.0)
    now, tier, last_change, last_direction = 0.0, priority.tier, 0.0, 0
    for gap, count in events:
        now += gap
        priority.observe(count, now)
        interval = priority.interval(now)
        base = CONFIG_INTERVALS[priority.tier]
        assert base * 0.5 <= interval <= base * 1.5
        if priority.tier != tier:
            direction = 1 if priority.tier > tier else -1
            assert abs(priority.tier - tier) <= 2 and (direction < 0 or now - last_change >= 3600)
            if direction > 0 and last_direction < 0:
                assert now - last_change >= 3600  # a promotion is kept at least demote_after
            tier, last_change, last_direction = priority.tier, now, direction
        assert sum(rules.tier_counts) == 1 and rules.tier_counts[priority.tier] == 1


CONFIG_INTERVALS = {Tier.HIGH: 60.0, Tier.MEDIUM: 300.0, Tier.LOW: 900.0}
