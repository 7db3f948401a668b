"""The scheduler process: decides who is polled when, and who may open a connection.

It wraps the pure :class:`~mailingestd.sched.planner.Planner` (wheel, priorities, per-server buckets
and caps, backoff, circuit breaker) with I/O: accounts come from the store, orders go to the
worker that owns each account, results come back on one PULL socket. Each account belongs to one
worker slot by rendezvous hashing, so a restarted slot gets the same accounts back and a change
in the number of workers moves only the accounts it must. In-flight orders are bounded by
credits per worker, so a slow worker cannot pile up an unbounded queue.

Longer than the other modules: it is the process's one loop and the bookkeeping of each frame
kind (accounts, orders, results, worker restarts, control), which share the in-flight orders and
the worker credits. The pure parts live beside it: planner.py, results.py, accounts.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from .. import frames
from ..store import leases, retention
from ..child import Child, bind_pull, connect_push, ipc_path, send
from .. import config as config_mod
from ..config import AccountConfig, Config
from .accounts import credentials_version, owner_slot
from .planner import AccountPlan, Planner, ServerSnapshot
from .ratelimit import TIER_NAMES
from .results import ResultRows
from .states import AccountState
from ..store.postgres import listen_account_changes
from ..store.store import Store, StoreError, open_store

log = logging.getLogger(__name__)

ACCOUNTS_CHECK_INTERVAL = 2.0
MAX_WAIT = 0.5
STORE_STATES = {AccountState.AUTH_FAILED: "auth_failed", AccountState.DISABLED: "disabled"}


def capacity_stats(servers: list[ServerSnapshot]) -> dict[str, dict[str, float]]:
    """Per server, what a contended server's limits allow against what the tiers need
    (docs/contended-servers.md); ``late_accounts`` is keyed ``server/priority``."""
    stats: dict[str, dict[str, float]] = {name: {} for name in (
        "polls_needed", "polls_possible", "logins_last_minute", "connects_per_minute", "accounts_holding",
        "accounts_rotating", "late_accounts")}
    for server in servers:
        share = server.share
        if share is None:
            continue
        stats["polls_needed"][server.server] = round(share.polls_needed, 3)
        stats["polls_possible"][server.server] = round(share.polls_possible, 3)
        stats["logins_last_minute"][server.server] = server.logins_last_minute
        stats["connects_per_minute"][server.server] = server.connects_per_minute
        stats["accounts_holding"][server.server] = share.holders
        stats["accounts_rotating"][server.server] = share.rotating
        for tier, count in zip(TIER_NAMES, share.late):
            stats["late_accounts"][f"{server.server}/{tier}"] = count
    return stats


class Scheduler:
    def __init__(self, config: Config, parent_pid: int) -> None:
        self.config = config
        self.child = Child(config, "scheduler", 0, parent_pid)
        self.pull = bind_pull(self.child.ctx, ipc_path(config, "scheduler.sock"))
        self.workers = config.worker_count
        self.to_worker: dict[int, zmq.Socket] = {}
        self.credits_per_worker = max(4, config.imap.threads * 4)
        self.in_flight: dict[int, tuple[str, int]] = {}  # order_id -> (account_id, slot)
        self.order_by_account: dict[str, int] = {}
        self.credits_used: dict[int, int] = {}
        self.next_order_id = 1
        self.store: Store = open_store(config.store_url, 1, 2)
        self.leases = leases.manager_for(config, self.store)  # only accounts this node holds are planned
        self.planner = Planner(config.scheduler, config.limits, time.monotonic(),
                               burst_seconds=config.limits.connect_burst)
        self.accounts: dict[str, AccountConfig] = {}
        self.secrets: dict[str, dict[str, str]] = {}
        self.reauth: set[str] = set()
        self.held_auth_failed: set[str] = set()  # auth_failed read back from the store (restore_states)
        self.worker_pids: dict[int, int] = {}
        self.loaded = False  # the first load spreads first polls; later additions are polled at once
        self.listener: Any = None
        self.owner: dict[str, int] = {}
        self.accounts_version = ""
        self.next_accounts_check = 0.0
        self.draining = False
        self.drained_slots: set[int] = set()
        self.drain_in_flight = (0, 0)
        self.uidvalidity_changes = 0
        self.starved = False
        self.connect_sockets(self.workers)

    # --- wiring -----------------------------------------------------------------------------------
    def connect_sockets(self, workers: int) -> None:
        for slot in list(self.to_worker):
            if slot >= workers:
                self.to_worker.pop(slot).close(linger=0)
        for slot in range(workers):
            if slot not in self.to_worker:
                self.to_worker[slot] = connect_push(self.child.ctx, ipc_path(self.config, f"worker-{slot}.sock"))
                self.credits_used.setdefault(slot, 0)
        self.workers = workers

    def send_to(self, slot: int, frame: frames.Frame) -> bool:
        sock = self.to_worker.get(slot)
        return sock is not None and send(sock, frame)

    def assign(self, slot: int) -> None:
        accounts = [a for a in self.accounts.values() if self.owner.get(a.id) == slot and a.enabled]
        self.send_to(slot, frames.Assign(accounts=accounts,
                                         secrets={a.id: self.secrets[a.id] for a in accounts if self.secrets.get(a.id)}))

    # --- accounts ---------------------------------------------------------------------------------
    def load_accounts(self, now: float, force: bool = False) -> None:
        """Bring the planner and the assignment in line with the store's accounts table."""
        try:
            version = self.store.accounts_version()
            if version == self.accounts_version and not force:
                return
            rows = [row for row in self.store.list_accounts() if self.leases.holds(row.account.id)]
            parked = self.store.parked_accounts()
        except StoreError as exc:
            self.child.errors.add(f"role=scheduler event=store_unavailable error={exc}")
            return
        self.accounts_version = version
        fresh = {row.account.id: row.account for row in rows}
        bulk = not self.loaded or len(fresh.keys() - self.accounts.keys()) > 10
        self.loaded = True
        fresh_secrets = {row.account.id: row.secrets for row in rows}
        touched: set[int] = set()
        for account_id in list(self.accounts):
            if account_id not in fresh:
                self.planner.remove(account_id)
                touched.add(self.owner.pop(account_id))
                del self.accounts[account_id]
                self.secrets.pop(account_id, None)
                self.reauth.discard(account_id)
                self.held_auth_failed.discard(account_id)
                log.info("event=account_removed account=%s", account_id)
        for account_id, account in fresh.items():
            plan = AccountPlan(account_id=account_id, server=account.host, priority=account.priority,
                               idle=account.idle, enabled=account.enabled,
                               credentials_version=credentials_version(account, fresh_secrets[account_id]))
            old = self.accounts.get(account_id)
            secrets_changed = self.secrets.get(account_id, {}) != fresh_secrets[account_id]
            self.secrets[account_id] = fresh_secrets[account_id]
            slot = owner_slot(account_id, self.workers)
            if old is None:
                # At start (or a reload adding many) first polls are spread; an account added to
                # a running daemon is polled at once, so its mail arrives within seconds.
                self.planner.add(plan, now, spread=bulk)
                log.info("event=account_added account=%s server=%s worker=%d", account_id, account.host, slot)
            elif old != account or secrets_changed or self.planner.plan_of(account_id) != plan:
                # The plan also changes when only the secret file did (its mtime is in the
                # credentials version): that must lift auth_failed on a reload.
                self.planner.update(plan, now)
                log.info("event=account_changed account=%s", account_id)
                if account_id in self.reauth:
                    self.reauth.discard(account_id)  # changed credentials: try again
                    self.planner.enable(account_id, now)
            else:
                continue
            self.accounts[account_id] = account
            if self.owner.get(account_id, slot) != slot:
                touched.add(self.owner[account_id])
            self.owner[account_id] = slot
            touched.add(slot)
        self.restore_states(parked, now)
        for slot in touched:
            self.assign(slot)

    def restore_states(self, parked: dict[str, tuple[str, str | None]], now: float) -> None:
        """The store's account state is the circuit breaker's memory: an open circuit survives
        restarts (each restart allowing auth_failure_limit more wrong logins gets a mailbox locked
        by its provider). An account stored as auth_failed or reauth_required is held unless its
        credentials changed since (a new password file while the daemon was down); one held here
        whose stored state was reset (``mailingestctl account enable``, changed settings) is let
        go and polled at once."""
        for account_id, account in self.accounts.items():
            plan = self.planner.plan_of(account_id)
            held = (account_id in self.reauth or account_id in self.held_auth_failed
                    or self.planner.state_of(account_id) == AccountState.AUTH_FAILED)
            stored = parked.get(account_id)
            if stored is not None and plan is not None and stored[1] not in (None, plan.credentials_version):
                log.info("event=account_state_cleared account=%s state=%s reason=credentials_changed",
                         account_id, stored[0])
                self.set_store_state(account_id, "new", None)
                stored = None
            if stored is not None and not held:
                self.planner.disable(account_id)
                (self.reauth if stored[0] == "reauth_required" else self.held_auth_failed).add(account_id)
                log.info("event=account_state_restored account=%s state=%s", account_id, stored[0])
            elif stored is None and held:
                self.reauth.discard(account_id)
                self.held_auth_failed.discard(account_id)
                if account.enabled:
                    self.planner.enable(account_id, now)
                log.info("event=account_released account=%s reason=state_reset", account_id)

    def set_store_state(self, account_id: str, state: str, detail: str | None) -> None:
        plan = self.planner.plan_of(account_id)
        try:
            self.store.set_account_state(account_id, state, detail, plan.credentials_version if plan else None)
        except StoreError as exc:
            self.child.errors.add(f"role=scheduler event=store_unavailable error={exc}")

    def redeal(self, workers: int, now: float) -> None:
        """The number of workers changed: move the accounts whose owner changed."""
        self.connect_sockets(workers)
        moved = 0
        for account_id in self.accounts:
            slot = owner_slot(account_id, workers)
            if self.owner.get(account_id) != slot:
                self.planner.on_connection_closed(account_id, now)
                self.owner[account_id] = slot
                moved += 1
        for order_id, (account_id, slot) in list(self.in_flight.items()):
            if slot >= workers:
                self.forget_order(order_id)
                self.planner.requeue([account_id], now)
        for slot in range(workers):
            self.assign(slot)
        log.info("event=accounts_redealt workers=%d moved=%d", workers, moved)

    # --- frames -----------------------------------------------------------------------------------
    def read_frames(self, now: float) -> None:
        """The frames waiting, in order; results are gathered and classified in one planner call,
        handed over before any other frame so that each account's events keep their order."""
        rows = ResultRows()
        for _ in range(10_000):  # bounded per turn so heartbeats and orders keep flowing
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            frame = self.child.decode(data)
            if isinstance(frame, frames.Result):
                rows = self.gather_result(frame, rows, now)
                continue
            if rows:
                rows = self.take_results(rows, now)
            if isinstance(frame, frames.NewMail):
                self.planner.on_new_mail(frame.account_id, now, frame.count)
            elif isinstance(frame, frames.WorkerReady):
                self.on_worker_ready(frame, now)
            elif isinstance(frame, frames.Drained):
                self.drained_slots.add(frame.slot)
                self.drain_in_flight = (self.drain_in_flight[0] + frame.in_flight_accounts,
                                        self.drain_in_flight[1] + frame.in_flight_messages)
            elif isinstance(frame, frames.Control):
                self.on_control(frame, now)
            elif frame is not None:
                self.child.frames_dropped += 1
        if rows:
            self.take_results(rows, now)

    def gather_result(self, result: frames.Result, rows: ResultRows, now: float) -> ResultRows:
        """One job's outcome, whatever started it (an order, a push, a renewal, a lost
        connection): the order bookkeeping at once; the classification (backoff and
        ``retry_after``, the auth breaker) in the batch, or at once for what the batch does not
        take (a requeue, ``reauth_required``, an account already in the batch or unknown)."""
        if result.uidvalidity_changed:
            self.uidvalidity_changes += 1
        if result.order_id:
            if result.order_id not in self.in_flight:
                return rows  # an order already taken back (its worker was replaced)
            self.forget_order(result.order_id)
        account_id = result.account_id
        index = self.planner.index_of(account_id)
        if (index is None or account_id in rows.accounts or result.failure_kind in frames.NOT_THE_ACCOUNTS_FAULT
                or result.failure_kind is frames.FailureKind.REAUTH):
            if rows:
                rows = self.take_results(rows, now)
            self.guarded(result, now, lambda: self.on_result(result, now))
            return rows
        self.note_missing_folders(result)
        rows.add(result, index, self.planner.state_of(account_id))
        return rows

    def take_results(self, rows: ResultRows, now: float) -> ResultRows:
        """Classify the gathered results in one planner call; then what follows each of them. Should
        the batch break, the results go again one by one, so only the one that breaks is parked."""
        try:
            rows.apply(self.planner, now)
        except Exception:
            log.exception("event=result_batch_failed results=%d action=one_by_one", len(rows))
            for result, index, before in zip(rows.results, rows.indexes, rows.before):
                one = ResultRows()
                one.add(result, index, before)
                self.guarded(result, now, lambda one=one: one.apply(self.planner, now))
        for result, before in zip(rows.results, rows.before):
            self.after_result(result, before, now)
        return ResultRows()

    def guarded(self, result: frames.Result, now: float, classify: Callable[[], None]) -> None:
        """``classify``, but one result that breaks it parks its account instead of ending the
        scheduler: a restart would poll the same account and die again (a crash loop is exit 70,
        the whole service down for one hostile reply)."""
        try:
            classify()
        except Exception as exc:
            log.exception("event=result_failed account=%s failure_kind=%s error=%s action=backoff",
                          result.account_id, result.failure_kind, exc)
            self.child.errors.add(f"account={result.account_id} event=result_failed "
                                  f"error={type(exc).__name__}: {exc}")
            try:
                self.planner.on_result(result.account_id, now, ok=False,
                                       failure_kind=frames.FailureKind.PROTOCOL, connected=result.connected,
                                       idling=False, ordered=result.order_id > 0)
            except Exception:
                log.exception("event=result_failed account=%s action=none", result.account_id)

    def forget_order(self, order_id: int) -> None:
        account_id, slot = self.in_flight.pop(order_id)
        self.order_by_account.pop(account_id, None)
        self.credits_used[slot] = max(0, self.credits_used.get(slot, 0) - 1)

    def on_result(self, result: frames.Result, now: float) -> None:
        """One result the batch does not take (its order bookkeeping is done): every result goes
        through the same classification; only what surrounds it differs."""
        account_id = result.account_id
        if result.failure_kind in frames.NOT_THE_ACCOUNTS_FAULT:
            # The worker had no connection to use: due again at once, no failure counted.
            self.planner.on_connection_closed(account_id, now)
            if result.order_id:
                self.planner.requeue([account_id], now)
            return
        if result.failure_kind is frames.FailureKind.REAUTH:
            self.park_for_reauth(account_id, now, result)
            return
        self.note_missing_folders(result)
        before = self.planner.state_of(account_id)
        self.planner.on_result(account_id, now, ok=result.ok, new_messages=result.new_messages,
                               failure_kind=result.failure_kind, retry_after=result.retry_after,
                               connected=result.connected, idling=result.idling,
                               ordered=result.order_id > 0, watches_all=result.watches_all)
        self.after_result(result, before, now)

    def note_missing_folders(self, result: frames.Result) -> None:
        if result.missing_folders:
            self.child.errors.add(f"account={result.account_id} error_kind=mailbox "
                                  f"error=folders missing on the server: {', '.join(result.missing_folders)}")

    def after_result(self, result: frames.Result, before: AccountState | None, now: float) -> None:
        """A worker's own result (a push, a renewal) moves IDLE, and a state the store keeps is saved."""
        if not result.order_id and result.ok:
            if result.connected and result.idling:
                self.planner.on_idle(result.account_id, now, True)
            elif not result.connected:
                self.planner.on_connection_closed(result.account_id, now)
        self.note_state(result.account_id, before, result)

    def park_for_reauth(self, account_id: str, now: float, result: frames.Result) -> None:
        """The provider refused the refresh token: only a person can fix that, so no retries (no
        backoff loop against the token endpoint) until the account's credentials change."""
        self.planner.on_result(account_id, now, ok=False, failure_kind=frames.FailureKind.REAUTH,
                               connected=result.connected, ordered=result.order_id > 0,
                               idling=False)
        self.planner.disable(account_id)
        self.reauth.add(account_id)
        log.error("event=account_state account=%s state=reauth_required error=%s", account_id, result.detail)
        self.child.errors.add(f"account={account_id} state=reauth_required error={result.detail}")
        self.set_store_state(account_id, "reauth_required", result.detail)

    def note_state(self, account_id: str, before: AccountState | None, result: frames.Result) -> None:
        after = self.planner.state_of(account_id)
        if after == before or after not in STORE_STATES:
            return
        log.error("event=account_state account=%s state=%s error_kind=%s error=%s", account_id,
                  STORE_STATES[after], result.failure_kind, result.detail)
        self.child.errors.add(f"account={account_id} state={STORE_STATES[after]} error={result.detail}")
        self.set_store_state(account_id, STORE_STATES[after], result.detail)

    def on_worker_ready(self, ready: frames.WorkerReady, now: float) -> None:
        """A worker (re)started: take back its orders, forget its connections, give it its accounts.

        The first WorkerReady of a slot after this scheduler started is not a restart: orders sent
        before it are queued by ZeroMQ and will be delivered, so they are not taken back.
        """
        known = self.worker_pids.get(ready.slot)
        restarted = known != ready.pid if known is not None else ready.incarnation > 0
        self.worker_pids[ready.slot] = ready.pid
        stale = [oid for oid, (_, slot) in self.in_flight.items() if slot == ready.slot] if restarted else []
        for order_id in stale:
            account_id = self.in_flight[order_id][0]
            self.forget_order(order_id)
            self.planner.requeue([account_id], now)
        # Only a restarted worker has lost its connections: a first WorkerReady can come after the
        # worker already connected for orders sent before it, and forgetting those slots would
        # let the planner admit past max_connections_per_server (seen in the integration test).
        for account_id, slot in self.owner.items() if restarted else ():
            if slot == ready.slot:
                self.planner.on_connection_closed(account_id, now)
        if restarted:
            self.credits_used[ready.slot] = 0
        self.drained_slots.discard(ready.slot)
        self.assign(ready.slot)
        if self.draining:
            self.send_to(ready.slot, frames.Drain())
        log.info("event=worker_ready worker=%d pid=%d requeued=%d", ready.slot, ready.pid, len(stale))

    def on_control(self, command: frames.Control, now: float) -> None:
        if command.command == "drain":
            self.draining = True
            self.drained_slots = set()
            self.drain_in_flight = (0, 0)
            for slot in range(self.workers):
                self.send_to(slot, frames.Drain())
        elif command.command == "resume":
            self.draining = False
            for slot in range(self.workers):
                self.send_to(slot, frames.Resume())
        elif command.command == "reload":
            self.reconfigure(now)
            if command.workers and command.workers != self.workers:
                self.redeal(command.workers, now)
            self.load_accounts(now, force=True)

    def reconfigure(self, now: float) -> None:
        """Intervals, thresholds and limits from the reloaded file (the supervisor validated it)."""
        try:
            fresh = config_mod.load(self.config.path or None)
        except config_mod.ConfigError as exc:
            self.child.errors.add(f"role=scheduler event=reload_failed error={exc}")
            return
        self.planner.reconfigure(fresh.scheduler, fresh.limits, now, burst_seconds=fresh.limits.connect_burst)
        self.config = msgspec.structs.replace(self.config, scheduler=fresh.scheduler, limits=fresh.limits)

    # --- orders -------------------------------------------------------------------------------------
    def send_orders(self, now: float) -> None:
        free = sum(max(0, self.credits_per_worker - self.credits_used.get(s, 0)) for s in range(self.workers))
        self.starved = free <= 0
        if self.draining or free <= 0:
            return
        refused = []
        orders = self.planner.due_batch(now, free)
        if not len(orders):
            return
        for account_id, need_connect, release in zip(orders.account_ids, orders.need_connect.tolist(),
                                                     orders.release.tolist()):
            slot = self.owner.get(account_id)
            if slot is None or self.credits_used.get(slot, 0) >= self.credits_per_worker:
                refused.append(account_id)
                continue
            order_id = self.next_order_id
            self.next_order_id += 1
            # release: the account rotates on a contended server (Planner, docs/contended-servers.md).
            if not self.send_to(slot, frames.Poll(account_id=account_id, order_id=order_id,
                                                  may_connect=need_connect, release=release)):
                refused.append(account_id)
                continue
            self.in_flight[order_id] = (account_id, slot)
            self.order_by_account[account_id] = order_id
            self.credits_used[slot] = self.credits_used.get(slot, 0) + 1
        if refused:
            self.planner.requeue(refused, now)
            self.starved = True

    def expire_orders(self, now: float) -> None:
        timeout = self.config.scheduler.order_timeout
        for account_id in self.planner.expire_orders(now, timeout):
            order_id = self.order_by_account.get(account_id)
            if order_id is not None:
                self.forget_order(order_id)
            self.child.errors.add(f"account={account_id} event=order_expired after={timeout:.0f}s")

    # --- heartbeat ----------------------------------------------------------------------------------
    def state_name(self) -> str:
        if not self.draining:
            return "running"
        return "drained" if self.drained_slots >= set(range(self.workers)) else "draining"

    def heartbeat(self, now: float) -> None:
        snap = self.planner.snapshot(now)
        by_state_priority: dict[str, float] = dict(self.planner.census())
        held = [(a, "reauth_required") for a in self.reauth] + [(a, "auth_failed") for a in self.held_auth_failed]
        for account_id, state in held:  # parked as disabled in the planner; shown as what they are
            tier = self.planner.tier_of(account_id)
            if tier is not None:
                key = f"{tier.name.lower()}"
                by_state_priority[f"disabled/{key}"] = by_state_priority.get(f"disabled/{key}", 1) - 1
                by_state_priority[f"{state}/{key}"] = by_state_priority.get(f"{state}/{key}", 0) + 1
        self.child.heartbeat(self.state_name(), now, stats=frames.SchedulerStats(
            accounts=snap.accounts, in_flight=snap.in_flight, uidvalidity_changes=self.uidvalidity_changes,
            drain_in_flight_accounts=self.drain_in_flight[0], drain_in_flight_messages=self.drain_in_flight[1],
        ), labeled={
            "accounts": by_state_priority,
            "connection_limit": {s.server: s.max_connections for s in snap.servers},
            "waiting": {s.server: s.waiting for s in snap.servers},
            **capacity_stats(snap.servers),
        }, histograms={"scheduler_lag_seconds": snap.lag.to_wire()}, detail=self.leases.detail())

    # --- the loop -----------------------------------------------------------------------------------
    def listen_for_account_changes(self, poller: zmq.Poller) -> None:
        """On PostgreSQL, LISTEN for the accounts trigger's NOTIFY so that a row written by the user's
        own backend takes effect at once; the periodic revision check stays as the safety net."""
        if not self.config.store_url.startswith(("postgresql://", "postgres://")):
            return
        try:
            self.listener = listen_account_changes(self.config.store_url)
            poller.register(self.listener.fileno(), zmq.POLLIN)
        except Exception as exc:  # the revision check still catches every change, a little later
            self.listener = None
            self.child.errors.add(f"role=scheduler event=listen_failed error={str(exc).splitlines()[0]}")

    def account_notifications(self) -> bool:
        if self.listener is None:
            return False
        try:
            return bool(list(self.listener.notifies(timeout=0)))
        except Exception:
            self.listener = None
            return True

    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        self.listen_for_account_changes(poller)
        self.load_accounts(time.monotonic(), force=True)
        for slot in range(self.workers):
            self.assign(slot)
        while not self.child.stop_requested and self.child.parent_alive():
            now = time.monotonic()
            wakeup = self.planner.next_wakeup(now)
            if wakeup is None or self.starved or self.draining:
                wait = MAX_WAIT  # a result arriving wakes the poll anyway
            else:
                wait = min(MAX_WAIT, max(0.0, wakeup - now))
            poller.poll(wait * 1000)
            now = time.monotonic()
            self.read_frames(now)
            notified = self.account_notifications()
            if notified:
                self.leases.hurry()  # a new account is claimed this turn, not at the next round
            if self.leases.tick(now, self.state_name()):
                self.load_accounts(now, force=True)
            if notified or now >= self.next_accounts_check:
                self.next_accounts_check = now + ACCOUNTS_CHECK_INTERVAL
                self.load_accounts(now)
            self.send_orders(now)
            self.expire_orders(now)
            if self.child.heartbeat_due(now):
                self.heartbeat(now)
        self.leases.close()
        self.store.close()
        self.child.close()
        return 0


def main(config: Config, slot: int, parent_pid: int) -> int:
    scheduler = Scheduler(config, parent_pid)
    # Retention and PostgreSQL partitions ahead run in a thread beside the wheel (retention.py says why here).
    retention.start_thread(config.store_url, config.store, lambda: scheduler.child.stop_requested)
    return scheduler.run()

