"""A timing wheel of (due_at, key) kept as a calendar of numpy blocks: O(1) amortised schedule,
cancel and advance, with no per-key Python work on the batched paths.

Keys are small non-negative integers (the planner's account indexes), so the truth about every
key is one slot of a float array (``due_at``, NaN when the key is not in the wheel); batches of
keys are scheduled and handed out as numpy arrays, which is what lets the planner decide for a
whole tick at once instead of one account at a time.

Time is cut into ticks of ``tick`` seconds; a key due at ``due_at`` belongs to tick
``ceil(due_at / tick)``, so it is handed out by the first ``advance(now)`` with ``now`` at or past
that tick's end: never early, at most one tick late.

Ticks are grouped into blocks of ``slots`` ticks (64 by default: 6.4 s at 0.1 s). Keys due after
the current block are appended, with their ticks, as whole arrays to a pending list; when the
cursor enters a block that pending keys fall in, they are sorted into per-block chunks (one numpy
sort, one list append per block touched), and each block's chunks are sorted by tick once when
the cursor enters it, so each ``advance`` hands out a slice. Keys scheduled into the current block
after that (short backoffs, accounts due at once) go to small per-tick lists, and keys due before
the cursor to an overdue list handed out first. Blocks far ahead cost nothing until reached, so
there are no levels and no cascades.

Cancelling and re-scheduling are lazy: an entry is live only while its key is still due in the
tick the entry was filed under (checked against ``due_at`` when handed out); other entries are
skipped. Stale entries are counted and everything is re-filed from the truth once they
outnumber the live keys, so memory stays within about twice the live set.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_SLOTS = 64
_EMPTY = np.empty(0, dtype=np.int64)
_NEVER = 1 << 62  # a tick after every real one


class TimingWheel:
    """Integer keys with due times; ``advance(now)`` hands out every key due by ``now``, each once."""

    __slots__ = ("_block_end", "_block_start", "_blocks", "_bounds", "_count", "_cursor", "_due", "_earliest", "_near",
                 "_overdue", "_pending", "_pending_keys", "_pending_min", "_pending_ticks", "_run", "_run_ticks",
                 "_stale", "slots", "tick")

    def __init__(self, tick: float, now: float, slots: int = DEFAULT_SLOTS, capacity: int = 64) -> None:
        if tick <= 0:
            raise ValueError("tick must be positive")
        if slots < 2:
            raise ValueError("slots must be at least 2")
        self.tick = float(tick)
        self.slots = slots  # ticks per block
        # Every tick before the cursor has been handed out; the cursor's tick has not.
        self._cursor = math.floor(now / self.tick) + 1
        self._due = np.full(max(1, capacity), np.nan)
        self._count = 0
        self._stale = 0  # entries that no longer stand for a key where they are filed
        # next_due's answer while nothing could have raised it (NaN: not known, compute it again).
        # Scheduling only lowers it; taking out or moving the earliest key forgets it.
        self._earliest = math.nan
        # Keys scheduled for a tick already handed out: returned first by the next advance.
        self._overdue: list[int] = []
        # Later blocks: block number -> chunks of (keys, ticks) filed there.
        self._blocks: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        # Keys due at or after _block_end not yet filed into _blocks (arrays, and single keys),
        # and the earliest tick among them.
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_keys: list[int] = []
        self._pending_ticks: list[int] = []
        self._pending_min = _NEVER
        self._open_block(self._cursor)

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
        if key >= len(self._due):
            self.reserve(key + 1)
        due = self._due
        old = due[key]
        present = not math.isnan(old)
        due[key] = due_at
        earliest = self._earliest
        if present and old <= earliest < due_at:
            self._earliest = math.nan  # the earliest key moved later
        elif due_at < earliest or not self._count:
            self._earliest = float(due_at)
        if not present:
            self._count += 1
        elif self._note_stale(1):
            return  # re-filed from the truth, this key with the rest
        self._place(key, math.ceil(due_at / self.tick))

    def schedule_many(self, keys: np.ndarray, due_ats: np.ndarray) -> None:
        """``schedule`` for an array of distinct keys at once."""
        if not len(keys):
            return
        due = self._due
        old = due[keys]
        present = len(keys) - int(np.count_nonzero(np.isnan(old)))
        earliest = self._earliest
        if present and float(np.nanmin(old)) <= earliest:
            self._earliest = math.nan  # the earliest key may have moved later
        elif not self._count:
            self._earliest = float(due_ats.min())
        elif not math.isnan(earliest):  # known: the new keys can only lower it
            self._earliest = min(earliest, float(due_ats.min()))
        self._count += len(keys) - present
        due[keys] = due_ats
        if present and self._note_stale(present):
            return
        ticks = np.ceil(due_ats / self.tick).astype(np.int64)
        block_end = self._block_end
        first = int(ticks.min())
        if first >= block_end:  # the usual case: all due after the current block
            self._pending.append((np.array(keys, dtype=np.int64), ticks))
            self._pending_min = min(self._pending_min, first)
            return
        later = ticks >= block_end
        if later.any():
            later_ticks = ticks[later]
            self._pending.append((keys[later].astype(np.int64), later_ticks))
            self._pending_min = min(self._pending_min, int(later_ticks.min()))
        soon = ~later
        for key, due_tick in zip(keys[soon].tolist(), ticks[soon].tolist()):
            self._place(key, due_tick)

    def cancel(self, key: int) -> bool:
        """Take the key out of the wheel; False when it was not there."""
        if key >= len(self._due) or math.isnan(self._due[key]):
            return False
        if self._due[key] <= self._earliest:
            self._earliest = math.nan
        self._due[key] = np.nan
        self._count -= 1
        self._note_stale(1)
        return True

    def advance(self, now: float) -> np.ndarray:
        """Every key with ``due_at <= now`` (tick granularity), in tick order, each once.

        The keys leave the wheel; schedule them again for their next turn.
        """
        parts: list[np.ndarray] = []
        if self._overdue:
            overdue, self._overdue = self._overdue, []
            keys = np.array(overdue, dtype=np.int64)
            self._take(keys, None, parts)
        last_tick = math.floor(now / self.tick)
        cursor = self._cursor
        while cursor <= last_tick and self._count:
            if cursor >= self._block_end:
                cursor = self._next_block(cursor, last_tick)
                continue
            last = min(last_tick, self._block_end - 1)
            start = self._block_start
            bounds = self._bounds
            low, high = bounds[cursor - start], bounds[last + 1 - start]
            near = self._near
            if near and min(near) <= last:
                if last == cursor:  # one tick (the usual advance): its slice of the run, then its list
                    self._take(np.concatenate((self._run[low:high], np.array(near.pop(cursor), dtype=np.int64))),
                               cursor, parts)
                else:
                    keys, ticks = self._with_near(low, high, last)
                    self._take(keys, ticks, parts)
            elif high > low:
                self._take(self._run[low:high], cursor if last == cursor else self._run_ticks[low:high], parts)
            cursor = last + 1
        if cursor <= last_tick:  # the wheel ran empty: nothing but stale entries is left
            cursor = last_tick + 1
            self._clear(cursor)
        self._cursor = cursor
        if not parts:
            return _EMPTY
        self._earliest = math.nan  # the earliest keys were taken out
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def next_due(self) -> float | None:
        """The earliest due_at in the wheel (may be in the past), or None when it is empty.

        Remembered between calls: a loop that asks every turn pays for it only after keys were
        taken out or the earliest one moved, not once per turn."""
        if not self._count:
            return None
        earliest = self._earliest
        if math.isnan(earliest):  # not known
            earliest = self._earliest = float(np.nanmin(self._due))
        return earliest

    # -- internals -------------------------------------------------------------------------------

    def _take(self, keys: np.ndarray, ticks: np.ndarray | int | None, parts: list[np.ndarray]) -> None:
        """Hand out the live entries: those filed under their key's current tick (``ticks``: per
        entry, or one for all; None for the overdue list: keys due before the cursor)."""
        due = self._due
        current = np.ceil(due[keys] / self.tick)
        live = current < self._cursor if ticks is None else current == ticks  # NaN (gone) is neither
        taken = keys[live]
        if self._stale and len(taken) > 1:
            # A key moved away and back can be filed under one tick twice: hand it out once.
            unique, first = np.unique(taken, return_index=True)
            if len(unique) != len(taken):
                taken = taken[np.sort(first)]
        self._stale -= len(keys) - len(taken)
        if len(taken):
            due[taken] = np.nan
            self._count -= len(taken)
            parts.append(taken)

    def _with_near(self, low: int, high: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """The entries of ticks up to ``last`` from the block's sorted run and its per-tick lists
        (taken out of them), in tick order."""
        near = self._near
        keys = [self._run[low:high]]
        ticks = [self._run_ticks[low:high]]
        for near_tick in sorted(near):
            if near_tick > last:
                break
            near_keys = near.pop(near_tick)
            keys.append(np.array(near_keys, dtype=np.int64))
            ticks.append(np.full(len(near_keys), near_tick, dtype=np.int64))
        all_keys = np.concatenate(keys)
        all_ticks = np.concatenate(ticks)
        order = np.argsort(all_ticks, kind="stable")
        return all_keys[order], all_ticks[order]

    def _place(self, key: int, due_tick: int) -> None:
        if due_tick < self._cursor:
            self._overdue.append(key)
        elif due_tick < self._block_end:
            near = self._near.get(due_tick)
            if near is None:
                self._near[due_tick] = [key]
            else:
                near.append(key)
        else:
            self._pending_keys.append(key)
            self._pending_ticks.append(due_tick)
            self._pending_min = min(self._pending_min, due_tick)

    def _pending_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = [keys for keys, _ in self._pending]
        ticks = [ticks for _, ticks in self._pending]
        if self._pending_keys:
            keys.append(np.array(self._pending_keys, dtype=np.int64))
            ticks.append(np.array(self._pending_ticks, dtype=np.int64))
        if not keys:
            return _EMPTY, _EMPTY
        return (keys[0], ticks[0]) if len(keys) == 1 else (np.concatenate(keys), np.concatenate(ticks))

    def _file_pending(self) -> None:
        """Sort the pending keys into their blocks' chunks."""
        keys, ticks = self._pending_arrays()
        self._pending = []
        self._pending_keys = []
        self._pending_ticks = []
        self._pending_min = _NEVER
        if not len(keys):
            return
        blocks = ticks // self.slots
        first = int(blocks.min())
        if int(blocks.max()) - first < 1 << 16:  # the usual case: a radix sort of small numbers
            order = np.argsort((blocks - first).astype(np.uint16), kind="stable")
        else:
            order = np.argsort(blocks, kind="stable")
        keys, ticks, blocks = keys[order], ticks[order], blocks[order]
        edges = (np.flatnonzero(blocks[1:] != blocks[:-1]) + 1).tolist()
        filed = self._blocks
        low = 0
        for high, block in zip(edges + [len(keys)], blocks[[0] + edges].tolist()):
            chunk = (keys[low:high], ticks[low:high])
            chunks = filed.get(block)
            if chunks is None:
                filed[block] = [chunk]
            else:
                chunks.append(chunk)
            low = high

    def _next_block(self, cursor: int, last_tick: int) -> int:
        """Enter the block holding ``cursor`` (or skip to the next one with entries, when that
        is not past ``last_tick``); returns the cursor."""
        slots = self.slots
        block = cursor // slots
        if block not in self._blocks and self._pending_min >= (block + 1) * slots:
            later = min(min(self._blocks, default=_NEVER), self._pending_min // slots)
            cursor = last_tick + 1 if later * slots > last_tick else later * slots
            block = cursor // slots
        if self._pending_min < (block + 1) * slots:
            self._file_pending()
        self._open_block(cursor)
        return cursor

    def _open_block(self, cursor: int) -> None:
        """Make the block holding ``cursor`` current: its chunks sorted by tick into one run."""
        slots = self.slots
        block = cursor // slots
        start = block * slots
        self._block_start = start
        self._block_end = start + slots
        self._near: dict[int, list[int]] = {}
        chunks = self._blocks.pop(block, None)
        if chunks is None:
            self._set_run(_EMPTY, _EMPTY, start)
        elif len(chunks) == 1:
            self._set_run(*chunks[0], start)
        else:
            self._set_run(np.concatenate([keys for keys, _ in chunks]),
                          np.concatenate([ticks for _, ticks in chunks]), start)

    def _set_run(self, keys: np.ndarray, ticks: np.ndarray, start: int) -> None:
        """Make ``keys``, filed under ``ticks`` of the block starting at ``start``, its run."""
        if len(keys):
            offsets = ticks - start  # below slots
            order = np.argsort(offsets.astype(np.uint8 if self.slots <= 256 else np.uint32), kind="stable")
            self._run = keys[order]
            self._run_ticks = ticks[order]
        else:
            self._run = self._run_ticks = _EMPTY
        self._bounds = np.searchsorted(self._run_ticks, np.arange(start, start + self.slots + 1)).tolist()

    def _note_stale(self, count: int) -> bool:
        """Count entries gone stale (their key's due_at already updated); True when that made
        the wheel re-file every key."""
        self._stale += count
        if self._stale > self._count + self.slots:
            self._rebuild()
            return True
        return False

    def _clear(self, cursor: int) -> None:
        self._overdue = []
        self._blocks = {}
        self._pending = []
        self._pending_keys = []
        self._pending_ticks = []
        self._pending_min = _NEVER
        self._stale = 0
        self._cursor = cursor
        self._open_block(cursor)

    def _rebuild(self) -> None:
        """Drop stale entries: re-file every live key from the truth."""
        due = self._due
        keys = np.flatnonzero(~np.isnan(due))
        ticks = np.ceil(due[keys] / self.tick).astype(np.int64)
        cursor = self._cursor
        self._clear(cursor)
        overdue = ticks < cursor
        self._overdue = keys[overdue].tolist()
        current = ~overdue & (ticks < self._block_end)
        self._set_run(keys[current], ticks[current], self._block_start)
        later = ticks >= self._block_end
        if later.any():
            self._pending.append((keys[later], ticks[later]))
            self._pending_min = int(ticks[later].min())

