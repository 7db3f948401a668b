"""Retry delays: exponential backoff with full jitter, a cap, and the server's own retry_after.

Full jitter (delay drawn uniformly from [0, min(cap, base * 2**(attempt-1))]) spreads the retries
of many accounts that failed together (a server restart drops thousands of connections at once),
so they do not come back in one wave. A server that names a time to wait (``[THROTTLED]``,
Office 365's "Suggested Backoff Time") is not retried sooner than it asked, up to the cap: a
server's number is input from outside, and one reply of 10**21 milliseconds must not park an
account for ever (nor overflow the timing wheel), so it is clamped to [0, cap] and a non-finite
one counts as the cap (NaN as no request).
"""

from __future__ import annotations

import math
import random

# 2**64 times any sane base is past every cap; stops float overflow for absurd attempt counts.
_MAX_EXPONENT = 64


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """The upper bound of the jittered delay for the ``attempt``-th consecutive failure (1-based)."""
    if attempt < 1:
        return 0.0
    return min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after the ``attempt``-th consecutive failure: uniform in [0, ceiling].

    ``attempt`` 0 (no failure) gives 0; the ceiling doubles from ``base`` per attempt up to ``cap``.
    """
    return rng.random() * backoff_ceiling(attempt, base, cap)


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random,
                retry_after: float | None = None) -> float:
    """The backoff delay, but never less than a server-requested ``retry_after`` (seconds) clamped
    to [0, ``cap``]."""
    delay = backoff_delay(attempt, base, cap, rng)
    if retry_after is None or math.isnan(retry_after):
        return delay
    return max(delay, min(max(float(retry_after), 0.0), cap))
