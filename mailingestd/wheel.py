"""A hierarchical timing wheel of (due_at, key): O(1) amortised schedule, cancel and advance.

Time is cut into ticks of ``tick`` seconds; a key due at ``due_at`` belongs to tick
``ceil(due_at / tick)``, so it is handed out by the first ``advance(now)`` with ``now`` at or past
that tick's end: never early, at most one tick late.

Level 0 has ``slots`` buckets of one tick each; level k has ``slots`` buckets of ``slots**k``
ticks. A key goes to the lowest level whose span reaches its tick, and when the cursor enters a
level-k bucket its keys cascade down (Varghese and Lauck's scheme, as in the Linux kernel timers).
With the defaults (0.1 s, 4096 slots) level 0 spans 6.8 minutes and level 1 19 days; further
levels are added when a key needs them.

Cancelling and re-scheduling are lazy: the wheel keeps ``key -> due_at`` as the truth, and a
bucket entry whose key is gone or now belongs to another tick is skipped when its bucket is
reached. Stale entries are counted and the buckets rebuilt once they outnumber the live keys, so
memory stays within twice the live set. Keys are any hashable (the planner uses its account
objects, which hash by identity).
"""

from __future__ import annotations

import math
from math import ceil as _ceil
from typing import Hashable

DEFAULT_SLOTS = 4096


class TimingWheel:
    """Keys with due times; ``advance(now)`` hands out every key due by ``now``, each once."""

    __slots__ = ("tick", "slots", "_levels", "_cursor", "_due_at", "_overdue", "_stale")

    def __init__(self, tick: float, now: float, slots: int = DEFAULT_SLOTS) -> None:
        if tick <= 0:
            raise ValueError("tick must be positive")
        if slots < 2:
            raise ValueError("slots must be at least 2")
        self.tick = float(tick)
        self.slots = slots
        self._levels: list[list[list[Hashable]]] = [[[] for _ in range(slots)]]
        # Every tick before the cursor has been handed out; the cursor's tick has not.
        self._cursor = math.floor(now / self.tick) + 1
        self._due_at: dict[Hashable, float] = {}
        # Keys scheduled for a tick already handed out: returned first by the next advance.
        self._overdue: list[Hashable] = []
        self._stale = 0

    def __len__(self) -> int:
        return len(self._due_at)

    def __contains__(self, key: object) -> bool:
        return key in self._due_at

    def due_at(self, key: Hashable) -> float | None:
        """When the key is due, or None when it is not in the wheel."""
        return self._due_at.get(key)

    def schedule(self, key: Hashable, due_at: float) -> None:
        """Put the key in the wheel at ``due_at``, moving it if it is already there."""
        due_map = self._due_at
        if key in due_map:
            self._stale += 1
            if self._stale > len(due_map) + self.slots:
                self._rebuild()
        due_map[key] = due_at
        due_tick = _ceil(due_at / self.tick)
        offset = due_tick - self._cursor
        if 0 <= offset < self.slots:  # the common case, inlined
            self._levels[0][due_tick % self.slots].append(key)
        else:
            self._place(key, due_tick)

    def cancel(self, key: Hashable) -> bool:
        """Take the key out of the wheel; False when it was not there."""
        if self._due_at.pop(key, None) is None:
            return False
        self._stale += 1
        return True

    def advance(self, now: float) -> list[Hashable]:
        """Every key with ``due_at <= now`` (tick granularity), in due order per tick, each once.

        The keys leave the wheel; schedule them again for their next turn.
        """
        due_map = self._due_at
        tick = self.tick
        ceil = math.ceil
        cursor = self._cursor
        handed_out: list[Hashable] = []
        if self._overdue:
            overdue, self._overdue = self._overdue, []
            for key in overdue:
                due = due_map.get(key)
                if due is not None and ceil(due / tick) < cursor:
                    del due_map[key]
                    handed_out.append(key)
                else:
                    self._stale -= 1
        last_tick = math.floor(now / tick)
        if last_tick < cursor:
            return handed_out
        if not due_map:
            self._cursor = last_tick + 1
            self._clear_buckets()
            return handed_out
        slots = self.slots
        level0 = self._levels[0]
        cascading = len(self._levels) > 1
        while cursor <= last_tick:
            index = cursor % slots
            if cascading and index == 0:
                self._cursor = cursor  # _place measures from it
                self._cascade(cursor)
            bucket = level0[index]
            if bucket:
                level0[index] = []
                for key in bucket:
                    due = due_map.get(key)
                    if due is not None and ceil(due / tick) == cursor:
                        del due_map[key]
                        handed_out.append(key)
                    else:
                        self._stale -= 1
            cursor += 1
        self._cursor = cursor
        return handed_out

    def next_due(self) -> float | None:
        """The earliest due_at in the wheel (may be in the past), or None when it is empty."""
        due_map = self._due_at
        if not due_map:
            return None
        tick = self.tick
        cursor = self._cursor
        earliest = min((due_map[key] for key in self._overdue
                        if key in due_map and math.ceil(due_map[key] / tick) < cursor), default=None)
        if earliest is not None:
            return earliest
        for level, buckets in enumerate(self._levels):
            span = self.slots ** level
            first = -(-cursor // span)  # the first bucket not yet cascaded (or, at level 0, handed out)
            for bucket_id in range(first, first + self.slots):
                bucket = buckets[bucket_id % self.slots]
                live = [due_map[key] for key in bucket
                        if key in due_map and math.ceil(due_map[key] / tick) // span == bucket_id]
                if live:
                    low = min(live)
                    earliest = low if earliest is None else min(earliest, low)
                    break
        return earliest

    def _place(self, key: Hashable, due_tick: int) -> None:
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
        due_map = self._due_at
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
                    due = due_map.get(key)
                    if due is not None and math.ceil(due / tick) // span == bucket_id:
                        self._place(key, math.ceil(due / tick))
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
        for key, due in self._due_at.items():
            self._place(key, math.ceil(due / tick))
