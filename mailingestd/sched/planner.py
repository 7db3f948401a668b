"""The scheduling rules of every account: when to poll it, and whether its server lets it connect.

The scheduler process feeds a ``Planner`` account definitions (``add``, ``update``, ``remove``)
and worker reports, and asks it for work: ``due_batch(now, limit)`` hands out an ``OrderBatch``
and ``on_results`` classifies a turn's results in one call. The scheduler process and
bench/scheduler_bench.py drive it through these same two calls; ``due`` and ``on_result`` are
their one-account forms (a result the batch does not take, and the tests). ``on_idle``,
``on_new_mail`` and ``on_connection_closed`` report single events. No I/O and no clock: every
call that depends on time takes ``now`` (monotonic seconds).

Parts: a ``TimingWheel`` of due accounts, per-server connection limits (ratelimit.py), jittered
exponential ``backoff``, adaptive ``priority`` tiers, and a circuit breaker on authentication
failures. The states are in states.py; the per-account arrays the rules run over, in table.py.

Longer than the other modules because it is one state machine: every method below moves
accounts between the states of states.py and must keep the invariants of the next paragraphs
(wheel, wait queues, slots, orders out) together, which is easiest to check in one place.

An account is in exactly one ``AccountState``; it is in the wheel exactly when its state is new,
scheduled, idling or backoff, in one server's wait queue exactly when waiting, and has one order
out exactly when polling. Accounts handed out by the wheel beyond ``limit`` stay in a due backlog
(still in their state) and go first next time, so nothing is lost or ordered twice.

Connections: the planner believes an account holds one open connection ("a slot") from the order
that connected it (``need_connect``) until a result says ``connected=False``,
``on_connection_closed``, or the order is expired or requeued (its worker is presumed dead). An
account with a slot polls on it without asking the server's bucket.

A contended server (more schedulable accounts than its connection cap, docs/contended-servers.md):
every ``SHARE_INTERVAL`` the planner ranks the server's accounts by tier (the most often polled
first) and lets the first ``holders`` keep their connections; the others rotate (their orders
carry ``release``: log out after the poll) through ``reserve`` connections kept for them. A
freed connection goes to the waiting account whose deadline (due time plus its interval) is
nearest. When the connect rate cannot carry every rotating account, the intervals of the lowest
tiers are stretched (``ServerShare.stretch``) so that the rest keep theirs: late in tier order,
never starved.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np

from ..backoff import retry_delay
from ..config import LimitsConfig, SchedulerConfig
from ..frames import FailureKind
from ..histogram import LAG_BUCKETS, Histogram
from .priority import (
    AdaptivePriority,
    FixedPriority,
    PriorityRules,
    Tier,
    forget_priority,
    make_priority,
)
from .ratelimit import (
    DEFAULT_BURST_SECONDS,
    ConnectionLimits,
    ServerConnections,
    ServerShare,
    share_server,
)
from .states import (
    ALLOWED_MASK,
    IN_WHEEL_MASK,
    POLLING,
    STATES,
    AccountState,
    InvalidTransition,
)
from .table import (
    ADAPTIVE_KIND,
    TIER_BITS,
    AccountTable,
    OrdersOut,
    adaptive_intervals,
    has_repeats,
    kind_intervals,
)
from .wheel import TimingWheel

__all__ = ["AccountPlan", "AccountState", "InvalidTransition", "Order", "OrderBatch", "Planner",
           "PlannerSnapshot", "ServerSnapshot"]


class AccountPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What the planner needs to know about an account; a new credentials_version lifts auth_failed."""

    account_id: str
    server: str
    priority: Literal["auto", "high", "medium", "low"] = "auto"
    idle: bool = True
    enabled: bool = True
    credentials_version: str | int = 0


class Order(msgspec.Struct, frozen=True, gc=False):
    """Poll this account now. ``need_connect``: it has no open connection and was admitted one;
    ``release``: it rotates on a contended server, so log out after the poll."""

    account_id: str
    server: str
    need_connect: bool
    due_at: float
    lag: float
    release: bool = False


class ServerSnapshot(msgspec.Struct, frozen=True):
    """One IMAP server: its accounts, open connections against limits, and accounts waiting on it."""

    server: str
    accounts: int
    connections: int
    max_connections: int
    max_connections_per_account: int
    connects_per_minute: int
    connect_tokens: float
    waiting: int
    logins_last_minute: int = 0
    share: ServerShare | None = None  # holders, rotating, polls needed and possible, late accounts


class PlannerSnapshot(msgspec.Struct, frozen=True):
    """Counts for ``mailingestctl status`` and metrics."""

    accounts: int
    states: dict[str, int]
    tiers: dict[str, int]
    auto_accounts: int
    in_flight: int
    due_backlog: int
    servers: list[ServerSnapshot]
    lag: Histogram  # order lag (now - due_at) since start, LAG_BUCKETS
    orders_total: int
    results_total: int
    stale_results_total: int
    expired_total: int


class OrderBatch(msgspec.Struct, frozen=True, gc=False):
    """The orders of one ``due_batch`` call, as parallel arrays (``index``: account indexes, see
    ``Planner.account_id``, and ``account_ids`` the same accounts' ids; ``need_connect``: no open
    connection, one was admitted; ``release``: log out after the poll, the account rotates on a
    contended server)."""

    account_ids: list[str]
    index: np.ndarray
    need_connect: np.ndarray
    due_at: np.ndarray
    lag: np.ndarray
    release: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


_NO_ORDERS = OrderBatch([], np.empty(0, dtype=np.int64), np.empty(0, dtype=bool), np.empty(0), np.empty(0),
                        np.empty(0, dtype=bool))
# How often the holders and rotating accounts of contended servers are chosen again (seconds).
SHARE_INTERVAL = 2.0
# A rotating session's login, poll and logout, until measured (seconds); the measurement's weight.
DEFAULT_SESSION_SECONDS = 1.0
SESSION_EWMA_WEIGHT = 0.05


class Planner:
    """Scheduling state of every account: wheel, server limits, backoff, priority, circuit breaker.

    Each account has an integer index (``index_of``) into parallel arrays (state, server, due and
    order times, slot, failure counts); the wheel holds indexes. Indexes of removed accounts are
    not reused, so a stale entry in a queue can never point at a different account.
    """

    def __init__(self, scheduler: SchedulerConfig, limits: LimitsConfig, now: float,
                 rng: random.Random | None = None, burst_seconds: float = DEFAULT_BURST_SECONDS) -> None:
        self.config = scheduler
        self.rng = rng if rng is not None else random.Random()
        self._np_rng = np.random.Generator(np.random.PCG64(self.rng.getrandbits(64)))
        self.limits = ConnectionLimits(limits, burst_seconds)
        self.rules = PriorityRules(scheduler)
        self._fixed: dict[Tier, FixedPriority] = {}
        self._wheel = TimingWheel(scheduler.tick, now, wheel_slots(scheduler))
        # Per account (by index).
        self._index: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._plans: list[AccountPlan | None] = []
        self._priority: list[FixedPriority | AdaptivePriority | None] = []
        # The per-account arrays (table.py); _state, _due_at, ... are its views (_bind).
        self._table = AccountTable()
        self._kind_intervals = kind_intervals(self.rules)  # the interval of each kind (NaN: adaptive)
        self._bind()
        # Per server (by server index).
        self._server_ids: dict[str, int] = {}
        self._server_names: list[str] = []
        self._connections: list[ServerConnections] = []
        self._server_accounts: list[int] = []
        # Per server, a heap of (deadline, account index) of the accounts waiting on it.
        self._waiting: dict[int, list[tuple[float, int]]] = {}
        self._waiting_counts: list[int] = []
        # Contended servers: the last ServerShare, the measured rotating session time.
        self._shares: dict[int, ServerShare] = {}
        self._session_seconds: list[float] = []
        self._next_share_at = -math.inf
        self._due_backlog: deque[int] = deque()
        self._orders_out = OrdersOut()
        self._lag = Histogram(LAG_BUCKETS)
        # Lags of recent orders not yet in the histogram: bucketed many batches at a time (_count_lags).
        self._lags = np.empty(_LAG_BUFFER)
        self._lags_held = 0
        self._now = now
        self.results_total = 0
        self.stale_results_total = 0
        self.expired_total = 0

    # -- accounts --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._index

    def account_ids(self) -> list[str]:
        """Every planned account."""
        return list(self._index)

    def index_of(self, account_id: str) -> int | None:
        """The account's index (stable while it is planned), or None when it is unknown."""
        return self._index.get(account_id)

    def account_id(self, index: int) -> str:
        """The id of the account at ``index``."""
        account_id = self._ids[index]
        if account_id is None:
            raise KeyError(index)
        return account_id

    def plan_of(self, account_id: str) -> AccountPlan | None:
        """The account's definition as last added or updated, or None when it is unknown."""
        index = self._index.get(account_id)
        return None if index is None else self._plans[index]

    def state_of(self, account_id: str) -> AccountState | None:
        """The account's state, or None when it is unknown."""
        index = self._index.get(account_id)
        return None if index is None else STATES[self._state[index]]

    def tier_of(self, account_id: str) -> Tier | None:
        """The account's current tier, or None when it is unknown."""
        index = self._index.get(account_id)
        return None if index is None else self._priority[index].tier

    def holds_slot(self, account_id: str) -> bool:
        """Whether the planner counts an open connection for the account."""
        index = self._index.get(account_id)
        return index is not None and bool(self._holds_slot[index])

    def server_of(self, account_id: str) -> str | None:
        index = self._index.get(account_id)
        return None if index is None else self._server_names[self._server[index]]

    def due_at(self, account_id: str) -> float | None:
        """When the account is next due (None when it is not waiting for a due time)."""
        index = self._index.get(account_id)
        if index is None or not (IN_WHEEL_MASK >> int(self._state[index])) & 1:
            return None
        return float(self._due_at[index])

    def in_wheel(self, account_id: str) -> bool:
        index = self._index.get(account_id)
        return index is not None and index in self._wheel

    def in_due_backlog(self, account_id: str) -> bool:
        index = self._index.get(account_id)
        return index is not None and index in self._due_backlog

    def add(self, plan: AccountPlan, now: float, spread: bool = True) -> None:
        """Start scheduling an account; its first poll falls at a random point of first_poll_spread
        (``spread`` False: due at once, for one account added to a running daemon)."""
        if plan.account_id in self._index:
            raise ValueError(f"account {plan.account_id!r} is already planned")
        self._now = now
        index = len(self._ids)
        self._reserve(index + 1)
        priority = make_priority(plan.priority, self.rules, now, self._fixed)
        self._index[plan.account_id] = index
        self._ids.append(plan.account_id)
        self._plans.append(plan)
        self._priority.append(priority)
        self._live[index] = True
        self._state[index] = AccountState.NEW
        self._set_priority(index, priority)
        server = self._server_index(plan.server, now)
        self._server[index] = server
        self._server_accounts[server] += 1
        if not plan.enabled:
            self._move(index, AccountState.DISABLED)
            return
        # New accounts (a start, a reload, 10,000 added at once) are spread over first_poll_spread,
        # not over a whole interval: a new mailbox should be connected in seconds, not minutes.
        window = min(self.config.first_poll_spread, priority.interval(now)) if spread else 0.0
        self._set_priority(index, priority)
        self._schedule(index, AccountState.NEW, now + self.rng.random() * window)

    def update(self, plan: AccountPlan, now: float) -> None:
        """Apply a changed definition: server, priority, idle, enabled, credentials_version.

        A new server forgets the connection to the old one (the process must tell the worker to
        drop it) and polls at once; a new credentials_version lifts ``auth_failed`` (and cuts a
        backoff short); ``enabled`` false disables, true re-enables.
        """
        index = self._index[plan.account_id]
        self._now = now
        old_plan = self._plans[index]
        self._plans[index] = plan
        if not plan.enabled:
            self.disable(plan.account_id)
            return
        if plan.server != old_plan.server:
            if self._holds_slot[index]:
                self._release_slot(index)
            state = self._state[index]
            if state not in (AccountState.DISABLED, AccountState.AUTH_FAILED):
                self._wheel.cancel(index)
                self._schedule(index, AccountState.SCHEDULED, now)
            old_server = int(self._server[index])
            new_server = self._server_index(plan.server, now)
            self._server_accounts[old_server] -= 1
            self._server_accounts[new_server] += 1
            self._server[index] = new_server
            self._rotates[index], self._stretch[index] = False, 1.0  # until the new server's next share
        if plan.priority != old_plan.priority:
            forget_priority(self._priority[index])
            priority = make_priority(plan.priority, self.rules, now, self._fixed)
            self._priority[index] = priority
            self._set_priority(index, priority)
            if self._state[index] in (AccountState.NEW, AccountState.SCHEDULED):
                sooner = now + priority.interval(now)
                self._set_priority(index, priority)
                if sooner < self._due_at[index]:
                    self._schedule(index, AccountState(int(self._state[index])), sooner)
        if plan.credentials_version != old_plan.credentials_version:
            self._auth_failures[index] = 0
            if self._state[index] in (AccountState.AUTH_FAILED, AccountState.BACKOFF):
                self._failures[index] = 0
                self._schedule(index, AccountState.SCHEDULED, now)
        if old_plan.idle and not plan.idle and self._state[index] == AccountState.IDLING:
            self._schedule(index, AccountState.SCHEDULED, now)
        if self._state[index] == AccountState.DISABLED:
            self.enable(plan.account_id, now)

    def remove(self, account_id: str) -> bool:
        """Forget the account (its slot, if any, is released); False when it was unknown."""
        index = self._index.pop(account_id, None)
        if index is None:
            return False
        self._wheel.cancel(index)
        if self._holds_slot[index]:
            self._release_slot(index)
        server = int(self._server[index])
        if self._state[index] == AccountState.WAITING:
            self._waiting_counts[server] -= 1
        self._server_accounts[server] -= 1
        forget_priority(self._priority[index])
        # Entries left in the due backlog or a wait queue see a disabled account and skip it.
        self._state[index] = AccountState.DISABLED
        self._live[index] = False
        self._ids[index] = self._plans[index] = self._priority[index] = None
        return True

    def disable(self, account_id: str) -> None:
        """Stop scheduling the account (an order already out finishes; its result is ignored)."""
        index = self._index[account_id]
        self._wheel.cancel(index)
        self._move(index, AccountState.DISABLED)

    def enable(self, account_id: str, now: float) -> bool:
        """Re-enable a disabled or auth_failed account: failures forgotten, due at once."""
        index = self._index[account_id]
        if self._state[index] not in (AccountState.DISABLED, AccountState.AUTH_FAILED):
            return False
        self._now = now
        self._failures[index] = self._auth_failures[index] = 0
        self._schedule(index, AccountState.SCHEDULED, now)
        return True

    def reconfigure(self, scheduler: SchedulerConfig, limits: LimitsConfig, now: float,
                    burst_seconds: float | None = None) -> None:
        """New intervals, thresholds and limits after a reload (the wheel keeps its tick);
        accounts pick up new intervals at their next reschedule."""
        self.config = scheduler
        self.rules.reconfigure(scheduler)
        self._kind_intervals = kind_intervals(self.rules)
        for fixed in self._fixed.values():
            fixed.refresh()
        count = len(self._ids)
        for index, priority in enumerate(self._priority[:count]):
            if priority is not None:
                self._set_priority(index, priority)
        if burst_seconds is not None:
            self.limits.burst_seconds = burst_seconds
        self.limits.reconfigure(limits, now)

    # -- orders ----------------------------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[Order]:
        """``due_batch`` as ``Order`` objects with account ids (for callers that want one object per order)."""
        batch = self.due_batch(now, limit)
        servers, names = self._server, self._server_names
        return [Order(account_id, names[servers[index]], need_connect, due_at, lag, release)
                for account_id, index, need_connect, due_at, lag, release in zip(
                    batch.account_ids, batch.index.tolist(), batch.need_connect.tolist(), batch.due_at.tolist(),
                    batch.lag.tolist(), batch.release.tolist())]

    def due_batch(self, now: float, limit: int) -> OrderBatch:
        """At most ``limit`` orders for accounts due by ``now`` whose server admits them.

        Accounts already waiting on a server go first, in arrival order; then the due backlog;
        then the wheel. An account needing a connection that its server refuses becomes waiting
        (and any later one for that server queues behind it).
        """
        self._now = now
        if now >= self._next_share_at:
            self._reshare(now)
        taken: list[int] = []
        connects: list[bool] = []
        if self._waiting:
            self._admit_waiting(now, limit, taken, connects)
        fresh = self._wheel.advance(now)
        backlog = self._due_backlog
        if backlog:
            backlog.extend(fresh.tolist())
            wheel = self._wheel
            while backlog and len(taken) < limit:
                index = backlog.popleft()
                if (IN_WHEEL_MASK >> int(self._state[index])) & 1 and index not in wheel:
                    self._take(index, now, taken, connects)
            return self._issue(np.array(taken, dtype=np.int64), np.array(connects, dtype=bool), now)
        room = max(0, limit - len(taken))
        if len(fresh) > room:
            backlog.extend(fresh[room:].tolist())
            fresh = fresh[:room]
        # Every account the wheel hands out is in a wheel state, so it may go to polling.
        need_connect = ~self._holds_slot[fresh]
        if need_connect.any():
            keep = self._admit_fresh(fresh, need_connect, now)
            if keep is not None:
                fresh, need_connect = fresh[keep], need_connect[keep]
        if taken:
            fresh = np.concatenate([np.array(taken, dtype=np.int64), fresh])
            need_connect = np.concatenate([np.array(connects, dtype=bool), need_connect])
        return self._issue(fresh, need_connect, now)

    def _admit_fresh(self, fresh: np.ndarray, need_connect: np.ndarray, now: float) -> np.ndarray | None:
        """Admit the fresh accounts that need a connection, server by server in order; the
        refused ones wait. Returns the mask of accounts to order (None: all of them)."""
        asking = need_connect.nonzero()[0]
        asking_indexes = fresh[asking]
        asking_servers = self._server[asking_indexes]
        per_server = np.bincount(asking_servers, minlength=len(self._server_names)).tolist()
        refusals: list[tuple[int, int]] = []
        waiting_counts, connections = self._waiting_counts, self._connections
        for server, count in enumerate(per_server):
            if count:
                admitted = 0 if waiting_counts[server] else connections[server].admit_many(count, now)
                if admitted < count:
                    refusals.append((server, admitted))
        if not refusals:
            self._holds_slot[asking_indexes] = True
            return None
        keep = np.ones(len(fresh), dtype=bool)
        for server, admitted in refusals:
            refused = asking[asking_servers == server][admitted:]
            keep[refused] = False
            for index in fresh[refused].tolist():
                self._wait(index)
        self._holds_slot[fresh[asking[keep[asking]]]] = True
        return keep

    def _issue(self, indexes: np.ndarray, need_connect: np.ndarray, now: float) -> OrderBatch:
        """Mark the accounts polling, record their lag, and hand out the batch."""
        if not len(indexes):
            return _NO_ORDERS
        self._state[indexes] = POLLING
        self._ordered_at[indexes] = now
        due_at = self._due_at[indexes]
        lag = now - due_at
        self._orders_out.add(now, indexes, self._table, len(self._index))
        held = self._lags_held
        if held + len(lag) > _LAG_BUFFER:
            self._count_lags()
            held = 0
        if len(lag) > _LAG_BUFFER:
            self._count_lags(lag)
        else:
            self._lags[held:held + len(lag)] = lag
            self._lags_held = held + len(lag)
        ids = self._ids
        return OrderBatch([ids[index] for index in indexes.tolist()], indexes, need_connect, due_at, lag,
                          self._rotates[indexes])

    def _take(self, index: int, now: float, taken: list[int], connects: list[bool]) -> None:
        """A due account: order it on its open connection, or if its server admits a new one."""
        if self._holds_slot[index]:
            need_connect = False
        else:
            server = int(self._server[index])
            if self._waiting_counts[server] or not self._connections[server].admit_many(1, now):
                self._wait(index)
                return
            self._holds_slot[index] = need_connect = True
        # Polling at once, so a second entry of the same account in a queue is skipped.
        self._move(index, AccountState.POLLING)
        taken.append(index)
        connects.append(need_connect)

    def _wait(self, index: int) -> None:
        """Due, but refused by its server (or queued behind accounts that were): wait, ordered by
        deadline (due time plus the account's interval: when it would miss a whole poll)."""
        self._move(index, AccountState.WAITING)
        server = int(self._server[index])
        queue = self._waiting.get(server)
        if queue is None:
            queue = self._waiting[server] = []
        interval = self.rules.intervals[self._kind[index] & TIER_BITS] * self._stretch[index]
        heapq.heappush(queue, (float(self._due_at[index] + interval), index))

    def _admit_waiting(self, now: float, limit: int, taken: list[int], connects: list[bool]) -> None:
        for server, queue in list(self._waiting.items()):
            connections = self._connections[server]
            while queue and len(taken) < limit:
                index = queue[0][1]
                if self._state[index] != AccountState.WAITING or self._server[index] != server:
                    heapq.heappop(queue)
                    continue
                if self._holds_slot[index]:
                    need_connect = False
                elif connections.admit_many(1, now):
                    self._holds_slot[index] = need_connect = True
                else:
                    break
                heapq.heappop(queue)
                self._move(index, AccountState.POLLING)
                taken.append(index)
                connects.append(need_connect)
            if not self._waiting_counts[server]:
                del self._waiting[server]

    def next_wakeup(self, now: float) -> float | None:
        """When ``due`` may next have work: ``now`` if anything is due or waiting on a refilling
        bucket, else when the wheel hands out its next due account: the end of that account's tick,
        not its due time inside the tick, so the process sleeps instead of asking again and again
        until the tick ends (None: nothing scheduled). Waits on full servers end with a result or
        a closed connection, which the process answers with ``due`` anyway."""
        if self._due_backlog:
            return now
        wakeup = self._wheel.next_due()
        if wakeup is not None:
            tick = self._wheel.tick
            wakeup = math.ceil(wakeup / tick) * tick
        for server in self._waiting:
            connections = self._connections[server]
            server_full = connections.open_connections >= (connections.limits.max_connections_per_server or 0)
            if self._waiting_counts[server] and not server_full:
                refill_at = now + connections.connect_bucket.wait_time(now)
                wakeup = refill_at if wakeup is None else min(wakeup, refill_at)
        return wakeup

    # -- results ---------------------------------------------------------------------------------

    def on_result(self, account_id: str, now: float, *, ok: bool, new_messages: int = 0,
                  failure_kind: FailureKind | None = None, retry_after: float | None = None,
                  connected: bool, idling: bool, ordered: bool = True, watches_all: bool = True) -> None:
        """One worker result (see ``on_results``); ``failure_kind`` AUTH counts toward
        ``auth_failure_limit``. An unknown account is counted as a stale result."""
        index = self._index.get(account_id)
        if index is None:
            self.results_total += 1
            self.stale_results_total += 1
            return
        self.on_results(now, [index], [ok], [connected], [idling], [new_messages],
                        [failure_kind == FailureKind.AUTH], [math.nan if retry_after is None else retry_after],
                        [ordered], [watches_all])

    def on_results(self, now: float, indexes: Sequence[int] | np.ndarray, ok: Sequence[bool] | np.ndarray,
                   connected: Sequence[bool] | np.ndarray, idling: Sequence[bool] | np.ndarray,
                   new_messages: Sequence[int] | np.ndarray | None = None,
                   auth_failure: Sequence[bool] | np.ndarray | None = None,
                   retry_after: Sequence[float] | np.ndarray | None = None,
                   ordered: Sequence[bool] | np.ndarray | None = None,
                   watches_all: Sequence[bool] | np.ndarray | None = None) -> None:
        """Worker results for a batch of accounts (parallel sequences; ``retry_after`` NaN: none).

        ``connected``: the worker keeps a connection open for the account; ``idling``: that
        connection is in IDLE, and ``watches_all`` (default True) that the server pushes news of
        every configured folder: the account needs only the slow safety poll; otherwise its
        next poll (which checks the other folders) is at its tier interval. Success resets
        backoff; an ``auth_failure`` counts toward ``auth_failure_limit``; other failures back
        off with jitter, never sooner than ``retry_after`` seconds. ``ordered`` (default True):
        the result answers an order; a result the worker sent on its own (a push, a renewal, a
        lost connection) is classified the same way when the account is idling or scheduled. A
        result for an account with no order out (expired, requeued, disabled, removed) only
        updates the connection count. An account appearing twice in one batch is handled as
        two results in order.
        """
        self._now = now
        index = np.asarray(indexes, dtype=np.int64)
        count = len(index)
        if count == 0:
            return
        ok = np.asarray(ok, dtype=bool)
        connected = np.asarray(connected, dtype=bool)
        idling = np.asarray(idling, dtype=bool)
        mail = np.zeros(count, dtype=np.int64) if new_messages is None else np.asarray(new_messages, dtype=np.int64)
        auth = np.zeros(count, dtype=bool) if auth_failure is None else np.asarray(auth_failure, dtype=bool)
        wait = np.full(count, math.nan) if retry_after is None else np.asarray(retry_after, dtype=float)
        asked = np.ones(count, dtype=bool) if ordered is None else np.asarray(ordered, dtype=bool)
        pushed = np.ones(count, dtype=bool) if watches_all is None else np.asarray(watches_all, dtype=bool)
        if count > 1 and has_repeats(index):
            for position in range(count):
                one = slice(position, position + 1)
                self.on_results(now, index[one], ok[one], connected[one], idling[one], mail[one], auth[one],
                                wait[one], asked[one], pushed[one])
            return
        self.results_total += count
        # Usually every account has its order out (polling; a removed account is disabled).
        all_polling = bool((self._state[index] == POLLING).all())
        if not all_polling:
            live = self._live[index]
            if not live.all():
                self.stale_results_total += count - int(np.count_nonzero(live))
                index, ok, connected, idling, mail, auth, wait, asked, pushed = (
                    part[live] for part in (index, ok, connected, idling, mail, auth, wait, asked, pushed))
        holds = self._holds_slot[index]
        changed = connected != holds
        if changed.any():
            self._recount_slots(index[changed], connected[changed])
        if not all_polling:
            state = self._state[index]
            polling = state == AccountState.POLLING
            if not asked.all():
                # The worker's own results (a push, a renewal) for an account not waiting on an
                # order: classified like any other (a failure backs off, AUTH counts).
                polling |= ~asked & ((state == AccountState.IDLING) | (state == AccountState.SCHEDULED))
            self.stale_results_total += len(index) - int(np.count_nonzero(polling))
            index, ok, connected, idling, mail, auth, wait, pushed = (
                part[polling] for part in (index, ok, connected, idling, mail, auth, wait, pushed))
        if self._shares:
            self._measure_sessions(now, index[ok & ~connected & self._rotates[index]])
        if not ok.all():
            failed = ~ok
            for account, auth_failed, retry in zip(index[failed].tolist(), auth[failed].tolist(),
                                                    wait[failed].tolist()):
                self._on_failure(account, now, auth_failed, None if math.isnan(retry) else retry)
            index, connected, idling, mail, pushed = index[ok], connected[ok], idling[ok], mail[ok], pushed[ok]
        self._failure_counts[index] = 0  # failures and auth_failures
        intervals = self._kind_intervals[self._kind[index]]
        adaptive = np.isnan(intervals)
        # Mail feeds the rate and promotion of adaptive priorities (a fixed one ignores it).
        with_mail = adaptive & (mail > 0)
        if with_mail.any():
            observed = index[with_mail]
            priorities = self._priority
            changed = []
            for account, messages in zip(observed.tolist(), mail[with_mail].tolist()):
                priority = priorities[account]
                priority.observe(messages, now)
                changed.append(priority)
            self._set_adaptive(observed, changed)
        idle = idling & connected if idling.any() else None
        partly_pushed = None
        if idle is not None and idle.any():
            watched = idle & pushed
            if watched.any():
                idle_index = index[watched]
                self._state[idle_index] = AccountState.IDLING
                self._set_due(idle_index, np.full(len(idle_index), now + self.config.idle_safety_interval))
                rest = ~watched
                index, intervals, adaptive, idle = index[rest], intervals[rest], adaptive[rest], idle[rest]
            # Idling on one folder while others need polls: IDLING, next poll at the tier interval.
            partly_pushed = idle if idle.any() else None
        # Polling -> scheduled (allowed), never due at once.
        if adaptive.any():
            intervals[adaptive] = self._adaptive_intervals(index[adaptive], now)
        jitter = self.config.jitter
        intervals *= self._np_rng.uniform(1.0 - jitter, 1.0 + jitter, len(index))
        if self._shares:
            intervals *= self._stretch[index]  # the late tiers of a server the limits cannot carry
        self._state[index] = AccountState.SCHEDULED
        if partly_pushed is not None:
            self._state[index[partly_pushed]] = AccountState.IDLING
        self._set_due(index, intervals + now)

    def _on_failure(self, index: int, now: float, auth_failed: bool, retry_after: float | None) -> None:
        if auth_failed:
            self._auth_failures[index] += 1
            if self._auth_failures[index] >= self.config.auth_failure_limit:
                self._wheel.cancel(index)  # an idling or scheduled account is still in the wheel
                self._move(index, AccountState.AUTH_FAILED)
                return
        self._back_off(index, now, retry_after)

    def on_idle(self, account_id: str, now: float, idling: bool) -> None:
        """The worker entered (True) or lost (False) IDLE for the account. Idling needs only the
        safety poll; losing IDLE puts the account back on its tier's schedule, due at once."""
        index = self._index.get(account_id)
        if index is None:
            return
        self._now = now
        state = self._state[index]
        if idling:
            if state in (AccountState.SCHEDULED, AccountState.BACKOFF) and self._holds_slot[index]:
                self._schedule(index, AccountState.IDLING, now + self.config.idle_safety_interval)
        elif state == AccountState.IDLING:
            self._schedule(index, AccountState.SCHEDULED, now)

    def on_new_mail(self, account_id: str, now: float, count: int) -> None:
        """Mail seen through IDLE: feeds the account's rate and promotion."""
        index = self._index.get(account_id)
        if index is not None:
            priority = self._priority[index]
            priority.observe(count, now)
            self._set_priority(index, priority)

    def on_connection_closed(self, account_id: str, now: float | None = None) -> None:
        """The account's connection closed: its slot is released. An idling account has lost
        IDLE with it and is due at once (``now`` defaults to the latest time the planner saw)."""
        index = self._index.get(account_id)
        if index is None:
            return
        if self._holds_slot[index]:
            self._release_slot(index)
        if self._state[index] == AccountState.IDLING:
            self._schedule(index, AccountState.SCHEDULED, self._now if now is None else now)

    def expire_orders(self, now: float, timeout: float) -> list[str]:
        """Orders out for ``timeout`` seconds or more with no result: their worker is presumed
        dead. Each counts as a failure (backoff, in case the account is what kills workers) and
        its connection slot is released. Returns the account ids."""
        self._now = now
        expired = self._orders_out.expire(now, timeout, self._table)
        for index in expired:
            if self._holds_slot[index]:
                self._release_slot(index)
            self._back_off(index, now, None)
        self.expired_total += len(expired)
        return [self._ids[index] for index in expired]

    def requeue(self, account_ids: list[str], now: float) -> int:
        """Take back the orders of these accounts (their worker slot died): slots released,
        due at once, no failure counted. Accounts with no order out are left alone; returns how
        many were requeued."""
        self._now = now
        requeued = 0
        for account_id in account_ids:
            index = self._index.get(account_id)
            if index is None or self._state[index] != AccountState.POLLING:
                continue
            if self._holds_slot[index]:
                self._release_slot(index)
            self._schedule(index, AccountState.SCHEDULED, now)
            requeued += 1
        return requeued

    # -- contended servers -----------------------------------------------------------------------

    def share_of(self, server: str) -> ServerShare:
        """How the server's connections and logins are shared (see ``ratelimit.share_server``)."""
        index = self._server_ids.get(server)
        if index is None:
            return share_server([], [], 0, 0, DEFAULT_SESSION_SECONDS)
        share = self._shares.get(index)
        return share if share is not None else self._uncontended_shares()[index]

    def _reshare(self, now: float) -> None:
        """Choose again, on every server with more accounts than its cap, who holds a connection
        (the most often polled: tier order, those already holding one first, then by index) and
        who rotates, and stretch the intervals of the tiers its limits cannot carry."""
        self._next_share_at = now + SHARE_INTERVAL
        contended = [server for server, count in enumerate(self._server_accounts)
                     if count > (self._connections[server].limits.max_connections_per_server or 0)]
        if not contended and not self._shares:
            return
        count = len(self._ids)
        schedulable = self._table.schedulable(count)
        servers = self._server[:count]
        intervals = np.array(self.rules.intervals)
        for server in set(self._shares) - set(contended):
            accounts = np.flatnonzero(servers == server)
            self._rotates[accounts] = False
            self._stretch[accounts] = 1.0
            del self._shares[server]
        for server in contended:
            accounts = np.flatnonzero(schedulable & (servers == server))
            tiers = self._kind[accounts] & TIER_BITS
            ranked = accounts[np.lexsort((accounts, ~self._holds_slot[accounts], tiers))]
            ranked_tiers = self._kind[ranked] & TIER_BITS
            limits = self._connections[server].limits
            share = share_server(intervals[ranked_tiers], ranked_tiers, limits.max_connections_per_server or 0,
                                 limits.connects_per_minute or 0, self._session_seconds[server])
            on_server = np.flatnonzero(servers == server)
            self._rotates[on_server], self._stretch[on_server] = False, 1.0
            rotating = ranked[share.holders:]
            self._rotates[rotating] = True
            self._stretch[rotating] = np.array(share.stretch)[ranked_tiers[share.holders:]]
            self._shares[server] = share

    def _measure_sessions(self, now: float, rotated: np.ndarray) -> None:
        """Rotating accounts that logged in, polled and logged out: how long that took, per server
        (sizes the connections kept for them)."""
        if not len(rotated):
            return
        took = now - self._ordered_at[rotated]
        for server, seconds in zip(self._server[rotated].tolist(), took.tolist()):
            self._session_seconds[server] += SESSION_EWMA_WEIGHT * (seconds - self._session_seconds[server])

    def _uncontended_shares(self) -> list[ServerShare]:
        """Per server, its share as if every schedulable account held a connection (right for the
        servers with no more accounts than their cap), from one count of accounts by server and tier."""
        count = len(self._ids)
        schedulable = self._table.schedulable(count)
        servers = len(self._server_names)
        codes = self._server[:count][schedulable] * 3 + (self._kind[:count][schedulable] & TIER_BITS)
        per_tier = np.bincount(codes, minlength=3 * servers).reshape(servers, 3)
        needed = per_tier @ (60.0 / np.array(self.rules.intervals))
        shares = []
        for server, (accounts, polls) in enumerate(zip(per_tier.sum(axis=1).tolist(), needed.tolist())):
            rate = float(self._connections[server].limits.connects_per_minute or 0)
            shares.append(ServerShare(holders=accounts, rotating=0, reserve=0, polls_needed=polls,
                                      polls_possible=polls, logins_needed=0.0, logins_allowed=rate,
                                      late=[0, 0, 0], stretch=[1.0, 1.0, 1.0]))
        return shares

    # -- status ----------------------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> PlannerSnapshot:
        """Counts by state and tier, per-server connections/limits/waiting, and the lag histogram."""
        self._count_lags()
        now = self._now if now is None else now
        servers = []
        uncontended = self._uncontended_shares()
        for name in sorted(set(self._server_names) | set(self.limits.servers())):
            status = self.limits.status(name, now)
            server = self._server_ids.get(name)
            servers.append(ServerSnapshot(
                server=name, accounts=self._server_accounts[server] if server is not None else 0,
                connections=status.connections, max_connections=status.max_connections,
                max_connections_per_account=status.max_connections_per_account,
                connects_per_minute=status.connects_per_minute, connect_tokens=status.connect_tokens,
                waiting=self._waiting_counts[server] if server is not None else 0,
                logins_last_minute=self.limits.server(name, now).connects_last_minute(now),
                share=None if server is None else self._shares.get(server, uncontended[server])))
        count = len(self._ids)
        live = self._live[:count]
        state_counts = self._table.census(count).sum(axis=1).tolist()
        auto_accounts = int(np.count_nonzero(self._kind[:count][live] & ADAPTIVE_KIND))
        return PlannerSnapshot(
            accounts=len(self._index),
            states={state.name.lower(): state_counts[state] for state in AccountState},
            tiers={tier.name.lower(): self.rules.tier_counts[tier] for tier in Tier},
            auto_accounts=auto_accounts,
            in_flight=state_counts[AccountState.POLLING],
            due_backlog=len(self._due_backlog),
            servers=servers,
            lag=self._lag.copy(),
            orders_total=self._lag.count,
            results_total=self.results_total,
            stale_results_total=self.stale_results_total,
            expired_total=self.expired_total,
        )

    def census(self) -> dict[str, int]:
        """Accounts by ``state/tier`` (for the labelled accounts metric), every pair, from one count."""
        by_state_tier = self._table.census(len(self._ids)).tolist()
        tier_names = [tier.name.lower() for tier in Tier]
        return {f"{state.name.lower()}/{tier_names[tier]}": count
                for state, counts in zip(AccountState, by_state_tier) for tier, count in enumerate(counts) if count}

    def _count_lags(self, lag: np.ndarray | None = None) -> None:
        """Add held lags (or ``lag``) to the histogram."""
        if lag is None:
            lag = self._lags[:self._lags_held]
            self._lags_held = 0
        self._lag.observe_many(lag)

    # -- internals -------------------------------------------------------------------------------

    def _reserve(self, capacity: int) -> None:
        """Grow the per-account arrays (and the wheel's) to hold ``capacity`` accounts."""
        if self._table.reserve(capacity):
            self._bind()
            self._wheel.reserve(len(self._table))

    def _bind(self) -> None:
        """The per-account field views of the current table."""
        table = self._table
        self._live, self._state, self._server = table.live, table.state, table.server
        self._due_at, self._ordered_at, self._holds_slot = table.due_at, table.ordered_at, table.holds_slot
        self._failures, self._auth_failures, self._failure_counts = (table.failures, table.auth_failures,
                                                                     table.failure_counts)
        self._kind, self._adaptive, self._rotates, self._stretch = (table.kind, table.adaptive, table.rotates,
                                                                    table.stretch)
        self._set_priority, self._set_adaptive = table.set_priority, table.set_adaptive

    def _server_index(self, name: str, now: float) -> int:
        server = self._server_ids.get(name)
        if server is None:
            server = self._server_ids[name] = len(self._server_names)
            self._server_names.append(name)
            self._connections.append(self.limits.server(name, now))
            self._server_accounts.append(0)
            self._waiting_counts.append(0)
            self._session_seconds.append(DEFAULT_SESSION_SECONDS)
        return server

    def _adaptive_intervals(self, indexes: np.ndarray, now: float) -> np.ndarray:
        """``self._priority[index].interval(now)`` for adaptive accounts, from the arrays; accounts
        due for a demotion go through ``interval`` itself (it moves their tier and census)."""
        state = self._adaptive[indexes]
        intervals, demote = adaptive_intervals(self.rules, now, self._kind[indexes] & TIER_BITS, *state.T)
        if demote.any():
            for position in np.flatnonzero(demote).tolist():
                index = int(indexes[position])
                priority = self._priority[index]
                intervals[position] = priority.interval(now)
                self._set_priority(index, priority)
        return intervals

    def _move(self, index: int, state: AccountState) -> None:
        """The one place a single state changes: guard and wait-queue counts."""
        old = int(self._state[index])
        if not (ALLOWED_MASK[old] >> state) & 1:
            raise InvalidTransition(f"account {self._ids[index]}: {AccountState(old).name} -> {state.name}")
        if old == state:
            return
        self._state[index] = state
        if old == AccountState.WAITING:
            self._waiting_counts[self._server[index]] -= 1
        elif state == AccountState.WAITING:
            self._waiting_counts[self._server[index]] += 1

    def _schedule(self, index: int, state: AccountState, due_at: float) -> None:
        self._move(index, state)
        self._due_at[index] = due_at
        if due_at <= self._now:
            # Due already: straight to the backlog, not to the wheel's next tick boundary.
            self._wheel.cancel(index)
            self._due_backlog.append(index)
        else:
            self._wheel.schedule(index, due_at)

    def _set_due(self, indexes: np.ndarray, due_ats: np.ndarray) -> None:
        """Batch ``_schedule`` for accounts whose state is already set: all due after now."""
        self._due_at[indexes] = due_ats
        self._wheel.schedule_many(indexes, due_ats)

    def _back_off(self, index: int, now: float, retry_after: float | None) -> None:
        self._failures[index] += 1
        config = self.config
        delay = retry_delay(int(self._failures[index]), config.backoff_base, config.backoff_max, self.rng,
                            retry_after)
        self._schedule(index, AccountState.BACKOFF, now + delay)

    def _recount_slots(self, indexes: np.ndarray, connected: np.ndarray) -> None:
        """Results that disagree with the planner's slot: count found connections, release lost ones."""
        # Per server, found (2 * server) then lost (2 * server + 1): one count for both.
        counts = np.bincount(self._server[indexes] * 2 + ~connected, minlength=2 * len(self._server_names))
        connections = self._connections
        for code in counts.nonzero()[0].tolist():
            server, lost = divmod(code, 2)
            if lost:
                connections[server].release_many(int(counts[code]))
            else:
                connections[server].occupy_many(int(counts[code]))
        self._holds_slot[indexes] = connected

    def _release_slot(self, index: int) -> None:
        self._connections[self._server[index]].release_many(1)
        self._holds_slot[index] = False


# Order lags held before they are bucketed into the histogram.
_LAG_BUFFER = 1 << 16


def wheel_slots(config: SchedulerConfig) -> int:
    """Ticks per wheel block: at most half the shortest usual poll interval (a halved, jittered
    high interval), so a polled account is re-filed past the current block in one numpy batch; a
    power of two from 4 to 256 (128 with the defaults: 12.8 s)."""
    shortest = config.high_interval * 0.5 * (1.0 - config.jitter)
    ticks = int(shortest / config.tick / 2)
    return min(max(4, 1 << max(0, ticks.bit_length() - 1)), 256)
