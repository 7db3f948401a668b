"""The planner's per-account arrays: one record per account, and the batched passes over them.

``Planner`` (planner.py) holds the rules: which state follows which result, who may connect,
who waits. This module holds how the accounts are stored so that those rules run over a whole
batch of accounts in a few numpy operations: an account is an integer index into parallel
arrays; the fields a decision reads together sit in one 32-byte record (one cache line holds
two accounts), the rest in side arrays grown with it. Nothing here knows a state's meaning
beyond counting, or a tier's beyond indexing.
"""

from __future__ import annotations

import math
import operator
from collections import deque

import numpy as np

from .priority import (
    AdaptivePriority,
    FixedPriority,
    PriorityRules,
    decayed_rate,
    scaled_interval,
)
from .states import POLLING, AccountState

# The fields of an account that the hot paths read and write together, one 32-byte record per
# account, so a decision about an account touches one cache line of them, not one per array.
ACCOUNT = np.dtype([("due_at", np.float64), ("ordered_at", np.float64), ("failures", np.int32),
                    ("auth_failures", np.int32), ("server", np.int32), ("state", np.int8),
                    ("holds_slot", np.bool_), ("live", np.bool_), ("kind", np.int8)])
# Both failure counts as one 8-byte field, to reset them in one step.
_FAILURE_COUNTS = np.dtype({"names": ["both"], "formats": [np.int64], "offsets": [ACCOUNT.fields["failures"][1]],
                            "itemsize": ACCOUNT.itemsize})
# kind: the priority's tier, with ADAPTIVE_KIND set for adaptive priorities.
TIER_BITS = 3
ADAPTIVE_KIND = 4
LOW = 2  # the lowest tier, as a plain int (numpy compares it much faster than an IntEnum)
ADAPTIVE_FIELDS = ("rate", "rate_at", "last_mail_at", "changed_at")
_ADAPTIVE_STATE = operator.attrgetter(*ADAPTIVE_FIELDS)


class AccountTable:
    """Parallel per-account arrays, grown by doubling (``reserve``); indexes are never reused.

    ``state``, ``due_at``, ... are views of the records' fields; ``adaptive`` holds a copy of each
    adaptive priority's state (``ADAPTIVE_FIELDS``) for ``adaptive_intervals``; ``rotates``: the
    account rotates on a contended server; ``stretch``: the factor on its interval when its
    server's limits cannot carry its tier (1.0: on time).
    """

    def __init__(self) -> None:
        self.records = _account_records(0)
        self.adaptive = np.zeros((0, len(ADAPTIVE_FIELDS)))
        self.rotates = np.zeros(0, dtype=bool)
        self.stretch = np.ones(0)
        self._bind()

    def __len__(self) -> int:
        return len(self.records)

    def reserve(self, capacity: int) -> bool:
        """Room for ``capacity`` accounts; True when the arrays were replaced (views change)."""
        old = len(self.records)
        if capacity <= old:
            return False
        size = max(capacity, 2 * old, 64)
        records = _account_records(size)
        records[:old] = self.records
        adaptive = np.zeros((size, len(ADAPTIVE_FIELDS)))
        adaptive[:old] = self.adaptive
        rotates = np.zeros(size, dtype=bool)
        rotates[:old] = self.rotates
        stretch = np.ones(size)
        stretch[:old] = self.stretch
        self.records, self.adaptive, self.rotates, self.stretch = records, adaptive, rotates, stretch
        self._bind()
        return True

    def _bind(self) -> None:
        records = self.records
        self.live = records["live"]
        self.state = records["state"]
        self.server = records["server"]
        self.due_at = records["due_at"]
        self.ordered_at = records["ordered_at"]
        self.holds_slot = records["holds_slot"]
        self.failures = records["failures"]
        self.auth_failures = records["auth_failures"]
        self.failure_counts = records.view(_FAILURE_COUNTS)["both"]
        self.kind = records["kind"]

    def set_priority(self, index: int, priority: FixedPriority | AdaptivePriority) -> None:
        """Copy what the hot paths read of the account's priority into the arrays; call it after
        every call that may change an adaptive priority (observe, interval, a new priority)."""
        if priority.fixed_interval is None:
            self.kind[index] = priority.tier | ADAPTIVE_KIND
            self.adaptive[index] = _ADAPTIVE_STATE(priority)
        else:
            self.kind[index] = priority.tier

    def set_adaptive(self, indexes: np.ndarray, priorities: list[AdaptivePriority]) -> None:
        """``set_priority`` for many adaptive priorities at once."""
        self.kind[indexes] = [priority.tier | ADAPTIVE_KIND for priority in priorities]
        self.adaptive[indexes] = list(map(_ADAPTIVE_STATE, priorities))

    def tiers(self, indexes: np.ndarray | slice) -> np.ndarray:
        return self.kind[indexes] & TIER_BITS

    def schedulable(self, count: int) -> np.ndarray:
        """Mask of the first ``count`` accounts that are planned and neither disabled nor auth_failed."""
        state = self.state[:count]
        return self.live[:count] & (state != AccountState.DISABLED) & (state != AccountState.AUTH_FAILED)

    def census(self, count: int) -> np.ndarray:
        """Planned accounts by state and tier: ``counts[state, tier]``, in one pass."""
        live = self.live[:count]
        codes = self.state[:count][live].astype(np.int64) * 3 + (self.kind[:count][live] & TIER_BITS)
        return np.bincount(codes, minlength=3 * len(AccountState)).reshape(len(AccountState), 3)


class OrdersOut:
    """The orders out, for expiry: (ordered_at, indexes) chunks in time order. An entry is
    current while its account is polling with that ordered_at, else stale (dropped by ``expire``
    or by compaction once stale entries outnumber the accounts)."""

    def __init__(self) -> None:
        self._chunks: deque[tuple[float, np.ndarray]] = deque()
        self._entries = 0

    def add(self, ordered_at: float, indexes: np.ndarray, table: AccountTable, accounts: int) -> None:
        self._chunks.append((ordered_at, indexes))
        self._entries += len(indexes)
        if self._entries > 2 * accounts + 4096:
            self._compact(table)

    def expire(self, now: float, timeout: float, table: AccountTable) -> list[int]:
        """The accounts still polling on an order out for ``timeout`` seconds or more (taken out)."""
        expired: list[int] = []
        chunks = self._chunks
        while chunks and chunks[0][0] + timeout <= now:
            ordered_at, indexes = chunks.popleft()
            self._entries -= len(indexes)
            expired += indexes[self._current(ordered_at, indexes, table) & table.live[indexes]].tolist()
        return expired

    @staticmethod
    def _current(ordered_at: float, indexes: np.ndarray, table: AccountTable) -> np.ndarray:
        return (table.state[indexes] == POLLING) & (table.ordered_at[indexes] == ordered_at)

    def _compact(self, table: AccountTable) -> None:
        compacted: deque[tuple[float, np.ndarray]] = deque()
        entries = 0
        for ordered_at, indexes in self._chunks:
            current = indexes[self._current(ordered_at, indexes, table)]
            if len(current):
                compacted.append((ordered_at, current))
                entries += len(current)
        self._chunks = compacted
        self._entries = entries


def _account_records(size: int) -> np.ndarray:
    """``size`` zeroed account records, the first on a cache-line boundary."""
    raw = np.zeros(size * ACCOUNT.itemsize + 64, dtype=np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + size * ACCOUNT.itemsize].view(ACCOUNT)


def kind_intervals(rules: PriorityRules) -> np.ndarray:
    """The poll interval of each kind: a fixed priority's tier interval; NaN when adaptive."""
    intervals = np.full(2 * ADAPTIVE_KIND, math.nan)
    intervals[:len(rules.intervals)] = rules.intervals
    return intervals


def has_repeats(index: np.ndarray) -> bool:
    """Whether an account index appears twice."""
    ordered = np.sort(index)
    return bool((ordered[1:] == ordered[:-1]).any())


def adaptive_intervals(rules: PriorityRules, now: float, tier: np.ndarray, rate: np.ndarray,
                       rate_at: np.ndarray, last_mail_at: np.ndarray, changed_at: np.ndarray,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``AdaptivePriority.interval(now)`` for many accounts in one numpy pass, from their state as
    arrays (the same ``decayed_rate`` and ``scaled_interval``). Also returns the mask of accounts
    due for a demotion (``demote_after`` of silence and since their last tier change): their
    intervals here are wrong until ``interval`` itself demotes them."""
    # now - max(a, b) is the smaller of now - a and now - b (rounding is monotonic).
    demote = (now - np.maximum(last_mail_at, changed_at) >= rules.demote_after) & (tier < LOW)
    return scaled_interval(np.array(rules.intervals)[tier], decayed_rate(rate, rate_at, now, rules.promote_window)), demote
