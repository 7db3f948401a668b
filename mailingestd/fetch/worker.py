"""A worker: holds the IMAP connections of the accounts its slot owns, for hours and days.

One thread runs the event loop: a selector over the worker's ZeroMQ PULL socket, a wake-up pipe
and the socket of every idling connection. Notifications are read there without blocking
(``imap.idle_read``). Everything that blocks (connect, login, STATUS, fetch, commit, IDLE
renewal, LOGOUT) runs on a small bounded thread pool, and a session is owned by at most one
thread at a time: the loop unregisters an idling socket before it hands the session to a job,
and takes it back when the job's outcome arrives through the completion queue.

Every new connection is granted by the scheduler (``Poll.may_connect``), which owns the
per-server token buckets and connection caps; a worker never reconnects on its own.

Leaving IDLE for a renewal (``imap.idle_renew``) or a keepalive probe (``imap.keepalive`` of
silence) costs no thread: the loop sends ``DONE`` itself and waits for the reply in the selector.
A reply hands the session to a job (check every folder, re-enter IDLE); no reply within
``imap.timeout`` declares the connection dead. So a network cut that silences thousands of
sessions is detected in one timeout, not in thousands of thread-timeouts queued behind each other.
Renewal times are jittered so sessions that entered IDLE together do not renew together.

At most ``imap.threads`` jobs are handed to the pool; the rest wait in ``job_backlog`` (one entry
per session at most, since a busy session takes no second job), and no renewal starts while
jobs wait: a burst of notifications on thousands of sessions queues references, not work.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import math
import os
import queue
import random
import selectors
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from .. import child as child_mod, frames
from . import imap, ingest
from ..store.blobs import open_blobs
from ..child import Child, bind_pull, connect_push, ipc_path, send
from ..config import AccountConfig, Config, ConfigError
from ..auth.credentials import Credentials, ReauthRequired, TokenEndpointError
from ..histogram import Histogram
from .ingest import SyncResult, sync_folder
from ..store.leases import fence_for
from ..store.store import Store, open_store

log = logging.getLogger(__name__)

LOOP_TICK = 0.5
# Renewals and keepalive probes fall in the last RENEW_JITTER of their interval, drawn afresh at
# every IDLE entry: 10,000 sessions that entered IDLE together renew spread over 2 of 10 minutes.
RENEW_JITTER = 0.2
# DONEs sent per loop turn at most, so a wave of due renewals cannot stall the loop.
PROBES_PER_TURN = 500


class Session:
    """One account's connection. ``busy``: a pool thread owns it; otherwise the loop does.

    While idling: ``renew_at`` is the jittered renewal time, ``keepalive_after`` the jittered
    silence that triggers a probe, ``probe_deadline`` set while our DONE awaits its reply;
    ``generation`` counts IDLE entries (timer entries of older ones are stale).
    """

    __slots__ = ("account", "busy", "checked_at", "client", "fd", "generation", "heard_at", "idle_capable",
                 "idle_folder", "idling", "keepalive_after", "pending_order", "probe_deadline", "renew_at",
                 "watches_all")

    def __init__(self, account: AccountConfig) -> None:
        self.account = account
        self.client: Any = None
        self.busy = False
        self.idling = False
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

    def start(self, session: Session, now: float) -> None:
        """The session (re)entered IDLE at ``now``."""
        session.generation += 1
        session.heard_at = now
        session.probe_deadline = None
        session.renew_at = now + self.renew_after * (1.0 - RENEW_JITTER * self.random())
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


class Outcome(msgspec.Struct):
    """What a pool job reports back to the loop (the loop turns it into one ``frames.Result``)."""

    account_id: str
    order_id: int
    trigger: frames.Trigger
    ok: bool
    client: Any = None
    idling: bool = False
    idle_capable: bool = False
    watches_all: bool = True
    new_messages: int = 0
    new_bytes: int = 0
    fetch_seconds: float = 0.0
    failure_kind: frames.FailureKind | None = None
    detail: str | None = None
    retry_after: float | None = None
    uidvalidity_changed: bool = False
    pushed_pending: tuple[str, ...] = ()  # folders announced as IDLE began: check them at once
    checked_all: bool = False
    backlog: int = 0
    connected_now: bool = False
    notified_at: float | None = None
    primary_current: bool = False  # the primary folder was EXAMINEd last and nothing ran since
    idle_folder: str | None = None  # the folder selected for IDLE (None: NOTIFY, nothing selected)
    missing_folders: list[str] = []


class Worker:
    def __init__(self, config: Config, slot: int, parent_pid: int) -> None:
        self.config = config
        self.slot = slot
        self.child = Child(config, "worker", slot, parent_pid)
        self.pull = bind_pull(self.child.ctx, ipc_path(config, f"worker-{slot}.sock"))
        self.to_scheduler = connect_push(self.child.ctx, ipc_path(config, "scheduler.sock"))
        self.store: Store = open_store(config.store_url, config.store.pool_min, config.store.pool_max)
        self.store.blobs = open_blobs(config.blobs)  # [blobs] kind = "s3": raw bytes to S3 before each commit
        self.store.fence = fence_for(config)  # cluster: commit only while this node holds the lease
        self.credentials = Credentials(config.secrets.key_file, self.store)
        self.secrets: dict[str, dict[str, str]] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.imap.threads,
                                                          thread_name_prefix=f"worker{slot}")
        self.max_jobs = config.imap.threads
        self.running_jobs = 0
        self.job_backlog: collections.deque[tuple[Callable[..., Outcome | None], tuple[Any, ...]]] = \
            collections.deque()
        self.timers = IdleTimers(config.imap.idle_renew, config.imap.keepalive)
        self.probes: collections.deque[tuple[float, int, Session]] = collections.deque()
        self.done: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.pull.getsockopt(zmq.FD), selectors.EVENT_READ, None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.sessions: dict[str, Session] = {}
        # folder -> (UIDVALIDITY, UIDNEXT) at the last check that found it complete, by account
        self.folders_current: dict[str, dict[str, tuple[int, int]]] = {}
        self.missing: dict[str, frozenset[str]] = {}  # configured folders the server does not have
        self.notify_refused: set[str] = set()  # servers that advertise NOTIFY but refused NOTIFY SET
        self.draining = False
        self.drained_sent = False
        self.drain_in_flight = (0, 0)
        self.polls: dict[str, int] = {}
        self.connects: dict[str, int] = {}
        self.messages = 0
        self.bytes = 0
        self.fetch_hist = Histogram()
        self.new_mail_hist = Histogram()

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        send(self.to_scheduler, frames.WorkerReady(slot=self.slot, pid=self.child.pid, incarnation=child_mod.INCARNATION))
        deadline = None
        while True:
            now = time.monotonic()
            if self.child.stop_requested and deadline is None:
                deadline = now + (1.0 if self.child.fast_stop else self.config.daemon.shutdown_timeout)
                self.start_drain()
            if deadline is not None and (self.fully_drained() or now > deadline):
                break
            if not self.child.parent_alive():
                break
            for key, _ in self.selector.select(timeout=self.select_timeout(now)):
                if key.data is not None:
                    self.on_readable(key.data, now)
            self.read_frames()
            self.collect_outcomes()
            self.service_timers(time.monotonic())
            if self.draining and not self.drained_sent and self.fully_drained():
                self.drained_sent = True
                send(self.to_scheduler, frames.Drained(slot=self.slot, in_flight_accounts=self.drain_in_flight[0],
                                                       in_flight_messages=self.drain_in_flight[1]))
            if self.child.heartbeat_due(now):
                self.heartbeat(now)
        self.shutdown()
        return 0

    def read_frames(self) -> None:
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            frame = self.child.decode(data)
            if isinstance(frame, frames.Poll):
                self.on_poll(frame)
            elif isinstance(frame, frames.Assign):
                self.on_assign(frame.accounts, frame.secrets)
            elif isinstance(frame, frames.Drain):
                self.start_drain()
            elif isinstance(frame, frames.Resume):
                self.draining = False
                self.drained_sent = False
            elif frame is not None:
                self.child.frames_dropped += 1

    def on_assign(self, accounts: list[AccountConfig], secrets: dict[str, dict[str, str]]) -> None:
        for account_id, fields in secrets.items():
            if self.secrets.get(account_id) != fields:
                self.credentials.forget(account_id)  # new credentials: no cached token from the old ones
        self.secrets = secrets
        wanted = {a.id: a for a in accounts}
        for account_id in list(self.sessions):
            if account_id not in wanted:
                self.retire(self.sessions.pop(account_id))
                self.folders_current.pop(account_id, None)
                self.missing.pop(account_id, None)
        for account_id, account in wanted.items():
            session = self.sessions.get(account_id)
            if session is None:
                self.sessions[account_id] = Session(account)
            elif session.account != account:
                session.account = account
                self.folders_current.pop(account_id, None)
                self.retire(session)  # settings changed: the next poll connects afresh

    def on_poll(self, order: frames.Poll) -> None:
        session = self.sessions.get(order.account_id)
        if session is None or self.draining:
            kind = frames.FailureKind.UNASSIGNED if session is None else frames.FailureKind.DRAINING
            send(self.to_scheduler, frames.Result(slot=self.slot, account_id=order.account_id, order_id=order.order_id,
                                                  ok=False, connected=False, idling=False, failure_kind=kind))
            return
        if session.busy:
            session.pending_order = order
            return
        if (session.idling and session.watches_all and not order.release
                and time.monotonic() - session.checked_at < self.config.imap.idle_renew):
            # The safety poll of an account whose every folder is pushed and whose IDLE renewal
            # checked every folder since: that renewal was the poll; answering without IMAP work
            # halves a quiet daemon's CPU. Without push for every folder, the order checks them.
            self.polls["ok"] = self.polls.get("ok", 0) + 1
            send(self.to_scheduler, frames.Result(slot=self.slot, account_id=order.account_id,
                                                  order_id=order.order_id, ok=True, connected=True, idling=True))
            return
        self.start_job(session, frames.Trigger.ORDER, order.order_id, order.may_connect, release=order.release)

    def on_readable(self, session: Session, now: float) -> None:
        if session.busy or not session.idling:
            return
        try:
            responses = imap.idle_read(session.client)
        except imap.ImapError as exc:
            self.start_job(session, frames.Trigger.CONNECTION, failure=imap.ImapError(
                exc.kind, f"idle connection lost: {exc.detail}", exc.retry_after))
            return
        if responses:
            session.heard_at = now
        pushed = self.pushed(session.account, session.idle_folder, responses)
        if imap.literal_waiting(session.client):
            # A response with a literal: a job reads it (bounded), never this loop.
            pushed = tuple(session.account.folders)
        notified = now if pushed else None
        if not imap.idling(session.client):  # the server answered our DONE: renew, all folders
            self.start_job(session, frames.Trigger.RENEWAL, notified=notified)
        elif pushed:
            self.start_job(session, frames.Trigger.PUSH, notified=notified, pushed=pushed)

    def pushed(self, account: AccountConfig, idle_folder: str | None,
               responses: list[tuple[Any, ...]]) -> tuple[str, ...]:
        """The configured folders an idling connection's responses announce news for: the folder
        IDLE runs on for ``EXISTS``/``RECENT``/``FETCH``, and each folder a NOTIFY ``STATUS``
        names, unless its UIDNEXT is the one the last complete check saw (an expunge)."""
        folders: list[str] = []
        if idle_folder is not None and imap.has_new_mail(responses):
            folders.append(idle_folder)
        known = self.folders_current.get(account.id, {})
        for folder, uidnext in imap.pushed_folders(responses).items():
            if folder not in account.folders or folder in folders:
                continue  # never act on a folder the account does not configure
            if uidnext is not None and folder in known and known[folder][1] == uidnext:
                continue
            folders.append(folder)
        return tuple(folders)

    def select_timeout(self, now: float) -> float:
        """Sleep until the next renewal, probe or probe deadline is due, at most LOOP_TICK."""
        due = [LOOP_TICK]
        if self.timers.heap and not self.job_backlog:
            due.append(self.timers.heap[0][0] - now)
        if self.probes:
            due.append(self.probes[0][0] - now)
        return max(0.0, min(due))

    def service_timers(self, now: float) -> None:
        """Declare dead the connections that left our DONE unanswered; send DONE to those due for
        renewal or a keepalive probe (none while jobs wait: the pool is the bottleneck)."""
        timeout = self.config.imap.timeout
        while self.probes and self.probes[0][0] <= now:
            _, generation, session = self.probes.popleft()
            if session.generation == generation and session.probe_deadline is not None and not session.busy:
                self.start_job(session, frames.Trigger.CONNECTION, failure=imap.ImapError(
                    imap.FailureKind.TIMEOUT, f"no reply to DONE within {timeout:g}s: connection presumed dead"))
        if self.job_backlog:
            return
        for session in self.timers.due(now, PROBES_PER_TURN):
            try:
                imap.idle_done_send(session.client)
            except imap.ImapError as exc:
                self.start_job(session, frames.Trigger.CONNECTION, failure=exc)
                continue
            session.probe_deadline = now + timeout
            self.probes.append((session.probe_deadline, session.generation, session))

    # --- handing sessions to the pool ---------------------------------------------------------
    def start_job(self, session: Session, trigger: frames.Trigger, order_id: int = 0, may_connect: bool = False,
                  notified: float | None = None, failure: imap.ImapError | None = None,
                  pushed: tuple[str, ...] = (), release: bool = False) -> None:
        """Hand the session to :meth:`job`: every trigger (an order, a push, a renewal, a broken
        connection) runs the same job and comes back as one Outcome through :meth:`on_outcome`."""
        if session.fd is not None:
            self.selector.unregister(session.fd)
            session.fd = None
        session.busy = True
        session.probe_deadline = None
        was_idling, session.idling = session.idling, False
        self.submit(self.job, session.account, session.client, trigger, order_id, may_connect, was_idling,
                    notified, failure, pushed, release)

    def submit(self, function: Callable[..., Outcome | None], *args: Any) -> None:
        """Run ``function(*args)`` on the pool, or queue it while ``max_jobs`` are running."""
        if self.running_jobs >= self.max_jobs:
            self.job_backlog.append((function, args))
            return
        self.running_jobs += 1
        self.pool.submit(function, *args).add_done_callback(self._job_done)

    def _job_done(self, future: concurrent.futures.Future) -> None:
        try:
            outcome = future.result()
        except BaseException:  # a bug; the slot must still be counted back
            log.exception("event=job_crashed worker=%d", self.slot)
            outcome = None
        self.done.put(outcome)
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass  # the loop is already due to wake

    def collect_outcomes(self) -> None:
        try:
            while True:
                os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                outcome = self.done.get_nowait()
            except queue.Empty:
                break
            self.running_jobs -= 1
            if outcome is not None:
                self.on_outcome(outcome)
        while self.job_backlog and self.running_jobs < self.max_jobs:
            function, args = self.job_backlog.popleft()
            self.submit(function, *args)

    def on_outcome(self, outcome: Outcome) -> None:
        session = self.sessions.get(outcome.account_id)
        now = time.monotonic()
        if session is None:  # retired while the job ran: just close what it holds
            if not outcome.ok and outcome.failure_kind not in frames.NOT_THE_ACCOUNTS_FAULT:
                # Still one line: e.g. a commit refused after the account's lease moved away.
                log.warning("event=poll_failed account=%s error_kind=%s error=%s detail=account_no_longer_assigned",
                            outcome.account_id, outcome.failure_kind, outcome.detail)
            if outcome.client is not None:
                self.submit(imap.logout, outcome.client, min(self.config.imap.timeout, 10.0))
            return
        session.busy = False
        if outcome.ok and outcome.checked_all:
            session.checked_at = now
        session.client = outcome.client
        session.idle_capable = outcome.idle_capable
        session.watches_all = outcome.watches_all
        session.idle_folder = outcome.idle_folder
        server = session.account.host
        if outcome.connected_now:
            self.connects[server] = self.connects.get(server, 0) + 1
        result_key = "ok" if outcome.ok else (outcome.failure_kind or frames.FailureKind.PROTOCOL).value
        if outcome.order_id or not outcome.ok or outcome.new_messages:
            self.polls[result_key] = self.polls.get(result_key, 0) + 1
        self.note_missing_folders(session.account, outcome.missing_folders, outcome.checked_all)
        self.messages += outcome.new_messages
        self.bytes += outcome.new_bytes
        if outcome.fetch_seconds:
            self.fetch_hist.observe(outcome.fetch_seconds)
        if outcome.notified_at is not None and outcome.new_messages:
            self.new_mail_hist.observe(now - outcome.notified_at)
        if not outcome.ok and outcome.failure_kind not in frames.NOT_THE_ACCOUNTS_FAULT:
            self.child.errors.add(f"account={outcome.account_id} server={server} error_kind={outcome.failure_kind} "
                                  f"error={outcome.detail}")
            log.warning("event=poll_failed account=%s server=%s trigger=%s error_kind=%s error=%s",
                        outcome.account_id, server, outcome.trigger, outcome.failure_kind, outcome.detail)
        if outcome.idling and session.client is not None:
            session.idling = True
            try:
                session.fd = session.client.socket().fileno()
                self.selector.register(session.fd, selectors.EVENT_READ, session)
            except (OSError, ValueError, KeyError):
                session.fd = None
                session.idling = False
            else:
                self.timers.start(session, now)
                self.timers.compact(len(self.sessions))
        report = outcome.order_id or not outcome.ok or not outcome.idling
        arrivals = outcome.new_messages - outcome.backlog  # a first sync's backlog is not a burst of mail
        if outcome.order_id == 0 and outcome.ok and arrivals:
            send(self.to_scheduler, frames.NewMail(slot=self.slot, account_id=outcome.account_id, count=arrivals))
        if report:
            send(self.to_scheduler, frames.Result(
                slot=self.slot, account_id=outcome.account_id, order_id=outcome.order_id, trigger=outcome.trigger,
                ok=outcome.ok, connected=session.client is not None, idling=session.idling,
                watches_all=outcome.watches_all, new_messages=arrivals, new_bytes=outcome.new_bytes,
                failure_kind=outcome.failure_kind, detail=outcome.detail, retry_after=outcome.retry_after,
                uidvalidity_changed=outcome.uidvalidity_changed, missing_folders=outcome.missing_folders))
        if self.draining and session.client is not None:
            self.retire(session)
        elif session.pending_order is not None:
            order, session.pending_order = session.pending_order, None
            self.on_poll(order)
        elif outcome.pushed_pending and session.idling and not session.busy:
            # Mail announced as IDLE began (or found by NOTIFY's first STATUS): fetch it now.
            self.start_job(session, frames.Trigger.PUSH, notified=now, pushed=outcome.pushed_pending)

    def note_missing_folders(self, account: AccountConfig, missing: list[str], checked_all: bool) -> None:
        """Keep which configured folders the server does not have; log each change once."""
        before = self.missing.get(account.id, frozenset())
        after = frozenset(missing) if checked_all else before | frozenset(missing)
        if after == before:
            return
        if after:
            self.missing[account.id] = after
        else:
            self.missing.pop(account.id, None)
        for folder in sorted(after - before):
            self.polls["missing_folder"] = self.polls.get("missing_folder", 0) + 1
            self.child.errors.add(f"account={account.id} folder={folder} error_kind=mailbox "
                                  f"error=configured folder does not exist on the server")
            log.error("event=folder_missing account=%s server=%s folder=%s action=other_folders_go_on",
                      account.id, account.host, folder)
        for folder in sorted(before - after):
            log.info("event=folder_found account=%s folder=%s", account.id, folder)

    # --- the blocking work (pool threads) -----------------------------------------------------
    def job(self, account: AccountConfig, client: Any, trigger: frames.Trigger, order_id: int, may_connect: bool,
            was_idling: bool, notified: float | None, failure: imap.ImapError | None,
            pushed: tuple[str, ...], release: bool) -> Outcome:
        """Connect if granted, check the folders, ingest what is new, and re-enter IDLE.

        An order, a renewal or a connection not idling checks every configured folder; a push
        checks the folders it named (``pushed``). ``failure``: the loop found the connection
        broken; report it and close. ``release``: others wait for this server's connection cap,
        so LOGOUT instead of keeping the connection (time-sharing the cap). Only configured
        folders are ever named to the server.

        How a connection waits for news: with NOTIFY (RFC 5465) and several folders, no folder
        selected and the server reports every configured folder; otherwise IDLE on the primary
        folder (``AccountConfig.primary_folder``), the others checked at the tier interval by
        the scheduler's orders (``Result.watches_all`` False).
        """
        outcome = Outcome(account_id=account.id, order_id=order_id, trigger=trigger, ok=False, notified_at=notified)
        timeout = self.config.imap.timeout
        try:
            if failure is not None:
                raise failure
            if client is None:
                if not may_connect:
                    outcome.failure_kind = frames.FailureKind.DISCONNECTED
                    outcome.detail = "no open connection; waiting for a connect grant"
                    return outcome
                client = self.login(account)
                outcome.connected_now = True
            elif was_idling:
                imap.idle_stop(client, timeout)
            outcome.client = client
            capabilities = imap.capabilities(client)
            outcome.idle_capable = account.idle and "IDLE" in capabilities
            use_notify = (outcome.idle_capable and len(account.folders) > 1 and "NOTIFY" in capabilities
                          and account.host not in self.notify_refused)
            if imap.notifying(client):
                imap.notify_none(client)  # replies to our own commands must not mix with notifications
            outcome.checked_all = trigger in (frames.Trigger.ORDER, frames.Trigger.RENEWAL) or not was_idling
            folders = account.folders if outcome.checked_all else [f for f in account.folders if f in pushed]
            self.check_folders(client, account, outcome, folders,
                               examine_primary=outcome.idle_capable and not use_notify)
            if outcome.checked_all and len(outcome.missing_folders) == len(account.folders):
                raise imap.ImapError(imap.FailureKind.MAILBOX,
                                     f"none of the configured folders exists: {', '.join(account.folders)}")
            if self.draining or self.child.stop_requested:
                outcome.ok = True
                return outcome
            if release:
                imap.logout(client, min(timeout, 5.0))
                outcome.client = None
                outcome.ok = True
                return outcome
            if account.auth == "oauth2":
                # Keep the token fresh ahead of expiry: by the next renewal it must still be valid,
                # for a provider that ends the session when its token expires makes us log in again.
                self.credentials.access_token(account, self.secrets.get(account.id, {}),
                                              valid_for=self.config.imap.idle_renew)
            if outcome.idle_capable:
                pending: tuple[str, ...] = ()
                if use_notify:
                    try:
                        pending = self.watch_folders(client, account)
                        outcome.watches_all = True
                    except imap.NotifyRefused as exc:
                        # A server advertising NOTIFY that refuses our request: IDLE from now on.
                        self.notify_refused.add(account.host)
                        log.warning("event=notify_refused account=%s server=%s error=%s action=idle_on_primary",
                                    account.id, account.host, exc.detail)
                        use_notify = False
                if not use_notify:
                    outcome.idle_folder = self.catch_up_idle_folder(client, account, outcome)
                    outcome.watches_all = len(account.folders) == 1
                early = imap.idle_start(client)
                outcome.idling = True
                # Mail that arrived since the last look is announced as IDLE starts, often in the
                # continuation's own segment: those lines already sit in our buffer, where the
                # selector cannot see them, so read them now.
                early += imap.idle_read(client)
                announced = self.pushed(account, outcome.idle_folder, early)
                if imap.literal_waiting(client):
                    announced = tuple(account.folders)
                outcome.pushed_pending = tuple(dict.fromkeys((*pending, *announced)))
            outcome.ok = True
        except ConfigError as exc:
            outcome.failure_kind, outcome.detail = frames.FailureKind.AUTH, str(exc)
        except ReauthRequired as exc:
            outcome.failure_kind, outcome.detail = frames.FailureKind.REAUTH, str(exc)
        except TokenEndpointError as exc:
            outcome.failure_kind, outcome.detail = frames.FailureKind.NETWORK, str(exc)
        except Exception as exc:
            failure = imap.classify(exc)
            outcome.failure_kind = failure.kind
            outcome.detail = failure.detail
            outcome.retry_after = failure.retry_after
            if outcome.client is not None or client is not None:
                if failure.kind in (imap.FailureKind.TIMEOUT, imap.FailureKind.NETWORK, imap.FailureKind.PROTOCOL):
                    imap.close(outcome.client or client)  # nobody listening, or the stream is broken
                else:
                    imap.logout(outcome.client or client, min(timeout, 5.0))
            outcome.client = None
            outcome.idling = False
            outcome.idle_folder = None
        return outcome

    def login(self, account: AccountConfig) -> Any:
        """Connect and log in; an OAuth2 token the server rejects is refreshed once and retried once."""
        secrets = self.secrets.get(account.id, {})

        def attempt(force_refresh: bool) -> Any:
            return imap.connect(account, self.credentials.secret_for_login(account, secrets, force_refresh),
                                timeout=self.config.imap.timeout, max_line=self.config.imap.max_line,
                                max_literal=self.config.imap.max_message_size + 65536)

        try:
            return attempt(False)
        except imap.ImapError as exc:
            if account.auth != "oauth2" or exc.kind != imap.FailureKind.AUTH:
                raise
            self.credentials.forget(account.id)
            return attempt(True)

    def check_folders(self, client: Any, account: AccountConfig, outcome: Outcome, folders: list[str],
                      examine_primary: bool) -> None:
        """Check ``folders`` and fetch those with news; a folder the server does not have goes to
        ``outcome.missing_folders`` and the others go on.

        Folders are asked with STATUS first (a quiet poll is one STATUS per folder), except the
        primary folder on a connection about to IDLE on it (``examine_primary``): IDLE needs it
        selected anyway, so it is EXAMINEd straight away, last, so that it stays selected (its
        UIDNEXT answers the question). When that EXAMINE found nothing newer,
        ``outcome.primary_current`` lets IDLE follow at once.
        """
        primary = account.primary_folder if examine_primary else None
        folders = sorted(folders, key=lambda folder: folder == primary)
        if any(folder != primary for folder in folders):
            imap.unselect(client)  # so that STATUS sees the folder afresh (see imap.unselect)
        for folder in folders:
            if self.draining or self.child.stop_requested:
                return
            try:
                if folder != primary and not self.folder_has_news(client, account.id, folder):
                    continue
                result = self.sync(client, account, folder, outcome)
            except imap.ImapError as exc:
                if exc.kind is not imap.FailureKind.MAILBOX:
                    raise
                outcome.missing_folders.append(folder)
                continue
            outcome.primary_current = folder == primary and not result.searched

    def sync(self, client: Any, account: AccountConfig, folder: str, outcome: Outcome) -> SyncResult:
        """EXAMINE the folder and ingest what is new (ingest.sync_folder); when that completed,
        remember its (UIDVALIDITY, UIDNEXT) so the next STATUS or NOTIFY saying the same costs
        no store round trip and fetches nothing."""
        state = imap.examine(client, folder)
        result = sync_folder(client, self.store, account.id, folder, self.config.imap,
                             announce=self.config.queue.kind != "none", state=state,
                             should_stop=lambda: self.child.fast_stop)
        if state.uidnext is not None and not result.interrupted and not result.oversize:
            self.folders_current.setdefault(account.id, {})[folder] = (state.uidvalidity, state.uidnext)
        outcome.new_messages += result.new_messages
        outcome.new_bytes += result.new_bytes
        outcome.fetch_seconds += result.fetch_seconds
        outcome.uidvalidity_changed |= result.uidvalidity_changed
        if result.first_sync:
            outcome.backlog += result.new_messages
        return result

    def catch_up_idle_folder(self, client: Any, account: AccountConfig, outcome: Outcome) -> str:
        """Select the folder to IDLE on (the primary one, else the first configured folder the
        server has) and ingest what arrived in it during the checks just done: a message
        appended in that gap would otherwise wait for the next safety poll. Returns the folder."""
        missing = set(outcome.missing_folders)
        if not outcome.checked_all:
            missing |= self.missing.get(account.id, frozenset())
        candidates = [account.primary_folder, *account.folders]
        folder = next((f for f in candidates if f not in missing), account.primary_folder)
        if outcome.primary_current and folder == account.primary_folder:
            return folder
        for _ in range(3):
            state = imap.examine(client, folder)
            if self.folders_current.get(account.id, {}).get(folder) == (state.uidvalidity, state.uidnext):
                return folder
            mailbox = self.store.get_mailbox(account.id, folder)
            if (mailbox is not None and mailbox.uidvalidity == state.uidvalidity
                    and (state.uidnext is None or state.uidnext <= mailbox.last_uid + 1)):
                return folder
            self.sync(client, account, folder, outcome)  # leaves the folder selected
        return folder

    def watch_folders(self, client: Any, account: AccountConfig) -> tuple[str, ...]:
        """NOTIFY on every configured folder, with none selected (a selected folder would be left
        out of the notifications). Returns the folders whose state, as NOTIFY's first STATUS
        reports it, shows mail not yet ingested (arrived during the checks just done)."""
        imap.unselect(client)
        states = imap.notify_set(client, account.folders)
        return tuple(folder for folder in account.folders
                     if folder in states and self.folder_has_news(client, account.id, folder, states[folder]))

    def folder_has_news(self, client: Any, account_id: str, folder: str,
                        state: imap.FolderState | None = None) -> bool:
        """STATUS the folder (unless ``state`` says it already); news when UIDNEXT is above the
        store's checkpoint. A folder whose (UIDVALIDITY, UIDNEXT) is what it was at the last check
        that found it complete has none, without asking the store: a quiet poll is one STATUS
        and no database round trip."""
        if state is None:
            state = imap.status(client, folder)
        known = self.folders_current.get(account_id)
        if state.uidnext is not None and known is not None and known.get(folder) == (state.uidvalidity,
                                                                                     state.uidnext):
            return False
        mailbox = self.store.get_mailbox(account_id, folder)
        if mailbox is None or mailbox.uidvalidity != state.uidvalidity or state.uidnext is None:
            return True
        if state.uidnext > mailbox.last_uid + 1:
            return True
        self.folders_current.setdefault(account_id, {})[folder] = (state.uidvalidity, state.uidnext)
        return False

    # --- drain and retirement ----------------------------------------------------------------
    def retire(self, session: Session) -> None:
        """Close the session's connection (LOGOUT) unless a job holds it; that job's end retires it."""
        if session.busy or session.client is None:
            return
        if session.fd is not None:
            self.selector.unregister(session.fd)
            session.fd = None
        client, session.client, session.idling = session.client, None, False
        session.busy = True
        session.probe_deadline = None

        def logout() -> Outcome:
            imap.logout(client, min(self.config.imap.timeout, 10.0))
            return Outcome(account_id=session.account.id, order_id=0, trigger=frames.Trigger.CONNECTION, ok=True)

        self.submit(logout)

    def start_drain(self) -> None:
        if not self.draining:
            busy = [s for s in self.sessions.values() if s.busy]
            self.drain_in_flight = (len(busy), 0)
            log.info("event=drain_started worker=%d in_flight_accounts=%d", self.slot, len(busy))
        self.draining = True
        self.drained_sent = False
        for session in self.sessions.values():
            session.pending_order = None
            self.retire(session)

    def fully_drained(self) -> bool:
        return all(s.client is None and not s.busy for s in self.sessions.values())

    def heartbeat(self, now: float) -> None:
        connections: dict[str, float] = {}
        idle = 0
        for session in self.sessions.values():
            if session.client is not None:
                connections[session.account.host] = connections.get(session.account.host, 0) + 1
                idle += session.idling
        state = "drained" if self.draining and self.fully_drained() else "draining" if self.draining else "running"
        self.child.heartbeat(state, now, stats=frames.WorkerStats(
            messages_ingested=self.messages, bytes_ingested=self.bytes, idle_connections=idle,
            accounts=len(self.sessions), busy=sum(s.busy for s in self.sessions.values()),
            last_ingest=self.child.ingest_clock(self.messages), stuck_folders=len(ingest.HEALTH.stuck),
            uids_vanished=ingest.HEALTH.uids_vanished, oversize_skipped=ingest.HEALTH.oversize_skipped,
        ), histograms={"fetch_duration_seconds": self.fetch_hist.to_wire(),
                       "new_mail_latency_seconds": self.new_mail_hist.to_wire()},
            labeled={"polls": dict(self.polls), "connections": connections, "connects": dict(self.connects)},
            detail={"stuck_folders": "\n".join(ingest.HEALTH.stuck_lines())})

    def shutdown(self) -> None:
        self.pool.shutdown(wait=not self.child.fast_stop, cancel_futures=True)
        self.store.close()
        self.child.close()


def main(config: Config, slot: int, parent_pid: int) -> int:
    return Worker(config, slot, parent_pid).run()
