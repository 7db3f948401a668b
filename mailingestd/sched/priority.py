"""Polling priority: fixed tiers, and adaptive ones for ``priority = "auto"`` accounts.

Tiers are high, medium and low with base intervals ``high_interval``, ``medium_interval`` and
``low_interval`` from ``[scheduler]``. A fixed priority polls at exactly its tier's interval. An
adaptive one moves between tiers and, inside its tier, scales the interval by its mail rate.

Adaptive rules (every decision takes ``now``, monotonic seconds):

- Promotion: ``promote_messages`` messages within ``promote_window`` (a sliding window over the
  last arrivals) move the account up one tier, and the arrivals are forgotten, so one burst
  promotes by one tier only; a further promotion needs a further full burst.
- Demotion: ``demote_after`` seconds with no mail AND ``demote_after`` since the last tier change
  move it down one tier, and the next demotion needs another ``demote_after``.
- Hysteresis: the two conditions are far apart, so mail arriving steadily at any pace between
  them (fewer than ``promote_messages`` per window, but never ``demote_after`` of silence) leaves
  the tier alone; a promoted account stays promoted for at least ``demote_after``.
- Rate: an exponentially weighted arrival rate ``rate`` (messages per second) with time constant
  ``promote_window``: each message adds ``1 / promote_window`` and the sum decays by
  ``exp(-elapsed / promote_window)``. A new account starts at one message per medium interval,
  so it begins at its tier's base interval.
- Interval inside the tier: with ``m = rate * base_interval`` (messages expected per base
  interval), the interval is ``base_interval * clamp(1 / sqrt(m), 0.5, 1.5)``: one message per
  interval polls at the base, four or more halve it, fewer than 0.44 stretch it by half; a rate of
  zero gives the stretched end. The bounds keep tiers apart (with the defaults high polls every
  30-90 s, medium 150-450 s, low 450-1350 s).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from ..config import SchedulerConfig

SHORTEST_FACTOR = 0.5
LONGEST_FACTOR = 1.5


def decayed_rate(rate, rate_at, now: float, window: float):
    """The arrival rate measured at ``rate_at`` as it stands at ``now`` (EWMA over ``window``); no
    decay when it was measured at or after ``now`` (exp(-0.0) is exactly 1). Floats or arrays."""
    return rate * np.exp(np.maximum(now - rate_at, 0.0) / -window)


def scaled_interval(base, rate):
    """The interval inside a tier: ``base * clamp(1 / sqrt(rate * base), SHORTEST_FACTOR,
    LONGEST_FACTOR)``; a rate of 0 (or anything below 1 / LONGEST_FACTOR**2 per interval) gives the
    longest. The one formula for a single priority and for the planner's arrays (floats or arrays)."""
    factor = 1.0 / np.sqrt(np.maximum(rate * base, 1e-300))
    return base * np.minimum(np.maximum(factor, SHORTEST_FACTOR), LONGEST_FACTOR)


class Tier(IntEnum):
    """Polling tiers, fastest first (promotion lowers the number)."""

    HIGH = 0
    MEDIUM = 1
    LOW = 2


TIER_BY_NAME = {tier.name.lower(): tier for tier in Tier}


class PriorityRules:
    """The tier intervals and promotion rules, and a census of accounts per tier."""

    __slots__ = ("intervals", "promote_messages", "promote_window", "demote_after", "tier_counts")

    def __init__(self, config: SchedulerConfig) -> None:
        self.intervals = (float(config.high_interval), float(config.medium_interval),
                          float(config.low_interval))
        self.promote_messages = max(1, config.promote_messages)
        self.promote_window = max(float(config.promote_window), 1e-9)
        self.demote_after = float(config.demote_after)
        self.tier_counts = [0, 0, 0]

    def reconfigure(self, config: SchedulerConfig) -> None:
        """New intervals and thresholds after a reload; the census is kept."""
        counts = self.tier_counts
        self.__init__(config)
        self.tier_counts = counts


class FixedPriority:
    """A tier chosen by the operator: exactly its tier's interval, whatever the mail does.

    Stateless, so one instance per tier is shared by every account that has it.
    """

    __slots__ = ("tier", "rules", "fixed_interval")
    adaptive = False

    def __init__(self, tier: Tier, rules: PriorityRules) -> None:
        self.tier = tier
        self.rules = rules
        # The interval without a call, for the planner's hot path (None on adaptive priorities);
        # refresh() after the rules change.
        self.fixed_interval = rules.intervals[tier]

    def refresh(self) -> None:
        """Pick up the rules' intervals after a reload."""
        self.fixed_interval = self.rules.intervals[self.tier]

    def interval(self, now: float) -> float:
        """Seconds from one poll to the next."""
        return self.rules.intervals[self.tier]

    def observe(self, count: int, now: float) -> None:
        """Mail seen; a fixed priority ignores it."""


class AdaptivePriority:
    """The tier and arrival rate of one ``auto`` account (see the module docstring for the rules)."""

    __slots__ = ("tier", "rules", "rate", "rate_at", "arrivals", "last_mail_at", "changed_at")
    adaptive = True
    fixed_interval = None

    def __init__(self, rules: PriorityRules, now: float, tier: Tier = Tier.MEDIUM) -> None:
        self.rules = rules
        self.tier = tier
        self.rate = 1.0 / rules.intervals[Tier.MEDIUM]
        self.rate_at = now
        # Times of the most recent arrivals, at most promote_messages of them; None when empty.
        self.arrivals: list[float] | None = None
        self.last_mail_at = now
        self.changed_at = now

    def current_rate(self, now: float) -> float:
        """Messages per second, exponentially weighted over ``promote_window``."""
        return float(decayed_rate(self.rate, self.rate_at, now, self.rules.promote_window))

    def observe(self, count: int, now: float) -> None:
        """``count`` new messages seen at ``now``: feeds the rate and may promote one tier."""
        if count <= 0:
            return
        rules = self.rules
        self.rate = self.current_rate(now) + count / rules.promote_window
        self.rate_at = now
        self.last_mail_at = now
        needed = rules.promote_messages
        arrivals = self.arrivals
        if arrivals is None:
            arrivals = self.arrivals = []
        arrivals.extend([now] * min(count, needed))
        if len(arrivals) > needed:
            del arrivals[:-needed]
        if len(arrivals) == needed and now - arrivals[0] <= rules.promote_window:
            if self.tier > Tier.HIGH:
                self._move(Tier(self.tier - 1), now)
            self.arrivals = None

    def interval(self, now: float) -> float:
        """Seconds to the next poll; demotes one tier first if the account has been quiet."""
        rules = self.rules
        tier = self.tier
        if (tier < Tier.LOW and now - self.last_mail_at >= rules.demote_after
                and now - self.changed_at >= rules.demote_after):
            tier = Tier(tier + 1)
            self._move(tier, now)
        return float(scaled_interval(rules.intervals[tier], self.current_rate(now)))

    def _move(self, tier: Tier, now: float) -> None:
        counts = self.rules.tier_counts
        counts[self.tier] -= 1
        counts[tier] += 1
        self.tier = tier
        self.changed_at = now


def make_priority(name: str, rules: PriorityRules, now: float,
                  fixed: dict[Tier, FixedPriority] | None = None) -> FixedPriority | AdaptivePriority:
    """The priority object for an account's ``priority`` setting ("auto", "high", "medium", "low").

    ``fixed`` caches the shared fixed instances; the new priority is counted in the census.
    """
    if name == "auto":
        priority: FixedPriority | AdaptivePriority = AdaptivePriority(rules, now)
    else:
        try:
            tier = TIER_BY_NAME[name]
        except KeyError:
            raise ValueError(f"unknown priority {name!r} (expected auto, high, medium or low)") from None
        if fixed is None:
            priority = FixedPriority(tier, rules)
        else:
            priority = fixed.get(tier) or fixed.setdefault(tier, FixedPriority(tier, rules))
    rules.tier_counts[priority.tier] += 1
    return priority


def forget_priority(priority: FixedPriority | AdaptivePriority) -> None:
    """Take a priority out of the census (its account was removed or changed priority)."""
    priority.rules.tier_counts[priority.tier] -= 1
