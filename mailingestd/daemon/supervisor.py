"""The supervisor (main PID): forks the children, keeps them alive, speaks for the daemon.

This module is process management and the main loop. The control socket is served by
``control_server.py`` (the requests are handled here), the status reply, the metrics and the
health checks are built by ``view.py`` from the slots kept here (``slots.py``), and sd_notify is
``notify.py``. The loop is a short list of verbs, gunicorn-arbiter style::

    handle_signals -> control.serve -> read_heartbeats -> reap_children -> murder_stuck
    -> manage_children -> advance_state -> write_metrics -> notify_systemd

Signal handlers only queue the signal (``signal.set_wakeup_fd``); the loop dispatches by name
(``handle_term``, ``handle_hup``...). Children are forked before the supervisor creates its own
ZeroMQ context, and each creates its own after the fork. A child that dies is restarted at
once, then with exponential backoff; a slot that keeps dying stops the daemon with a fatal
error (exit 70) rather than looping forever. A child that stops heartbeating (stuck, or
SIGSTOPped) is killed and replaced like a dead one.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import msgspec
import zmq
from prometheus_client.registry import CollectorRegistry

from .. import __version__, child, config as config_mod, control, frames, hardening, logs
from ..auth import credentials
from ..child import bind_pull, connect_push, ipc_path, send
from ..config import Config, ConfigError
from ..store.store import Store, StoreError, open_store
from . import metrics, notify, rundir, view
from .control_server import ControlServer
from .slots import TRANSITIONS, ChildSlot, State, slot_of
from ..sysexits import EX_OK, EX_SOFTWARE, EX_UNAVAILABLE

log = logging.getLogger(__name__)

LOOP_TICK = 0.5  # events (heartbeats, control, signals, SIGCHLD) wake the loop at once
CRASH_LOOP_LIMIT = 8
HEALTHY_AFTER = 30.0
MAX_RESTART_DELAY = 30.0


def _role_main(role: str) -> Callable[[Config, int, int], int]:
    if role == "worker":
        from ..fetch.worker import main
    elif role == "scheduler":
        from ..sched.scheduler import main
    else:
        from ..publish.process import main
    return main


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pid = os.getpid()
        self.state = State.STARTING
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self.signals: list[int] = []
        self.slots: list[ChildSlot] = []
        self.ctx: zmq.Context | None = None
        self.pull: zmq.Socket | None = None
        self.to_scheduler: zmq.Socket | None = None
        self.control = ControlServer(config, self.handle_request)
        self.lock_fd: int | None = None
        self.store: Store | None = None
        self.totals = metrics.Totals()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics.DaemonCollector(lambda: view.metrics_snapshot(self)))
        self.next_metrics = 0.0
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.watchdog_every = notify.watchdog_interval()
        self.exit_after_drain = False
        self.stop_deadline: float | None = None
        self.exit_code = EX_OK
        self.ready_sent = False
        self.traffic: list[view.TrafficSample] = []  # the last hour's, for the last-minute rates
        self.memory = 0
        self.next_memory = 0.0
        self.drain_started: float | None = None

    # --- startup ----------------------------------------------------------------------------
    def run(self) -> int:
        credentials.install_policy(self.config)  # before any fork: the children inherit it
        insecure_store = hardening.postgres_transport_warning(self.config.store_url)
        if insecure_store:
            log.warning("event=insecure_store_connection detail=%s", insecure_store)
        rundir.prepare(self.config)
        self.lock_fd = rundir.lock(self.config, self.pid)
        self.store = open_store(self.config.store_url, 1, 2)
        self.sync_config_accounts()
        self.store.close()  # children open their own; none crosses a fork
        self.install_signals()
        self.build_slots(self.config.worker_count)
        for slot in self.slots:
            self.spawn(slot)
        self.ctx = zmq.Context(io_threads=1)  # only after the first forks
        self.pull = bind_pull(self.ctx, ipc_path(self.config, "supervisor.sock"))
        self.to_scheduler = connect_push(self.ctx, ipc_path(self.config, "scheduler.sock"))
        self.control.open()
        if self.config.metrics.http_listen:
            metrics.serve_http(self.config.metrics.http_listen, self.registry, lambda: view.healthy(self))
        log.info("event=started pid=%d version=%s workers=%d store=%s", self.pid, __version__,
                 self.config.worker_count, self.config.store_url.split("://")[0])
        try:
            return self.loop()
        finally:
            self.cleanup()

    def sync_config_accounts(self) -> None:
        """Accounts from ``[[accounts]]`` go into the store; ones removed from the file go away."""
        assert self.store is not None
        configured = {a.id for a in self.config.accounts}
        self.store.upsert_accounts(self.config.accounts, source="config")
        for row in self.store.list_accounts():
            if row.source == "config" and row.account.id not in configured:
                self.store.delete_account(row.account.id)
                log.info("event=account_removed account=%s reason=removed_from_config", row.account.id)

    def install_signals(self) -> None:
        self.sig_r, self.sig_w = os.pipe()
        for fd in (self.sig_r, self.sig_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.sig_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self.queue_signal)

    def queue_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def build_slots(self, workers: int) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.slots = [ChildSlot("scheduler", 0, None)]
        self.slots += [ChildSlot("worker", n, cpus[n % len(cpus)] if self.config.daemon.pin_cpus else None)
                       for n in range(workers)]
        if self.config.queue.kind != "none":
            self.slots.append(ChildSlot("publisher", 0, None))

    # --- children ---------------------------------------------------------------------------
    def spawn(self, slot: ChildSlot) -> None:
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            slot.pid = pid
            slot.killed = False
            slot.started_at = time.monotonic()
            slot.last_heartbeat = None
            log.info("event=child_started role=%s slot=%d pid=%d cpu=%s", slot.role, slot.slot, pid, slot.cpu)
            return
        code = EX_SOFTWARE
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            self.control.close_in_child()
            child.INCARNATION = slot.restarts
            if slot.cpu is not None:
                os.sched_setaffinity(0, {slot.cpu})
            logs.configure(self.config.daemon.log_level, slot.name)
            code = _role_main(slot.role)(self.config, slot.slot, self.pid)
        except StoreError as exc:  # a dependency outage, not a bug: see reap_children
            logging.getLogger(__name__).error("event=child_store_unavailable role=%s slot=%d error=%s", slot.role,
                                              slot.slot, exc)
            code = EX_UNAVAILABLE
        except BaseException as exc:  # the supervisor decides what a crash means
            logging.getLogger(__name__).exception("event=child_crashed role=%s slot=%d error=%s", slot.role,
                                                  slot.slot, exc)
        finally:
            os._exit(code)

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            if slot.beat is not None:
                self.totals.bank(slot.beat)
            slot.pid, slot.beat, slot.last_heartbeat = None, None, None
            slot.last_exit = (f"exit {os.WEXITSTATUS(status)}" if os.WIFEXITED(status)
                              else f"signal {signal.Signals(os.WTERMSIG(status)).name}")
            if slot.retired or self.state == State.STOPPING:
                continue
            now = time.monotonic()
            ran_for = now - slot.started_at
            slot.failures = 1 if ran_for > HEALTHY_AFTER else slot.failures + 1
            # A child that could not reach the store keeps being restarted (backoff capped at
            # MAX_RESTART_DELAY) for as long as the outage lasts: giving up would turn a database
            # restart into a dead daemon. Such exits never count toward the crash loop.
            unavailable = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EX_UNAVAILABLE
            slot.crashes = 0 if ran_for > HEALTHY_AFTER else slot.crashes
            slot.crashes += 0 if unavailable else 1
            slot.restarts += 1
            delay = 0.0 if slot.failures == 1 else min(MAX_RESTART_DELAY, 0.5 * 2 ** (slot.failures - 2))
            slot.start_after = now + delay
            log.error("event=child_exited role=%s slot=%d pid=%d how=%s ran_for=%.1fs restart_in=%.1fs",
                      slot.role, slot.slot, pid, slot.last_exit, ran_for, delay)
            if slot.crashes >= CRASH_LOOP_LIMIT:
                log.critical("event=fatal reason=crash_loop role=%s slot=%d failures=%d last=%s: giving up; "
                             "see the errors above", slot.role, slot.slot, slot.crashes, slot.last_exit)
                self.exit_code = EX_SOFTWARE
                self.begin_stop(fast=True)

    def murder_stuck(self, now: float) -> None:
        """A child that stops heartbeating is as good as dead: kill it, reap_children restarts it."""
        timeout = self.config.daemon.heartbeat_timeout
        for slot in self.slots:
            if slot.pid is None or slot.killed:
                continue
            since = slot.last_heartbeat if slot.last_heartbeat is not None else slot.started_at
            grace = timeout if slot.last_heartbeat is not None else max(timeout, 30.0)
            if now - since > grace:
                log.error("event=child_stuck role=%s slot=%d pid=%d silent_for=%.1fs action=kill",
                          slot.role, slot.slot, slot.pid, now - since)
                self.kill(slot, signal.SIGKILL)
                slot.killed = True  # once; reap_children takes it from here (it is not healthy)

    def manage_children(self, now: float) -> None:
        if self.state == State.STOPPING:
            return
        for slot in self.slots:
            if slot.pid is None and not slot.retired and now >= slot.start_after:
                self.spawn(slot)
        self.slots = [s for s in self.slots if not (s.retired and s.pid is None)]

    def kill(self, slot: ChildSlot, signum: int) -> None:
        if slot.pid is not None:
            try:
                os.kill(slot.pid, signum)
            except ProcessLookupError:
                pass

    # --- heartbeats and control -----------------------------------------------------------------
    def read_heartbeats(self, now: float) -> None:
        assert self.pull is not None
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            beat = frames.decode(data)
            if not isinstance(beat, frames.Heartbeat):
                self.totals.banked_dropped["supervisor"] = self.totals.banked_dropped.get("supervisor", 0) + 1
                continue
            slot = next((s for s in self.slots if s.role == beat.role and s.slot == beat.slot), None)
            if slot is None or slot.pid != beat.pid:
                continue  # a late beat from a previous incarnation
            slot.beat = beat
            slot.last_heartbeat = now

    def handle_request(self, request: control.AnyRequest) -> control.Reply:
        return getattr(self, f"handle_{type(request).__name__.lower()}")(request)

    def handle_status(self, request: control.Status) -> control.Reply:
        return control.Reply(ok=True, data=msgspec.to_builtins(view.status(self)))

    def handle_drain(self, request: control.Drain) -> control.Reply:
        self.exit_after_drain = self.exit_after_drain or request.exit
        if self.state in (State.STARTING, State.RUNNING):
            self.begin_drain()
        return control.Reply(ok=True, data={"state": self.state.value})

    def handle_resume(self, request: control.Resume) -> control.Reply:
        if self.state in (State.DRAINING, State.DRAINED):
            self.exit_after_drain = False
            self.transition(State.RUNNING)
            self.tell_scheduler(frames.Control(command="resume"))
            log.info("event=resumed")
        return control.Reply(ok=True, data={"state": self.state.value})

    def handle_reload(self, request: control.Reload) -> control.Reply:
        error = self.reload()
        return control.Reply(ok=error is None, error=error, data={"state": self.state.value})

    # --- signals ----------------------------------------------------------------------------------
    def handle_signals(self) -> None:
        try:
            while os.read(self.sig_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self.signals:
            signum = self.signals.pop(0)
            name = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "int", signal.SIGHUP: "hup",
                    signal.SIGCHLD: "chld"}[signum]
            getattr(self, f"handle_{name}")()

    def handle_term(self) -> None:
        """Graceful: drain, then exit 0."""
        log.info("event=signal signal=SIGTERM action=drain_then_exit")
        self.exit_after_drain = True
        if self.state in (State.STARTING, State.RUNNING, State.DRAINED):
            self.begin_drain()

    def handle_int(self) -> None:
        """Fast stop: children stop now (in-flight batches roll back, nothing is lost)."""
        log.info("event=signal signal=SIGINT action=fast_stop")
        self.begin_stop(fast=True)

    def handle_hup(self) -> None:
        self.reload()

    def handle_chld(self) -> None:
        pass  # reap_children runs every turn of the loop

    # --- state changes ------------------------------------------------------------------------------
    def transition(self, new: State) -> None:
        if new == self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"supervisor state {self.state.value} -> {new.value} is not allowed")
        log.info("event=state_changed from=%s to=%s", self.state.value, new.value)
        self.state = new
        self.next_status = 0.0

    def begin_drain(self) -> None:
        self.transition(State.DRAINING)
        self.drain_started = time.monotonic()
        self.tell_scheduler(frames.Control(command="drain"))

    def begin_stop(self, fast: bool) -> None:
        if self.state == State.STOPPING:
            return
        drained = self.state == State.DRAINED
        self.transition(State.STOPPING)
        notify.notify("STOPPING=1", "STATUS=stopping")
        # After a drain the children only have to exit: the drain already had shutdown_timeout.
        timeout = 2.0 if fast else 5.0 if drained else self.config.daemon.shutdown_timeout
        self.stop_deadline = time.monotonic() + timeout
        for slot in self.slots:
            self.kill(slot, signal.SIGINT if fast else signal.SIGTERM)

    def advance_state(self, now: float) -> None:
        workers = [s for s in self.slots if s.role == "worker" and not s.retired]
        if self.state == State.STARTING and self.all_heartbeating():
            self.transition(State.RUNNING)
        if self.state == State.DRAINING:
            drained = all(s.beat is not None and s.beat.state == "drained" for s in workers)
            sched = slot_of(self.slots, "scheduler")
            drained = drained and sched is not None and sched.beat is not None and sched.beat.state == "drained"
            timed_out = (self.drain_started is not None
                         and now - self.drain_started > self.config.daemon.shutdown_timeout)
            if drained or timed_out:
                if timed_out and not drained:
                    log.error("event=drain_timeout after=%.0fs action=%s", self.config.daemon.shutdown_timeout,
                              "stop" if self.exit_after_drain else "drained_anyway")
                self.transition(State.DRAINED)
        if self.state == State.DRAINED and self.exit_after_drain:
            self.begin_stop(fast=False)

    def all_heartbeating(self) -> bool:
        return all(s.pid is not None and s.last_heartbeat is not None for s in self.slots if not s.retired)

    def tell_scheduler(self, frame: frames.Control) -> None:
        if self.to_scheduler is not None and not send(self.to_scheduler, frame):
            log.error("event=control_frame_dropped command=%s reason=scheduler_queue_full", frame.command)

    def reload(self) -> str | None:
        """Re-read the configuration; a bad file is reported and the running one kept."""
        notify.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            new = config_mod.load(self.config.path or None)
            store = open_store(new.store_url, 1, 2)
            self.store, old = store, self.config
            self.config = self.control.config = new
            credentials.install_policy(new)  # children forked from now on read secrets under it
            self.sync_config_accounts()
            store.close()
        except (ConfigError, StoreError) as exc:
            log.error("event=reload_failed error=%s action=keeping_running_configuration", exc)
            notify.notify("READY=1")
            return str(exc)
        workers = new.worker_count
        current = [s for s in self.slots if s.role == "worker" and not s.retired]
        if workers != len(current):
            for slot in current[workers:]:
                slot.retired = True
                self.kill(slot, signal.SIGTERM)
            cpus = sorted(os.sched_getaffinity(0))
            for n in range(len(current), workers):
                self.slots.append(ChildSlot("worker", n, cpus[n % len(cpus)] if new.daemon.pin_cpus else None))
        if old.queue.kind == "none" and new.queue.kind != "none" and slot_of(self.slots, "publisher") is None:
            self.slots.append(ChildSlot("publisher", 0, None))
        self.tell_scheduler(frames.Control(command="reload", workers=workers))
        log.info("event=reloaded workers=%d accounts_in_config=%d", workers, len(new.accounts))
        notify.notify("READY=1")
        return None

    # --- the loop -------------------------------------------------------------------------------------
    def loop(self) -> int:
        assert self.pull is not None and self.control.sock is not None
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        poller.register(self.sig_r, zmq.POLLIN)
        while True:
            try:
                wait = LOOP_TICK
                if self.watchdog_every:  # keep-alives on time, not a loop tick late
                    wait = min(wait, max(0.0, self.next_watchdog - time.monotonic()))
                poller.poll(wait * 1000)
            except zmq.ZMQError as exc:
                if exc.errno != errno.EINTR:
                    raise
            self.handle_signals()
            self.control.serve()
            now = time.monotonic()  # after the control clients: heartbeats are stamped with the time they are read
            self.read_heartbeats(now)
            self.reap_children()
            self.murder_stuck(now)
            self.manage_children(now)
            self.advance_state(now)
            self.write_metrics(now)
            self.notify_systemd(now)
            if self.state == State.STOPPING and self.stop_finished(now):
                return self.exit_code

    def stop_finished(self, now: float) -> bool:
        self.reap_children()
        alive = [s for s in self.slots if s.pid is not None]
        if not alive:
            return True
        if self.stop_deadline is not None and now > self.stop_deadline:
            for slot in alive:
                log.error("event=child_kill role=%s slot=%d reason=stop_timeout", slot.role, slot.slot)
                self.kill(slot, signal.SIGKILL)
            self.stop_deadline = now + 5.0
        return False

    def write_metrics(self, now: float) -> None:
        if now >= self.next_memory:
            self.next_memory = now + 15.0  # PSS makes the kernel walk every mapping: not too often
            self.memory = view.memory(self)
        if now < self.next_metrics:
            return
        self.next_metrics = now + self.config.metrics.interval
        self.traffic = view.sample_traffic(self, now)
        if not self.config.metrics.textfile:
            return
        try:
            metrics.write_textfile(self.config.metrics.textfile, self.registry)
        except OSError as exc:
            log.error("event=metrics_write_failed path=%s error=%s", self.config.metrics.textfile, exc.strerror)

    def notify_systemd(self, now: float) -> None:
        notify.flush()  # state notifications systemd had no room for (notify.py: never blocks)
        if not self.ready_sent and self.state != State.STARTING:
            self.ready_sent = True
            notify.notify("READY=1", f"STATUS={view.status_line(self)}", f"MAINPID={self.pid}")
        if now >= self.next_status:
            self.next_status = now + 5.0
            notify.notify(f"STATUS={view.status_line(self)}")
        if self.watchdog_every and now >= self.next_watchdog:
            if view.making_progress(self, now):
                self.next_watchdog = now + self.watchdog_every
                notify.notify("WATCHDOG=1")
            else:  # withheld; look again shortly (systemd acts if it stays withheld)
                self.next_watchdog = now + min(0.5, self.watchdog_every)

    def cleanup(self) -> None:
        for slot in self.slots:
            self.kill(slot, signal.SIGKILL)
        self.control.remove()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
        log.info("event=stopped exit=%d", self.exit_code)
        notify.notify("STATUS=stopped")
        if not notify.flush(wait=2.0):  # STOPPING=1 still queued: systemd gets a bounded chance to read
            log.error("event=notify_lost what=stopping failures_total=%d", notify.failures())


def run(config: Config) -> int:
    return Supervisor(config).run()
