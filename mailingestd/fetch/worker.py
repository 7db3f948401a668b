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

This module is the loop; ``sessions.py`` holds the sessions and their IDLE timers, ``job.py`` the
blocking job, ``folder_sync.py`` its folder checks and the ``JobOutcome`` it hands back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import selectors
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import child as child_mod
from .. import frames
from ..auth.credentials import Credentials
from ..child import Child, bind_pull, connect_push, ipc_path, send
from ..config import AccountConfig, Config
from ..histogram import Histogram
from ..store.blobs import open_blobs
from ..store.leases import fence_for
from ..store.store import Store, open_store
from . import imap, ingest
from .folder_sync import FolderChecks, JobOutcome
from .job import Jobs
from .sessions import IdleTimers, Renewal, Session, held_in_idle

log = logging.getLogger(__name__)

LOOP_TICK = 0.5
# DONEs sent per loop turn at most, so a wave of due renewals cannot stall the loop.
PROBES_PER_TURN = 500


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
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.imap.threads,
                                                          thread_name_prefix=f"worker{slot}")
        self.max_jobs = config.imap.threads
        self.running_jobs = 0
        self.job_backlog: collections.deque[tuple[Callable[..., JobOutcome | None], tuple[Any, ...]]] = \
            collections.deque()
        self.timers = IdleTimers(config.imap.idle_renew, config.imap.keepalive)
        self.probes: collections.deque[tuple[float, int, Session]] = collections.deque()
        self.done: queue.SimpleQueue[JobOutcome | None] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.pull.getsockopt(zmq.FD), selectors.EVENT_READ, None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.sessions: dict[str, Session] = {}
        self.folders = FolderChecks(self.store, config.imap, announce=config.queue.kind != "none",
                                    stopping=lambda: self.draining or self.child.stop_requested,
                                    fast_stop=lambda: self.child.fast_stop)
        self.jobs = Jobs(slot, config.imap, self.credentials, self.folders)
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
        parent_checked = 0.0
        while True:
            now = time.monotonic()
            if self.child.stop_requested and deadline is None:
                deadline = now + (1.0 if self.child.fast_stop else self.config.daemon.shutdown_timeout)
                self.start_drain()
            if deadline is not None and (self.fully_drained() or now > deadline):
                break
            if now - parent_checked >= LOOP_TICK:  # a syscall: not on every turn of a busy loop
                parent_checked = now
                if not self.child.parent_alive():
                    break
            woken = False
            ready = self.selector.select(timeout=self.select_timeout(now))
            frames_waiting = not ready  # a quiet turn looks anyway (at least every LOOP_TICK)
            for key, _ in ready:
                if key.data is not None:
                    self.on_readable(key.data, now)
                elif key.fd == self.wake_r:
                    woken = True
                else:
                    frames_waiting = True  # the PULL socket's ZMQ_FD
            if frames_waiting:
                self.read_frames()
            if woken:  # a job ended (nothing to collect otherwise: a quiet turn costs no syscall)
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
        # ZMQ_EVENTS rather than recv until zmq.Again: no exception raised on every loop turn
        # (it also re-arms the edge-triggered ZMQ_FD the selector watches).
        while self.pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            data = self.pull.recv(zmq.NOBLOCK)
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
            if self.jobs.secrets.get(account_id) != fields:
                self.credentials.forget(account_id)  # new credentials: no cached token from the old ones
        self.jobs.secrets = secrets
        wanted = {a.id: a for a in accounts}
        for account_id in list(self.sessions):
            if account_id not in wanted:
                self.retire(self.sessions.pop(account_id))
                self.folders.forget(account_id)
                self.folders.missing.pop(account_id, None)
        for account_id, account in wanted.items():
            session = self.sessions.get(account_id)
            if session is None:
                self.sessions[account_id] = Session(account)
            elif session.account != account:
                session.account = account
                self.folders.forget(account_id)
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
        if session.renewal is not Renewal.NONE:
            self.advance_renewal(session, now)
            return
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
        pushed = self.folders.pushed(session.account, session.idle_folder, responses)
        if imap.literal_waiting(session.client):
            # A response with a literal: a job reads it (bounded), never this loop.
            pushed = tuple(session.account.folders)
        notified = now if pushed else None
        if not imap.idling(session.client):  # the server answered our DONE: renew, all folders
            self.start_job(session, frames.Trigger.RENEWAL, notified=notified)
        elif pushed:
            self.start_job(session, frames.Trigger.PUSH, notified=notified, pushed=pushed)

    # --- renewals the loop runs itself ------------------------------------------------------------
    # A renewal (or keepalive probe) of a session idling on the only folder of a password account
    # is DONE with that folder's EXAMINE behind it, then IDLE again: two round trips of a few bytes,
    # which the loop runs from socket readiness (imap.idle_done_send(examine=...), idle_read,
    # examine_read, idle_start_send/_read) instead of a pool job, whose thread handoffs cost more
    # CPU than the IMAP itself. Each step is bounded by imap.timeout through the probe deadlines.
    # A changed folder or an error goes to a job, as before: the job checks the folder and ingests
    # (changed), or reports and closes (failed).

    def renews_in_loop(self, session: Session) -> bool:
        account = session.account
        return (session.idle_folder is not None and len(account.folders) == 1 and account.auth != "oauth2"
                and not self.draining and not self.child.stop_requested
                and not self.job_backlog and session.pending_order is None)

    def renewal_deadline(self, session: Session, now: float) -> None:
        session.probe_deadline = now + self.config.imap.timeout
        self.probes.append((session.probe_deadline, session.generation, session))

    def advance_renewal(self, session: Session, now: float) -> None:
        client, folder = session.client, session.idle_folder
        try:
            if session.renewal is Renewal.DONE:
                if imap.idle_read(client):  # news during IDLE shows in the EXAMINE reply that follows
                    session.heard_at = now
                if imap.literal_waiting(client):
                    raise imap.ImapError(imap.FailureKind.PROTOCOL, "a response with a literal ended an IDLE "
                                         "being renewed (the EXAMINE sent behind it cannot be read past it)")
                if imap.idling(client):
                    return
                session.renewal = Renewal.EXAMINE
                self.renewal_deadline(session, now)
            if session.renewal is Renewal.EXAMINE:
                state = imap.examine_read(client)
                if state is None:
                    return
                if folder is None or not self.folders.unchanged(session.account.id, folder, state):
                    self.end_renewal(session)
                    self.start_job(session, frames.Trigger.RENEWAL, notified=now)  # news: a job ingests it
                    session.returns_to_idle = True  # that job re-enters IDLE
                    return
                imap.idle_start_send(client)
                session.renewal = Renewal.IDLE
                self.renewal_deadline(session, now)
            early = imap.idle_start_read(client)
            if early is None:
                return
            early += imap.idle_read(client)
        except imap.ImapError as exc:
            self.end_renewal(session)
            self.start_job(session, frames.Trigger.CONNECTION, failure=exc)
            return
        self.end_renewal(session)
        session.idling = True
        session.checked_at = now  # the only folder was checked: this renewal was a poll
        self.timers.start(session, now)
        self.timers.compact(len(self.sessions))
        pushed = self.folders.pushed(session.account, folder, early)
        if imap.literal_waiting(client):
            pushed = tuple(session.account.folders)
        if self.draining or self.sessions.get(session.account.id) is not session:
            self.retire(session)  # draining, or the account left this worker meanwhile
        elif session.pending_order is not None:
            order, session.pending_order = session.pending_order, None
            self.on_poll(order)
        elif pushed:
            self.start_job(session, frames.Trigger.PUSH, notified=now, pushed=pushed)

    @staticmethod
    def end_renewal(session: Session) -> None:
        session.renewal = Renewal.NONE
        session.busy = session.returns_to_idle = False
        session.probe_deadline = None

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
            if session.probe_deadline is not None and session.probe_deadline <= now and (
                    session.generation == generation and (not session.busy or session.renewal is not Renewal.NONE)):
                self.end_renewal(session)
                self.start_job(session, frames.Trigger.CONNECTION, failure=imap.ImapError(
                    imap.FailureKind.TIMEOUT, f"no reply to DONE within {timeout:g}s: connection presumed dead"))
        if self.job_backlog:
            return
        for session in self.timers.due(now, PROBES_PER_TURN):
            in_loop = self.renews_in_loop(session)
            try:
                imap.idle_done_send(session.client, examine=session.idle_folder if in_loop else None)
            except imap.ImapError as exc:
                self.start_job(session, frames.Trigger.CONNECTION, failure=exc)
                continue
            if in_loop:  # the renewal runs here (advance_renewal), not on a job
                session.idling = False
                session.busy = session.returns_to_idle = True
                session.renewal = Renewal.DONE
            session.probe_deadline = now + timeout
            self.probes.append((session.probe_deadline, session.generation, session))

    # --- handing sessions to the pool ---------------------------------------------------------
    def start_job(self, session: Session, trigger: frames.Trigger, order_id: int = 0, may_connect: bool = False,
                  notified: float | None = None, failure: imap.ImapError | None = None,
                  pushed: tuple[str, ...] = (), release: bool = False) -> None:
        """Hand the session to :meth:`Jobs.run <.job.Jobs.run>`: every trigger (an order, a push, a renewal, a broken
        connection) runs the same job and comes back as one JobOutcome through :meth:`on_outcome`."""
        if session.fd is not None:
            self.selector.unregister(session.fd)
            session.fd = None
        session.busy = True
        session.probe_deadline = None
        was_idling, session.idling = session.idling, False
        session.returns_to_idle = was_idling and failure is None
        self.submit(self.jobs.run, session.account, session.client, trigger, order_id, may_connect, was_idling,
                    notified, failure, pushed, release)

    def submit(self, function: Callable[..., JobOutcome | None], *args: Any) -> None:
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

    def on_outcome(self, outcome: JobOutcome) -> None:
        result = outcome.result
        session = self.sessions.get(result.account_id)
        now = time.monotonic()
        if session is None:  # retired while the job ran: just close what it holds
            if not result.ok and result.failure_kind not in frames.NOT_THE_ACCOUNTS_FAULT:
                # Still one line: e.g. a commit refused after the account's lease moved away.
                log.warning("event=poll_failed account=%s error_kind=%s error=%s detail=account_no_longer_assigned",
                            result.account_id, result.failure_kind, result.detail)
            if outcome.client is not None:
                self.submit(imap.logout, outcome.client, min(self.config.imap.timeout, 10.0))
            return
        session.busy = False
        session.returns_to_idle = False
        if result.ok and outcome.checked_all:
            session.checked_at = now
        session.client = outcome.client
        session.idle_capable = outcome.idle_capable
        session.watches_all = result.watches_all
        session.idle_folder = outcome.idle_folder
        server = session.account.host
        if outcome.connected_now:
            self.connects[server] = self.connects.get(server, 0) + 1
        result_key = "ok" if result.ok else (result.failure_kind or frames.FailureKind.PROTOCOL).value
        if result.order_id or not result.ok or outcome.stored:
            self.polls[result_key] = self.polls.get(result_key, 0) + 1
        self.note_missing_folders(session.account, result.missing_folders, outcome.checked_all)
        self.messages += outcome.stored
        self.bytes += result.new_bytes
        if outcome.fetch_seconds:
            self.fetch_hist.observe(outcome.fetch_seconds)
        if outcome.notified_at is not None and outcome.stored:
            self.new_mail_hist.observe(now - outcome.notified_at)
        if not result.ok and result.failure_kind not in frames.NOT_THE_ACCOUNTS_FAULT:
            self.child.errors.add(f"account={result.account_id} server={server} error_kind={result.failure_kind} "
                                  f"error={result.detail}")
            log.warning("event=poll_failed account=%s server=%s trigger=%s error_kind=%s error=%s",
                        result.account_id, server, result.trigger, result.failure_kind, result.detail)
        report = result.order_id or not result.ok or not result.idling
        if result.idling and session.client is not None:
            session.idling = True
            try:
                session.fd = session.client.socket().fileno()
                self.selector.register(session.fd, selectors.EVENT_READ, session)
            except (OSError, ValueError, KeyError):
                session.fd = None
                session.idling = False
            else:
                self.timers.start(session, now, connected=outcome.connected_now)
                self.timers.compact(len(self.sessions))
        if result.order_id == 0 and result.ok and result.new_messages:
            send(self.to_scheduler, frames.NewMail(slot=self.slot, account_id=result.account_id,
                                                   count=result.new_messages))
        if report:
            result.connected, result.idling = session.client is not None, session.idling
            send(self.to_scheduler, result)
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
        before = self.folders.missing.get(account.id, frozenset())
        after = frozenset(missing) if checked_all else before | frozenset(missing)
        if after == before:
            return
        if after:
            self.folders.missing[account.id] = after
        else:
            self.folders.missing.pop(account.id, None)
        for folder in sorted(after - before):
            self.polls["missing_folder"] = self.polls.get("missing_folder", 0) + 1
            self.child.errors.add(f"account={account.id} folder={folder} error_kind=mailbox "
                                  f"error=configured folder does not exist on the server")
            log.error("event=folder_missing account=%s server=%s folder=%s action=other_folders_go_on",
                      account.id, account.host, folder)
        for folder in sorted(before - after):
            log.info("event=folder_found account=%s folder=%s", account.id, folder)

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

        def logout() -> JobOutcome:
            imap.logout(client, min(self.config.imap.timeout, 10.0))
            return self.jobs.outcome(session.account.id, 0, frames.Trigger.CONNECTION, ok=True)

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
        idle = busy = 0
        for session in self.sessions.values():
            busy += session.busy
            if session.client is not None:
                host = session.account.host
                connections[host] = connections.get(host, 0) + 1
                idle += held_in_idle(session)
        state = "drained" if self.draining and self.fully_drained() else "draining" if self.draining else "running"
        self.child.heartbeat(state, now, stats=frames.WorkerStats(
            messages_ingested=self.messages, bytes_ingested=self.bytes, idle_connections=idle,
            accounts=len(self.sessions), busy=busy,
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
