"""Backoff: full jitter within [0, min(cap, base * 2**(attempt-1))], retry_after honoured up to the cap."""

from __future__ import annotations

import random

from hypothesis import given, strategies as st

from mailingestd.backoff import backoff_ceiling, backoff_delay, retry_delay

attempts = st.integers(min_value=0, max_value=10_000)
bases = st.floats(min_value=0.001, max_value=600)
caps = st.floats(min_value=0.001, max_value=86400)


@given(attempt=attempts, base=bases, cap=caps, seed=st.integers())
def test_delay_stays_within_its_bounds(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))
    if attempt == 0:
        assert delay == 0.0


@given(attempt=attempts, base=bases, cap=caps, retry_after=st.floats(0, 86400 * 7), seed=st.integers())
def test_never_sooner_than_the_server_asked(attempt: int, base: float, cap: float, retry_after: float,
                                            seed: int) -> None:
    delay = retry_delay(attempt, base, cap, random.Random(seed), retry_after)
    assert delay >= min(retry_after, cap)  # a server's number is clamped to the cap (tests/test_outside.py)
    assert delay <= cap


def test_ceiling_doubles_up_to_the_cap() -> None:
    assert [backoff_ceiling(attempt, 5.0, 60.0) for attempt in range(6)] == [0.0, 5.0, 10.0, 20.0, 40.0, 60.0]


def test_jitter_spreads_over_the_whole_range() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(4, 5.0, 900.0, rng) for _ in range(2000)]
    assert min(delays) < 4.0 and max(delays) > 36.0
