"""The idling side of a worker: one Session per account and the timers of its IDLE.

Invariants:

- A session is owned by the worker's loop thread or by exactly one pool job (``busy``), never
  both: the loop unregisters an idling socket before it hands the session to a job.
- ``generation`` counts IDLE entries; a timer entry of an older generation is stale and dropped
  when it surfaces, so leaving and re-entering IDLE never needs a search through the heap.
- :class:`IdleTimers` is pure (no I/O, ``now`` is passed in) and costs O(due log n) a turn.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import random
from typing import Any

from .. import frames
from ..config import AccountConfig

# Renewals and keepalive probes fall in the last RENEW_JITTER of their interval, drawn afresh at
# every IDLE entry: 10,000 sessions that entered IDLE together renew spread over 2 of 10 minutes.
# The first renewal after a login is drawn over the whole interval instead, so connections made
# together (a start, a reconnect storm) renew at the steady rate from the start, not in one wave
# an interval later that the server (and the scheduler) would take all at once.
RENEW_JITTER = 0.2


class Renewal(enum.Enum):
    """Where a renewal the loop runs itself stands (see Worker.advance_renewal)."""

    NONE = 0
    DONE = 1  # DONE and the folder's EXAMINE sent together; IDLE's completion awaited
    EXAMINE = 2  # IDLE completed; the EXAMINE reply awaited
    IDLE = 3  # folder unchanged; IDLE sent, its continuation awaited


class Session:
    """One account's connection. ``busy``: a pool thread owns it (or, with ``renewal`` set, the
    loop's own renewal does); otherwise the loop does.

    While idling: ``renew_at`` is the jittered renewal time, ``keepalive_after`` the jittered
    silence that triggers a probe, ``probe_deadline`` set while our DONE awaits its reply;
    ``generation`` counts IDLE entries (timer entries of older ones are stale).
    """

    __slots__ = ("account", "busy", "checked_at", "client", "fd", "generation", "heard_at", "idle_capable",
                 "idle_folder", "idling", "keepalive_after", "pending_order", "probe_deadline", "renew_at",
                 "renewal", "returns_to_idle", "watches_all")

    def __init__(self, account: AccountConfig) -> None:
        self.account = account
        self.client: Any = None
        self.busy = False
        self.idling = False
        self.returns_to_idle = False  # busy with a job that left IDLE for a moment (a renewal, a push)
        self.renewal = Renewal.NONE  # busy with a renewal the loop runs itself (no pool job)
        self.idle_capable = False
        self.heard_at = 0.0
        self.renew_at = 0.0
        self.keepalive_after = 0.0
        self.probe_deadline: float | None = None
        self.generation = 0
        self.pending_order: frames.Poll | None = None
        self.fd: int | None = None
        self.checked_at = -math.inf  # when every folder was last checked (a poll or a renewal)
        self.watches_all = True  # while idling: the server pushes news of every configured folder
        self.idle_folder: str | None = None  # the folder IDLE runs on (None with NOTIFY)


def held_in_idle(session: Session) -> bool:
    """What the ``idle_connections`` gauge counts: a connection in IDLE, or out of it for the
    moment of a job that started from IDLE (a renewal's DONE/EXAMINE/IDLE, fetching what a push
    announced). Without the second half the gauge would dip by the renewals in progress (10,000
    sessions renew about 17 times a second) and never read the number of accounts held."""
    return session.idling or (session.busy and session.returns_to_idle)


class IdleTimers:
    """When each idling session next leaves IDLE: at its renewal, or after its keepalive silence.

    A heap of (due_at, seq, generation, session) with lazy deletion: an entry whose generation is
    not the session's, or whose session is busy, not idling or already probing, is dropped when
    it surfaces; one whose session was heard from since is pushed back to its new time. Every
    turn costs O(due log n), never a scan of all sessions. Pure: no I/O, ``now`` is passed in.
    """

    def __init__(self, renew_after: float, keepalive: float, rng: random.Random | None = None) -> None:
        self.renew_after = renew_after
        self.keepalive = keepalive
        self.random = (rng or random.Random()).random
        self.heap: list[tuple[float, int, int, Session]] = []
        self.seq = itertools.count()

    def start(self, session: Session, now: float, connected: bool = False) -> None:
        """The session (re)entered IDLE at ``now``; ``connected``: on a connection made for it."""
        session.generation += 1
        session.heard_at = now
        session.probe_deadline = None
        spread = 1.0 if connected else RENEW_JITTER
        session.renew_at = now + self.renew_after * (1.0 - spread * self.random())
        session.keepalive_after = self.keepalive * (1.0 - RENEW_JITTER * self.random())
        self._push(session, self.due_at(session))

    @staticmethod
    def due_at(session: Session) -> float:
        return min(session.renew_at, session.heard_at + session.keepalive_after)

    def due(self, now: float, limit: int) -> list[Session]:
        """Up to ``limit`` idling sessions whose renewal or keepalive probe is due, earliest first."""
        heap = self.heap
        found: list[Session] = []
        while heap and heap[0][0] <= now and len(found) < limit:
            _, _, generation, session = heapq.heappop(heap)
            if (generation != session.generation or session.busy or not session.idling
                    or session.probe_deadline is not None):
                continue
            due_at = self.due_at(session)
            if due_at > now:
                self._push(session, due_at)
            else:
                found.append(session)
        return found

    def compact(self, live: int) -> None:
        """Drop stale entries once they outnumber the live ones (sessions re-entering IDLE often)."""
        if len(self.heap) > 2 * live + 1024:
            self.heap = [entry for entry in self.heap if entry[2] == entry[3].generation and entry[3].idling]
            heapq.heapify(self.heap)

    def _push(self, session: Session, due_at: float) -> None:
        heapq.heappush(self.heap, (due_at, next(self.seq), session.generation, session))
