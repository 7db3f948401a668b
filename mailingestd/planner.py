"""The scheduling state of every account: when to poll it, and whether its server lets it connect.

The scheduler process feeds a ``Planner`` account definitions (``add``, ``update``, ``remove``)
and worker reports (``on_result``, ``on_idle``, ``on_new_mail``, ``on_connection_closed``), and
asks it for work with ``due(now, limit)``; it sends the returned ``Order``s to workers. No I/O
and no clock: every call that depends on time takes ``now`` (monotonic seconds).

Parts: a ``TimingWheel`` of due accounts, ``ConnectionLimits`` per server, jittered exponential
``backoff``, adaptive ``priority`` tiers, and a circuit breaker on authentication failures.

An account is in exactly one ``AccountState``; it is in the wheel exactly when its state is new,
scheduled, idling or backoff, in one server's wait queue exactly when waiting, and has one order
out exactly when polling. Accounts handed out by the wheel beyond ``limit`` stay in a due backlog
(still in their state) and go first next time, so nothing is lost or ordered twice.

Connections: the planner believes an account holds one open connection ("a slot") from the order
that connected it (``need_connect``) until a result says ``connected=False``,
``on_connection_closed``, or the order is expired or requeued (its worker is presumed dead). An
account with a slot polls on it without asking the server's bucket.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import deque
from enum import IntEnum
from typing import Literal

import msgspec

from mailingestd.backoff import retry_delay
from mailingestd.config import LimitsConfig, SchedulerConfig
from mailingestd.priority import (AdaptivePriority, FixedPriority, PriorityRules, Tier, forget_priority,
                                  make_priority)
from mailingestd.ratelimit import ConnectionLimits, Refusal
from mailingestd.wheel import TimingWheel


class AccountState(IntEnum):
    """Where an account is in its cycle (supervisord states.py style: transitions are guarded)."""

    NEW = 0          # added, first poll not yet ordered (in the wheel at a jittered time)
    SCHEDULED = 1    # in the wheel for its next poll
    WAITING = 2      # due, but its server refused a new connection; in the server's wait queue
    POLLING = 3      # an order is out, no result yet
    IDLING = 4       # the worker holds it in IDLE; in the wheel for the slow safety poll
    BACKOFF = 5      # failed; in the wheel at a jittered backoff time
    AUTH_FAILED = 6  # circuit open after auth_failure_limit auth failures; never scheduled
    DISABLED = 7     # disabled by the operator; never scheduled


S = AccountState
_ALLOWED: dict[AccountState, frozenset[AccountState]] = {
    S.NEW: frozenset({S.SCHEDULED, S.WAITING, S.POLLING, S.DISABLED}),
    S.SCHEDULED: frozenset({S.WAITING, S.POLLING, S.IDLING, S.BACKOFF, S.DISABLED}),
    S.WAITING: frozenset({S.POLLING, S.SCHEDULED, S.DISABLED}),
    S.POLLING: frozenset({S.SCHEDULED, S.IDLING, S.BACKOFF, S.AUTH_FAILED, S.DISABLED}),
    S.IDLING: frozenset({S.SCHEDULED, S.POLLING, S.WAITING, S.DISABLED}),
    S.BACKOFF: frozenset({S.SCHEDULED, S.WAITING, S.POLLING, S.IDLING, S.DISABLED}),
    S.AUTH_FAILED: frozenset({S.SCHEDULED, S.DISABLED}),
    S.DISABLED: frozenset({S.SCHEDULED}),
}
# Bit masks over state numbers, for the hot paths.
_ALLOWED_MASK = [sum(1 << target for target in _ALLOWED[state]) | (1 << state) for state in AccountState]
_IN_WHEEL_MASK = (1 << S.NEW) | (1 << S.SCHEDULED) | (1 << S.IDLING) | (1 << S.BACKOFF)

# Lag bucket upper bounds in seconds (Prometheus "le"); a last bucket takes everything above.
LAG_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                                  600.0, 1800.0)


class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow (a bug in the caller or the planner)."""


class AccountPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What the planner needs to know about an account; a new credentials_version lifts auth_failed."""

    account_id: str
    server: str
    priority: Literal["auto", "high", "medium", "low"] = "auto"
    idle: bool = True
    enabled: bool = True
    credentials_version: str | int = 0


class Order(msgspec.Struct, frozen=True, gc=False):
    """Poll this account now. ``need_connect``: it has no open connection and was admitted one."""

    account_id: str
    server: str
    need_connect: bool
    due_at: float
    lag: float


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


class LagHistogram(msgspec.Struct, frozen=True):
    """Order lag (now - due_at) since start: ``counts[i]`` orders with lag <= ``bounds[i]`` and above
    the previous bound, ``counts[-1]`` above the last bound; p50/p99 interpolated within buckets."""

    bounds: list[float]
    counts: list[int]
    count: int
    sum: float
    p50: float
    p99: float


class PlannerSnapshot(msgspec.Struct, frozen=True):
    """Counts for ``mailingestctl status`` and metrics."""

    accounts: int
    states: dict[str, int]
    tiers: dict[str, int]
    auto_accounts: int
    in_flight: int
    due_backlog: int
    servers: list[ServerSnapshot]
    lag: LagHistogram
    orders_total: int
    results_total: int
    stale_results_total: int
    expired_total: int


class _Account:
    """One account's scheduling state (internal; the wheel holds these objects as keys)."""

    __slots__ = ("account_id", "server", "plan", "state", "priority", "due_at", "ordered_at", "holds_slot",
                 "failures", "auth_failures")

    def __init__(self, plan: AccountPlan, priority: FixedPriority | AdaptivePriority) -> None:
        self.account_id = plan.account_id
        self.server = plan.server
        self.plan = plan
        self.state = AccountState.NEW
        self.priority = priority
        self.due_at = 0.0
        self.ordered_at = 0.0
        self.holds_slot = False
        self.failures = 0
        self.auth_failures = 0


class Planner:
    """Scheduling state of every account: wheel, server limits, backoff, priority, circuit breaker."""

    def __init__(self, scheduler: SchedulerConfig, limits: LimitsConfig, now: float,
                 rng: random.Random | None = None) -> None:
        self.config = scheduler
        self.rng = rng if rng is not None else random.Random()
        self.limits = ConnectionLimits(limits)
        self.rules = PriorityRules(scheduler)
        self._fixed: dict[Tier, FixedPriority] = {}
        self._wheel = TimingWheel(scheduler.tick, now, wheel_slots(scheduler))
        self._accounts: dict[str, _Account] = {}
        self._server_accounts: dict[str, int] = {}
        self._waiting: dict[str, deque[_Account]] = {}
        self._waiting_counts: dict[str, int] = {}
        self._due_backlog: deque[_Account] = deque()
        # (ordered_at, account) in order time order; an entry is current while the account is
        # polling with that ordered_at, else stale (dropped by expire_orders or compaction).
        self._orders_out: deque[tuple[float, _Account]] = deque()
        self._lag_counts = [0] * (len(LAG_BUCKETS) + 1)
        self._lag_sum = 0.0
        self._now = now
        self._random = self.rng.random
        self._jitter_low = 1.0 - scheduler.jitter
        self._jitter_span = 2.0 * scheduler.jitter
        self.results_total = 0
        self.stale_results_total = 0
        self.expired_total = 0

    # -- accounts --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._accounts)

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._accounts

    def state_of(self, account_id: str) -> AccountState | None:
        """The account's state, or None when it is unknown."""
        account = self._accounts.get(account_id)
        return account.state if account else None

    def due_at(self, account_id: str) -> float | None:
        """When the account is next due (None when it is not waiting for a due time)."""
        account = self._accounts.get(account_id)
        if account is None or not (_IN_WHEEL_MASK >> account.state) & 1:
            return None
        return account.due_at

    def add(self, plan: AccountPlan, now: float) -> None:
        """Start scheduling an account; its first poll falls at a random point of first_poll_spread."""
        if plan.account_id in self._accounts:
            raise ValueError(f"account {plan.account_id!r} is already planned")
        self._now = now
        account = _Account(plan, make_priority(plan.priority, self.rules, now, self._fixed))
        self._accounts[plan.account_id] = account
        self._server_accounts[plan.server] = self._server_accounts.get(plan.server, 0) + 1
        if not plan.enabled:
            self._move(account, AccountState.DISABLED)
            return
        # New accounts (a start, a reload, 10,000 added at once) are spread over first_poll_spread,
        # not over a whole interval: a new mailbox should be connected in seconds, not minutes.
        spread = min(self.config.first_poll_spread, account.priority.interval(now))
        first_due_at = now + self.rng.random() * spread
        self._schedule(account, AccountState.NEW, first_due_at)

    def update(self, plan: AccountPlan, now: float) -> None:
        """Apply a changed definition: server, priority, idle, enabled, credentials_version.

        A new server forgets the connection to the old one (the process must tell the worker to
        drop it) and polls at once; a new credentials_version lifts ``auth_failed`` (and cuts a
        backoff short); ``enabled`` false disables, true re-enables.
        """
        account = self._accounts[plan.account_id]
        self._now = now
        old_plan, account.plan = account.plan, plan
        if not plan.enabled:
            self.disable(plan.account_id)
            return
        if plan.server != account.server:
            if account.holds_slot:
                self._release_slot(account)
            if account.state not in (AccountState.DISABLED, AccountState.AUTH_FAILED):
                self._cancel(account)
                self._schedule(account, AccountState.SCHEDULED, now)
            self._server_accounts[account.server] -= 1
            self._server_accounts[plan.server] = self._server_accounts.get(plan.server, 0) + 1
            account.server = plan.server
        if plan.priority != old_plan.priority:
            forget_priority(account.priority)
            account.priority = make_priority(plan.priority, self.rules, now, self._fixed)
            if account.state in (AccountState.NEW, AccountState.SCHEDULED):
                sooner = now + account.priority.interval(now)
                if sooner < account.due_at:
                    self._schedule(account, account.state, sooner)
        if plan.credentials_version != old_plan.credentials_version:
            account.auth_failures = 0
            if account.state in (AccountState.AUTH_FAILED, AccountState.BACKOFF):
                account.failures = 0
                self._schedule(account, AccountState.SCHEDULED, now)
        if old_plan.idle and not plan.idle and account.state == AccountState.IDLING:
            self._schedule(account, AccountState.SCHEDULED, now)
        if account.state == AccountState.DISABLED:
            self.enable(plan.account_id, now)

    def remove(self, account_id: str) -> bool:
        """Forget the account (its slot, if any, is released); False when it was unknown."""
        account = self._accounts.pop(account_id, None)
        if account is None:
            return False
        self._cancel(account)
        if account.holds_slot:
            self._release_slot(account)
        if account.state == AccountState.WAITING:
            self._waiting_counts[account.server] -= 1
        self._server_accounts[account.server] -= 1
        forget_priority(account.priority)
        # Entries left in the due backlog or a wait queue see a disabled account and skip it.
        account.state = AccountState.DISABLED
        return True

    def disable(self, account_id: str) -> None:
        """Stop scheduling the account (an order already out finishes; its result is ignored)."""
        account = self._accounts[account_id]
        self._cancel(account)
        self._move(account, AccountState.DISABLED)

    def enable(self, account_id: str, now: float) -> bool:
        """Re-enable a disabled or auth_failed account: failures forgotten, due at once."""
        account = self._accounts[account_id]
        if account.state not in (AccountState.DISABLED, AccountState.AUTH_FAILED):
            return False
        self._now = now
        account.failures = account.auth_failures = 0
        self._schedule(account, AccountState.SCHEDULED, now)
        return True

    def reconfigure(self, scheduler: SchedulerConfig, limits: LimitsConfig, now: float) -> None:
        """New intervals, thresholds and limits after a reload (the wheel keeps its tick);
        accounts pick up new intervals at their next reschedule."""
        self.config = scheduler
        self.rules.reconfigure(scheduler)
        for fixed in self._fixed.values():
            fixed.refresh()
        self._jitter_low = 1.0 - scheduler.jitter
        self._jitter_span = 2.0 * scheduler.jitter
        self.limits.reconfigure(limits, now)

    # -- orders ----------------------------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[Order]:
        """At most ``limit`` orders for accounts due by ``now`` whose server admits them.

        Accounts already waiting on a server go first, in arrival order; then the due backlog;
        then the wheel. An account needing a connection that its server refuses becomes waiting
        (and any later one for that server queues behind it).
        """
        self._now = now
        orders: list[Order] = []
        if self._waiting:
            self._admit_waiting(now, limit, orders)
        fresh = self._wheel.advance(now)
        backlog = self._due_backlog
        if backlog:
            backlog.extend(fresh)
            wheel = self._wheel
            while backlog and len(orders) < limit:
                account = backlog.popleft()
                if (_IN_WHEEL_MASK >> account.state) & 1 and account not in wheel:
                    self._take(account, now, orders)
            return orders
        room = max(0, limit - len(orders))
        if len(fresh) > room:
            backlog.extend(fresh[room:])
            del fresh[room:]
        # The hot path, inlined: every account the wheel hands out is in a wheel state (leaving
        # one cancels), so it may go to polling (a transition _ALLOWED permits from all of them).
        polling = AccountState.POLLING
        orders_out = self._orders_out.append
        waiting_counts = self._waiting_counts
        admit = self.limits.admit
        lag_counts = self._lag_counts
        lag_sum = 0.0
        append = orders.append
        for account in fresh:
            if account.holds_slot:
                need_connect = False
            else:
                server = account.server
                if waiting_counts.get(server) or not admit(server, account.account_id, now):
                    self._wait(account)
                    continue
                account.holds_slot = need_connect = True
            account.state = polling
            account.ordered_at = now
            orders_out((now, account))
            due_at = account.due_at
            lag = now - due_at
            lag_counts[bisect_left(LAG_BUCKETS, lag)] += 1
            lag_sum += lag
            append(Order(account.account_id, account.server, need_connect, due_at, lag))
        self._lag_sum += lag_sum
        if len(self._orders_out) > 2 * len(self._accounts) + 4096:
            self._compact_orders_out()
        return orders

    def _take(self, account: _Account, now: float, orders: list[Order]) -> None:
        """A due account: order it on its open connection, or if its server admits a new one."""
        if account.holds_slot:
            self._issue(account, now, False, orders)
            return
        server = account.server
        if not self._waiting_counts.get(server) and self.limits.admit(server, account.account_id, now):
            account.holds_slot = True
            self._issue(account, now, True, orders)
        else:
            self._wait(account)

    def _wait(self, account: _Account) -> None:
        """Due, but refused by its server (or queued behind accounts that were): wait in line."""
        self._move(account, AccountState.WAITING)
        queue = self._waiting.get(account.server)
        if queue is None:
            queue = self._waiting[account.server] = deque()
        queue.append(account)

    def _admit_waiting(self, now: float, limit: int, orders: list[Order]) -> None:
        limits = self.limits
        for server, queue in list(self._waiting.items()):
            rotations_left = len(queue)
            while queue and len(orders) < limit:
                account = queue[0]
                if account.state != AccountState.WAITING or account.server != server:
                    queue.popleft()
                    continue
                if account.holds_slot:
                    queue.popleft()
                    self._issue(account, now, False, orders)
                elif limits.admit(server, account.account_id, now):
                    queue.popleft()
                    account.holds_slot = True
                    self._issue(account, now, True, orders)
                elif rotations_left > 0 and limits.refusal(server, account.account_id, now) is Refusal.ACCOUNT_FULL:
                    # Its own cap, not the server's: let the accounts behind it try.
                    rotations_left -= 1
                    queue.rotate(-1)
                else:
                    break
            if not self._waiting_counts.get(server):
                del self._waiting[server]

    def _issue(self, account: _Account, now: float, need_connect: bool, orders: list[Order]) -> None:
        self._move(account, AccountState.POLLING)
        account.ordered_at = now
        self._orders_out.append((now, account))
        lag = now - account.due_at
        self._lag_counts[bisect_left(LAG_BUCKETS, lag)] += 1
        self._lag_sum += lag
        orders.append(Order(account.account_id, account.server, need_connect, account.due_at, lag))

    def next_wakeup(self, now: float) -> float | None:
        """When ``due`` may next have work: ``now`` if anything is due or waiting on a refilling
        bucket, else the wheel's next due time (None: nothing scheduled). Waits on full servers
        end with a result or a closed connection, which the process answers with ``due`` anyway."""
        if self._due_backlog:
            return now
        wakeup = self._wheel.next_due()
        limits = self.limits
        for server in self._waiting:
            server_full = limits.connections(server) >= (limits.limits_for(server).max_connections_per_server or 0)
            if self._waiting_counts.get(server) and not server_full:
                refill_at = now + limits.wait_time(server, now)
                wakeup = refill_at if wakeup is None else min(wakeup, refill_at)
        return wakeup

    # -- results ---------------------------------------------------------------------------------

    def on_result(self, account_id: str, now: float, *, ok: bool, new_messages: int = 0,
                  failure_kind: str | None = None, retry_after: float | None = None,
                  connected: bool, idling: bool) -> None:
        """A worker finished an order. ``connected``: it keeps a connection open for the account;
        ``idling``: that connection is in IDLE. Success resets backoff; ``failure_kind`` "auth"
        counts toward ``auth_failure_limit``; other failures back off with jitter, never sooner
        than ``retry_after`` seconds. A result for an account with no order out (expired,
        requeued, disabled, removed) only updates the connection count."""
        self._now = now
        self.results_total += 1
        account = self._accounts.get(account_id)
        if account is None:
            self.stale_results_total += 1
            return
        if connected is not account.holds_slot:
            if connected:
                self.limits.occupy(account.server, account_id, now)
                account.holds_slot = True
            else:
                self._release_slot(account)
        if account.state is not AccountState.POLLING:
            self.stale_results_total += 1
            return
        if ok:
            if account.failures or account.auth_failures:
                account.failures = account.auth_failures = 0
            priority = account.priority
            if new_messages:
                priority.observe(new_messages, now)
            if idling and connected:
                self._schedule(account, AccountState.IDLING, now + self.config.idle_safety_interval)
                return
            # The hot path, inlined: polling -> scheduled (allowed), never due at once.
            interval = priority.fixed_interval or priority.interval(now)
            due_at = now + interval * (self._jitter_low + self._jitter_span * self._random())
            account.state = AccountState.SCHEDULED
            account.due_at = due_at
            self._wheel.schedule(account, due_at)
            return
        if failure_kind == "auth":
            account.auth_failures += 1
            if account.auth_failures >= self.config.auth_failure_limit:
                self._move(account, AccountState.AUTH_FAILED)
                return
        self._back_off(account, now, retry_after)

    def on_idle(self, account_id: str, now: float, idling: bool) -> None:
        """The worker entered (True) or lost (False) IDLE for the account. Idling needs only the
        safety poll; losing IDLE puts the account back on its tier's schedule, due at once."""
        account = self._accounts.get(account_id)
        if account is None:
            return
        self._now = now
        state = account.state
        if idling:
            if state in (AccountState.SCHEDULED, AccountState.BACKOFF) and account.holds_slot:
                self._schedule(account, AccountState.IDLING, now + self.config.idle_safety_interval)
        elif state == AccountState.IDLING:
            self._schedule(account, AccountState.SCHEDULED, now)

    def on_new_mail(self, account_id: str, now: float, count: int) -> None:
        """Mail seen through IDLE: feeds the account's rate and promotion."""
        account = self._accounts.get(account_id)
        if account is not None:
            account.priority.observe(count, now)

    def on_connection_closed(self, account_id: str, now: float | None = None) -> None:
        """The account's connection closed: its slot is released. An idling account has lost
        IDLE with it and is due at once (``now`` defaults to the latest time the planner saw)."""
        account = self._accounts.get(account_id)
        if account is None:
            return
        if account.holds_slot:
            self._release_slot(account)
        if account.state == AccountState.IDLING:
            self._schedule(account, AccountState.SCHEDULED, self._now if now is None else now)

    def expire_orders(self, now: float, timeout: float) -> list[str]:
        """Orders out for ``timeout`` seconds or more with no result: their worker is presumed
        dead. Each counts as a failure (backoff, in case the account is what kills workers) and
        its connection slot is released. Returns the account ids."""
        self._now = now
        expired = []
        orders_out = self._orders_out
        while orders_out:
            ordered_at, account = orders_out[0]
            current = account.state is AccountState.POLLING and account.ordered_at == ordered_at
            if current and ordered_at + timeout > now:
                break
            orders_out.popleft()
            if current and self._accounts.get(account.account_id) is account:
                expired.append(account)
        for account in expired:
            if account.holds_slot:
                self._release_slot(account)
            self._back_off(account, now, None)
        self.expired_total += len(expired)
        return [account.account_id for account in expired]

    def requeue(self, account_ids: list[str], now: float) -> int:
        """Take back the orders of these accounts (their worker slot died): slots released,
        due at once, no failure counted. Accounts with no order out are left alone; returns how
        many were requeued."""
        self._now = now
        requeued = 0
        for account_id in account_ids:
            account = self._accounts.get(account_id)
            if account is None or account.state != AccountState.POLLING:
                continue
            if account.holds_slot:
                self._release_slot(account)
            self._schedule(account, AccountState.SCHEDULED, now)
            requeued += 1
        return requeued

    # -- status ----------------------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> PlannerSnapshot:
        """Counts by state and tier, per-server connections/limits/waiting, and the lag histogram."""
        now = self._now if now is None else now
        servers = []
        for server in sorted(set(self._server_accounts) | set(self.limits.servers())):
            status = self.limits.status(server, now)
            servers.append(ServerSnapshot(
                server=server, accounts=self._server_accounts.get(server, 0),
                connections=status.connections, max_connections=status.max_connections,
                max_connections_per_account=status.max_connections_per_account,
                connects_per_minute=status.connects_per_minute, connect_tokens=status.connect_tokens,
                waiting=self._waiting_counts.get(server, 0)))
        # The census is counted here, not kept on every transition: one pass per status request
        # is cheaper than two list updates per scheduling decision.
        state_counts = [0] * len(AccountState)
        auto_accounts = 0
        for account in self._accounts.values():
            state_counts[account.state] += 1
            auto_accounts += account.priority.adaptive
        return PlannerSnapshot(
            accounts=len(self._accounts),
            states={state.name.lower(): state_counts[state] for state in AccountState},
            tiers={tier.name.lower(): self.rules.tier_counts[tier] for tier in Tier},
            auto_accounts=auto_accounts,
            in_flight=state_counts[AccountState.POLLING],
            due_backlog=len(self._due_backlog),
            servers=servers,
            lag=self._lag_histogram(),
            orders_total=sum(self._lag_counts),
            results_total=self.results_total,
            stale_results_total=self.stale_results_total,
            expired_total=self.expired_total,
        )

    def _lag_histogram(self) -> LagHistogram:
        counts = list(self._lag_counts)
        total = sum(counts)
        return LagHistogram(bounds=list(LAG_BUCKETS), counts=counts, count=total, sum=self._lag_sum,
                            p50=_bucket_quantile(0.5, counts, total), p99=_bucket_quantile(0.99, counts, total))

    # -- internals -------------------------------------------------------------------------------

    def _move(self, account: _Account, state: AccountState) -> None:
        """The one place a state changes: guard, census, wait-queue counts."""
        old = account.state
        if not (_ALLOWED_MASK[old] >> state) & 1:
            raise InvalidTransition(f"account {account.account_id}: {old.name} -> {state.name}")
        if old == state:
            return
        account.state = state
        if old == AccountState.WAITING:
            self._waiting_counts[account.server] -= 1
        elif state == AccountState.WAITING:
            self._waiting_counts[account.server] = self._waiting_counts.get(account.server, 0) + 1

    def _schedule(self, account: _Account, state: AccountState, due_at: float) -> None:
        self._move(account, state)
        account.due_at = due_at
        if due_at <= self._now:
            # Due already: straight to the backlog, not to the wheel's next tick boundary.
            self._wheel.cancel(account)
            self._due_backlog.append(account)
        else:
            self._wheel.schedule(account, due_at)

    def _cancel(self, account: _Account) -> None:
        """Out of the wheel (wait-queue, backlog and orders-out entries go stale by the state change)."""
        self._wheel.cancel(account)

    def _back_off(self, account: _Account, now: float, retry_after: float | None) -> None:
        account.failures += 1
        config = self.config
        delay = retry_delay(account.failures, config.backoff_base, config.backoff_max, self.rng, retry_after)
        self._schedule(account, AccountState.BACKOFF, now + delay)

    def _compact_orders_out(self) -> None:
        self._orders_out = deque(entry for entry in self._orders_out
                                 if entry[1].state is AccountState.POLLING and entry[1].ordered_at == entry[0])

    def _release_slot(self, account: _Account) -> None:
        self.limits.release(account.server, account.account_id)
        account.holds_slot = False


def wheel_slots(config: SchedulerConfig) -> int:
    """Level-0 slots to span the longest usual wait (a stretched low interval, the idle safety poll,
    the backoff cap), so most accounts never cascade; a power of two, at most 65536."""
    longest = max(config.low_interval * 1.5, config.idle_safety_interval, config.backoff_max)
    needed = max(64, int(longest / config.tick) + 1)
    return min(1 << (needed - 1).bit_length(), 1 << 16)


def _bucket_quantile(quantile: float, counts: list[int], total: int) -> float:
    """Prometheus histogram_quantile: linear inside the bucket; the top bucket reports its lower bound."""
    if total == 0:
        return 0.0
    rank = quantile * total
    cumulative = 0
    for index, count in enumerate(counts):
        if count and cumulative + count >= rank:
            if index == len(LAG_BUCKETS):
                return LAG_BUCKETS[-1]
            lower = LAG_BUCKETS[index - 1] if index else 0.0
            return lower + (LAG_BUCKETS[index] - lower) * (rank - cumulative) / count
        cumulative += count
    return LAG_BUCKETS[-1]
