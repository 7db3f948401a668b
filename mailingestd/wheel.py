"""A hierarchical timing wheel of (due_at, key): O(1) amortised schedule, cancel and advance.

Keys are small non-negative integers (the planner's account indexes), so the truth about every
key is one slot of a float array (``due_at``, NaN when the key is not in the wheel) and the
buckets hold plain ints; batches of keys are scheduled and handed out as numpy arrays, which is
what lets the planner decide for a whole tick at once instead of one account at a time.

Time is cut into ticks of ``tick`` seconds; a key due at ``due_at`` belongs to tick
``ceil(due_at / tick)``, so it is handed out by the first ``advance(now)`` with ``now`` at or past
that tick's end: never early, at most one tick late.

Level 0 has ``slots`` buckets of one tick each; level k has ``slots`` buckets of ``slots**k``
ticks. A key goes to the lowest level whose span reaches its tick, and when the cursor enters a
level-k bucket its keys cascade down (Varghese and Lauck's scheme, as in the Linux kernel timers).
With the defaults (0.1 s, 4096 slots) level 0 spans 6.8 minutes and level 1 19 days; further
levels are added when a key needs them.

Cancelling and re-scheduling are lazy: a bucket entry whose key is gone or now belongs to another
tick is skipped when its bucket is reached. Stale entries are counted and the buckets rebuilt
once they outnumber the live keys, so memory stays within twice the live set.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_SLOTS = 4096
_EMPTY = np.empty(0, dtype=np.int64)


class TimingWheel:
    """Integer keys with due times; ``advance(now)`` hands out every key due by ``now``, each once."""

    __slots__ = ("tick", "slots", "_levels", "_cursor", "_due", "_count", "_overdue", "_stale")

    def __init__(self, tick: float, now: float, slots: int = DEFAULT_SLOTS, capacity: int = 64) -> None:
        if tick <= 0:
            raise ValueError("tick must be positive")
        if slots < 2:
            raise ValueError("slots must be at least 2")
        self.tick = float(tick)
        self.slots = slots
        self._levels: list[list[list[int]]] = [[[] for _ in range(slots)]]
        # Every tick before the cursor has been handed out; the cursor's tick has not.
        self._cursor = math.floor(now / self.tick) + 1
        self._due = np.full(max(1, capacity), np.nan)
        self._count = 0
        # Keys scheduled for a tick already handed out: returned first by the next advance.
        self._overdue: list[int] = []
        self._stale = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and 0 <= key < len(self._due) and not math.isnan(self._due[key])

    def due_at(self, key: int) -> float | None:
        """When the key is due, or None when it is not in the wheel."""
        if not 0 <= key < len(self._due):
            return None
        due = float(self._due[key])
        return None if math.isnan(due) else due

    def reserve(self, capacity: int) -> None:
        """Make room for keys below ``capacity`` (grows by doubling)."""
        if capacity > len(self._due):
            grown = np.full(max(capacity, 2 * len(self._due)), np.nan)
            grown[:len(self._due)] = self._due
            self._due = grown

    def schedule(self, key: int, due_at: float) -> None:
        """Put the key in the wheel at ``due_at``, moving it if it is already there."""
        self.reserve(key + 1)
        if math.isnan(self._due[key]):
            self._count += 1
        else:
            self._note_stale(1)
        self._due[key] = due_at
        self._place(key, math.ceil(due_at / self.tick))

    def schedule_many(self, keys: np.ndarray, due_ats: np.ndarray) -> None:
        """``schedule`` for an array of distinct keys at once."""
        if not len(keys):
            return
        due = self._due
        present = int(np.count_nonzero(~np.isnan(due[keys])))
        self._count += len(keys) - present
        if present:
            self._note_stale(present)
        due[keys] = due_ats
        ticks = np.ceil(due_ats / self.tick).astype(np.int64)
        offsets = ticks - self._cursor
        near = (offsets >= 0) & (offsets < self.slots)
        level0 = self._levels[0]
        if near.all():
            for key, index in zip(keys.tolist(), (ticks % self.slots).tolist()):
                level0[index].append(key)
            return
        for key, index in zip(keys[near].tolist(), (ticks[near] % self.slots).tolist()):
            level0[index].append(key)
        far = ~near
        for key, due_tick in zip(keys[far].tolist(), ticks[far].tolist()):
            self._place(key, due_tick)

    def cancel(self, key: int) -> bool:
        """Take the key out of the wheel; False when it was not there."""
        if key >= len(self._due) or math.isnan(self._due[key]):
            return False
        self._due[key] = np.nan
        self._count -= 1
        self._stale += 1
        return True

    def advance(self, now: float) -> np.ndarray:
        """Every key with ``due_at <= now`` (tick granularity), in tick order, each once.

        The keys leave the wheel; schedule them again for their next turn.
        """
        parts: list[np.ndarray] = []
        if self._overdue:
            overdue, self._overdue = self._overdue, []
            self._take(np.array(overdue, dtype=np.int64), None, parts)
        last_tick = math.floor(now / self.tick)
        cursor = self._cursor
        slots = self.slots
        level0 = self._levels[0]
        cascading = len(self._levels) > 1
        while cursor <= last_tick and self._count:
            index = cursor % slots
            if cascading and index == 0:
                self._cursor = cursor  # _place measures from it
                self._cascade(cursor)
            bucket = level0[index]
            if bucket:
                level0[index] = []
                self._take(np.array(bucket, dtype=np.int64), cursor, parts)
            cursor += 1
        if cursor <= last_tick:  # the wheel ran empty: nothing but stale entries is left
            cursor = last_tick + 1
            self._clear_buckets()
        self._cursor = cursor
        if not parts:
            return _EMPTY
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def next_due(self) -> float | None:
        """The earliest due_at in the wheel (may be in the past), or None when it is empty."""
        if not self._count:
            return None
        due = self._due
        tick = self.tick
        cursor = self._cursor
        overdue = [float(due[key]) for key in self._overdue
                   if not math.isnan(due[key]) and math.ceil(due[key] / tick) < cursor]
        if overdue:
            return min(overdue)
        earliest = None
        for level, buckets in enumerate(self._levels):
            span = self.slots ** level
            first = -(-cursor // span)  # the first bucket not yet cascaded (or, at level 0, handed out)
            for bucket_id in range(first, first + self.slots):
                bucket = buckets[bucket_id % self.slots]
                if not bucket:
                    continue
                times = due[np.array(bucket, dtype=np.int64)]
                live = times[np.ceil(times / tick) // span == bucket_id]  # NaN compares False
                if len(live):
                    low = float(live.min())
                    earliest = low if earliest is None else min(earliest, low)
                    break
        return earliest

    def _take(self, keys: np.ndarray, cursor: int | None, parts: list[np.ndarray]) -> None:
        """Hand out the live keys of one bucket (or of the overdue list when ``cursor`` is None)."""
        due = self._due
        ticks = np.ceil(due[keys] / self.tick)
        live = ticks < self._cursor if cursor is None else ticks == cursor  # NaN (gone) is neither
        taken = keys[live]
        if self._stale and len(taken) > 1:
            # A key moved away and back can sit in one bucket twice: hand it out once.
            unique, first = np.unique(taken, return_index=True)
            if len(unique) != len(taken):
                taken = taken[np.sort(first)]
        self._stale -= len(keys) - len(taken)
        due[taken] = np.nan
        self._count -= len(taken)
        if len(taken):
            parts.append(taken)

    def _note_stale(self, count: int) -> None:
        self._stale += count
        if self._stale > self._count + self.slots:
            self._rebuild()

    def _place(self, key: int, due_tick: int) -> None:
        cursor = self._cursor
        delta = due_tick - cursor
        slots = self.slots
        if delta < slots:
            if delta < 0:
                self._overdue.append(key)
            else:
                self._levels[0][due_tick % slots].append(key)
            return
        level = 1
        span = slots
        while delta >= span * slots:
            level += 1
            span *= slots
        while level >= len(self._levels):
            self._levels.append([[] for _ in range(slots)])
        self._levels[level][(due_tick // span) % slots].append(key)

    def _cascade(self, cursor: int) -> None:
        """Move the keys of every higher-level bucket that starts at ``cursor`` down a level."""
        slots = self.slots
        due = self._due
        tick = self.tick
        span = slots
        level = 1
        while level < len(self._levels) and cursor % span == 0:
            buckets = self._levels[level]
            bucket_id = cursor // span
            index = bucket_id % slots
            bucket = buckets[index]
            if bucket:
                buckets[index] = []
                for key in bucket:
                    key_due = due[key]
                    if not math.isnan(key_due) and math.ceil(key_due / tick) // span == bucket_id:
                        self._place(key, math.ceil(key_due / tick))
                    else:
                        self._stale -= 1
            level += 1
            span *= slots

    def _clear_buckets(self) -> None:
        for buckets in self._levels:
            for index, bucket in enumerate(buckets):
                if bucket:
                    buckets[index] = []
        self._overdue = []
        self._stale = 0

    def _rebuild(self) -> None:
        """Drop stale entries: re-place every live key from the truth."""
        self._clear_buckets()
        tick = self.tick
        due = self._due
        for key in np.flatnonzero(~np.isnan(due)).tolist():
            self._place(key, math.ceil(due[key] / tick))
