"""A worker: holds the IMAP connections of the accounts its slot owns, for hours and days.

One thread runs the event loop: a selector over the worker's ZeroMQ PULL socket, a wake-up pipe
and the socket of every idling connection. Notifications are read there without blocking
(``imap.idle_read``). Everything that blocks (connect, login, STATUS, fetch, commit, IDLE
renewal, LOGOUT) runs on a small bounded thread pool, and a session is owned by at most one
thread at a time: the loop unregisters an idling socket before it hands the session to a job,
and takes it back when the job's outcome arrives through the completion queue.

Every new connection is granted by the scheduler (``Poll.may_connect``), which owns the
per-server token buckets and connection caps; a worker never reconnects on its own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import selectors
import time
from typing import Any

import msgspec
import zmq

from . import frames, imap
from .blobs import open_blobs
from .child import Child, bind_pull, connect_push, ipc_path, send
from .config import AccountConfig, Config, ConfigError, read_secret
from .histogram import Histogram
from .ingest import sync_folder
from .store import Store, open_store

log = logging.getLogger(__name__)

LOOP_TICK = 0.5


class Session:
    """One account's connection. ``busy``: a pool thread owns it; otherwise the loop does."""

    __slots__ = ("account", "client", "busy", "idling", "idle_capable", "idle_since", "heard_at",
                 "pending_order", "notified_at", "fd")

    def __init__(self, account: AccountConfig) -> None:
        self.account = account
        self.client: Any = None
        self.busy = False
        self.idling = False
        self.idle_capable = False
        self.idle_since = 0.0
        self.heard_at = 0.0
        self.pending_order: frames.Poll | None = None
        self.notified_at: float | None = None
        self.fd: int | None = None


class Outcome(msgspec.Struct):
    """What a pool job reports back to the loop."""

    account_id: str
    order_id: int
    ok: bool
    client: Any = None
    idling: bool = False
    idle_capable: bool = False
    new_messages: int = 0
    new_bytes: int = 0
    fetch_seconds: float = 0.0
    failure_kind: str | None = None
    detail: str | None = None
    retry_after: float | None = None
    uidvalidity_changed: bool = False
    backlog: int = 0
    connected_now: bool = False
    notified_at: float | None = None


class Worker:
    def __init__(self, config: Config, slot: int, parent_pid: int) -> None:
        self.config = config
        self.slot = slot
        self.child = Child(config, "worker", slot, parent_pid)
        self.pull = bind_pull(self.child.ctx, ipc_path(config, f"worker-{slot}.sock"))
        self.to_scheduler = connect_push(self.child.ctx, ipc_path(config, "scheduler.sock"))
        self.store: Store = open_store(config.store_url, config.store.pool_min, config.store.pool_max)
        self.store.blobs = open_blobs(config.blobs)  # [blobs] kind = "s3": raw bytes to S3 before each commit
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.imap.threads,
                                                          thread_name_prefix=f"worker{slot}")
        self.done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.pull.getsockopt(zmq.FD), selectors.EVENT_READ, None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.sessions: dict[str, Session] = {}
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
        send(self.to_scheduler, frames.WorkerReady(slot=self.slot, pid=self.child.pid))
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
            for key, _ in self.selector.select(timeout=LOOP_TICK):
                if key.data is not None:
                    self.on_readable(key.data, now)
            self.read_frames()
            self.collect_outcomes()
            self.renew_idles(time.monotonic())
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
                self.on_assign(frame.accounts)
            elif isinstance(frame, frames.Drain):
                self.start_drain()
            elif isinstance(frame, frames.Resume):
                self.draining = False
                self.drained_sent = False
            elif frame is not None:
                self.child.frames_dropped += 1

    def on_assign(self, accounts: list[AccountConfig]) -> None:
        wanted = {a.id: a for a in accounts}
        for account_id in list(self.sessions):
            if account_id not in wanted:
                self.retire(self.sessions.pop(account_id))
        for account_id, account in wanted.items():
            session = self.sessions.get(account_id)
            if session is None:
                self.sessions[account_id] = Session(account)
            elif session.account != account:
                session.account = account
                self.retire(session)  # settings changed: the next poll connects afresh

    def on_poll(self, order: frames.Poll) -> None:
        session = self.sessions.get(order.account_id)
        if session is None or self.draining:
            send(self.to_scheduler, frames.Result(slot=self.slot, account_id=order.account_id, order_id=order.order_id,
                                                  ok=False, connected=False, idling=False,
                                                  failure_kind="unassigned" if session is None else "draining"))
            return
        if session.busy:
            session.pending_order = order
            return
        self.start_job(session, order.order_id, order.may_connect)

    def on_readable(self, session: Session, now: float) -> None:
        if session.busy or not session.idling:
            return
        try:
            responses = imap.idle_read(session.client)
        except Exception as exc:
            self.start_job(session, 0, False, notified=None, reason=f"idle connection lost: {exc}")
            return
        if responses:
            session.heard_at = now
        if imap.has_new_mail(responses):
            self.start_job(session, 0, False, notified=now)

    def renew_idles(self, now: float) -> None:
        renew_after = self.config.imap.idle_renew
        keepalive = self.config.imap.keepalive
        for session in self.sessions.values():
            if session.idling and not session.busy and (
                    now - session.idle_since >= renew_after or now - session.heard_at >= keepalive):
                self.start_job(session, 0, False)

    # --- handing sessions to the pool ---------------------------------------------------------
    def start_job(self, session: Session, order_id: int, may_connect: bool, notified: float | None = None,
                  reason: str | None = None) -> None:
        if session.fd is not None:
            self.selector.unregister(session.fd)
            session.fd = None
        session.busy = True
        was_idling, session.idling = session.idling, False
        future = self.pool.submit(self.job, session.account, session.client, order_id, may_connect, was_idling,
                                  notified, reason)
        future.add_done_callback(self._job_done)

    def _job_done(self, future: concurrent.futures.Future) -> None:
        self.done.put(future.result())
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
                return
            self.on_outcome(outcome)

    def on_outcome(self, outcome: Outcome) -> None:
        session = self.sessions.get(outcome.account_id)
        now = time.monotonic()
        if session is None:  # retired while the job ran: just close what it holds
            if outcome.client is not None:
                self.pool.submit(imap.logout, outcome.client, self.config.imap.timeout)
            return
        session.busy = False
        session.client = outcome.client
        session.idle_capable = outcome.idle_capable
        server = session.account.host
        if outcome.connected_now:
            self.connects[server] = self.connects.get(server, 0) + 1
        result_key = "ok" if outcome.ok else (outcome.failure_kind or "protocol")
        if outcome.order_id or not outcome.ok or outcome.new_messages:
            self.polls[result_key] = self.polls.get(result_key, 0) + 1
        self.messages += outcome.new_messages
        self.bytes += outcome.new_bytes
        if outcome.fetch_seconds:
            self.fetch_hist.observe(outcome.fetch_seconds)
        if outcome.notified_at is not None and outcome.new_messages:
            self.new_mail_hist.observe(now - outcome.notified_at)
        if not outcome.ok and outcome.failure_kind not in ("disconnected", "draining"):
            self.child.errors.add(f"account={outcome.account_id} server={server} error_kind={outcome.failure_kind} "
                                  f"error={outcome.detail}")
            log.warning("event=poll_failed account=%s server=%s error_kind=%s error=%s",
                        outcome.account_id, server, outcome.failure_kind, outcome.detail)
        if outcome.idling and session.client is not None:
            session.idling = True
            session.idle_since = session.heard_at = now
            try:
                session.fd = session.client.socket().fileno()
                self.selector.register(session.fd, selectors.EVENT_READ, session)
            except (OSError, ValueError, KeyError):
                session.fd = None
                session.idling = False
        report = outcome.order_id or not outcome.ok or not outcome.idling
        arrivals = outcome.new_messages - outcome.backlog  # a first sync's backlog is not a burst of mail
        if outcome.order_id == 0 and outcome.ok and arrivals:
            send(self.to_scheduler, frames.NewMail(slot=self.slot, account_id=outcome.account_id, count=arrivals))
        if report:
            send(self.to_scheduler, frames.Result(
                slot=self.slot, account_id=outcome.account_id, order_id=outcome.order_id, ok=outcome.ok,
                connected=session.client is not None, idling=session.idling, new_messages=arrivals,
                new_bytes=outcome.new_bytes, failure_kind=outcome.failure_kind, detail=outcome.detail,
                retry_after=outcome.retry_after, uidvalidity_changed=outcome.uidvalidity_changed))
        if self.draining and session.client is not None:
            self.retire(session)
        elif session.pending_order is not None:
            order, session.pending_order = session.pending_order, None
            self.on_poll(order)

    # --- the blocking work (pool threads) -----------------------------------------------------
    def job(self, account: AccountConfig, client: Any, order_id: int, may_connect: bool, was_idling: bool,
            notified: float | None, reason: str | None) -> Outcome:
        """Connect if granted, check every folder, ingest what is new, and re-enter IDLE."""
        outcome = Outcome(account_id=account.id, order_id=order_id, ok=False, notified_at=notified)
        timeout = self.config.imap.timeout
        try:
            if reason is not None:
                raise imap.ImapError(imap.FailureKind.NETWORK, reason)
            if client is None:
                if not may_connect:
                    outcome.failure_kind = "disconnected"
                    outcome.detail = "no open connection; waiting for a connect grant"
                    return outcome
                client = imap.connect(account, read_secret(account), timeout=timeout,
                                      max_line=self.config.imap.max_line,
                                      max_literal=self.config.imap.max_message_size + 65536)
                outcome.connected_now = True
            elif was_idling:
                imap.idle_stop(client, timeout)
            outcome.client = client
            outcome.idle_capable = account.idle and "IDLE" in imap.capabilities(client)
            self.check_folders(client, account, outcome, ordered=order_id > 0 or not was_idling)
            if self.draining or self.child.stop_requested:
                outcome.ok = True
                return outcome
            if outcome.idle_capable:
                imap.examine(client, "INBOX")
                imap.idle_start(client)
                outcome.idling = True
            outcome.ok = True
        except ConfigError as exc:
            outcome.failure_kind, outcome.detail = "auth", str(exc)
        except Exception as exc:
            failure = exc if isinstance(exc, imap.ImapError) else imap.classify(exc)
            outcome.failure_kind = str(getattr(failure.kind, "value", failure.kind))
            outcome.detail = failure.detail
            outcome.retry_after = failure.retry_after
            if outcome.client is not None or client is not None:
                imap.logout(outcome.client or client, min(timeout, 5.0))
            outcome.client = None
            outcome.idling = False
        return outcome

    def check_folders(self, client: Any, account: AccountConfig, outcome: Outcome, ordered: bool) -> None:
        """STATUS every folder; fetch those with news. INBOX last, so it stays selected for IDLE.

        An IDLE notification (not ``ordered``) concerns the selected INBOX only.
        """
        folders = sorted(account.folders, key=lambda f: f.upper() == "INBOX") if ordered else ["INBOX"]
        for folder in folders:
            if self.draining or self.child.stop_requested:
                return
            if ordered and not self.folder_has_news(client, account.id, folder):
                continue
            result = sync_folder(client, self.store, account.id, folder, self.config.imap,
                                 announce=self.config.queue.kind != "none",
                                 should_stop=lambda: self.child.fast_stop)
            outcome.new_messages += result.new_messages
            outcome.new_bytes += result.new_bytes
            outcome.fetch_seconds += result.fetch_seconds
            outcome.uidvalidity_changed |= result.uidvalidity_changed
            if result.first_sync:
                outcome.backlog += result.new_messages

    def folder_has_news(self, client: Any, account_id: str, folder: str) -> bool:
        state = imap.status(client, folder)
        mailbox = self.store.get_mailbox(account_id, folder)
        if mailbox is None or mailbox.uidvalidity != state.uidvalidity or state.uidnext is None:
            return True
        return state.uidnext > mailbox.last_uid + 1

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

        def logout() -> Outcome:
            imap.logout(client, min(self.config.imap.timeout, 10.0))
            return Outcome(account_id=session.account.id, order_id=0, ok=True)

        future = self.pool.submit(logout)
        future.add_done_callback(self._job_done)

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
        self.child.heartbeat(state, now, stats={
            "messages_ingested": self.messages, "bytes_ingested": self.bytes, "idle_connections": idle,
            "accounts": len(self.sessions), "busy": sum(s.busy for s in self.sessions.values()),
        }, histograms={"fetch_duration_seconds": self.fetch_hist.to_wire(),
                       "new_mail_latency_seconds": self.new_mail_hist.to_wire()},
            labeled={"polls": dict(self.polls), "connections": connections, "connects": dict(self.connects)})

    def shutdown(self) -> None:
        self.pool.shutdown(wait=not self.child.fast_stop, cancel_futures=True)
        self.store.close()
        self.child.close()


def main(config: Config, slot: int, parent_pid: int) -> int:
    return Worker(config, slot, parent_pid).run()
