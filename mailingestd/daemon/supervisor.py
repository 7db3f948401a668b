"""The supervisor (main PID): forks the children, keeps them alive, speaks for the daemon.

Its loop is a short list of verbs, gunicorn-arbiter style::

    handle_signals -> serve_control -> read_heartbeats -> reap_children -> murder_stuck
    -> manage_children -> advance_state -> write_metrics -> notify_systemd

Signal handlers only queue the signal (``signal.set_wakeup_fd``); the loop dispatches by name
(``handle_term``, ``handle_hup``...). Children are forked before the supervisor creates its own
ZeroMQ context, and each creates its own after the fork. A child that dies is restarted at
once, then with exponential backoff; a slot that keeps dying stops the daemon with a fatal
error (exit 70) rather than looping forever. A child that stops heartbeating (stuck, or
SIGSTOPped) is killed and replaced like a dead one.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import grp
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import zmq
from prometheus_client.registry import CollectorRegistry

from .. import __version__, child, config as config_mod, control, frames, hardening, logs
from ..auth import credentials
from . import metrics, notify
from ..child import bind_pull, connect_push, ipc_path, pss_bytes, send
from ..config import Config, ConfigError
from ..histogram import Histogram
from ..store.leases import cluster_status, lease_counts
from .metrics import CAPACITY_STATS, server_capacity
from ..sched.planner import LAG_BUCKETS
from ..store.store import Store, StoreError, open_store
from ..sysexits import EX_OK, EX_SOFTWARE, EX_UNAVAILABLE

log = logging.getLogger(__name__)

LOOP_TICK = 0.5  # events (heartbeats, control, signals, SIGCHLD) wake the loop at once
CRASH_LOOP_LIMIT = 8
HEALTHY_AFTER = 30.0
MAX_RESTART_DELAY = 30.0
MAX_CONTROL_CLIENTS = 32
CONTROL_CLIENT_TIMEOUT = 5.0


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    DRAINED = "drained"
    STOPPING = "stopping"


_TRANSITIONS = {
    State.STARTING: {State.RUNNING, State.DRAINING, State.STOPPING},
    State.RUNNING: {State.DRAINING, State.STOPPING},
    State.DRAINING: {State.DRAINED, State.RUNNING, State.STOPPING},
    State.DRAINED: {State.RUNNING, State.STOPPING, State.DRAINING},
    State.STOPPING: set(),
}


class ChildSlot:
    """One role/slot the supervisor keeps filled, across incarnations of its process."""

    def __init__(self, role: str, slot: int, cpu: int | None) -> None:
        self.role = role
        self.slot = slot
        self.cpu = cpu
        self.pid: int | None = None
        self.started_at = 0.0
        self.last_heartbeat: float | None = None
        self.beat: frames.Heartbeat | None = None
        self.restarts = 0
        self.failures = 0  # consecutive short runs: the restart backoff
        self.crashes = 0  # the same, but not counting exits for an unreachable store: the crash-loop fatal
        self.start_after = 0.0
        self.retired = False
        self.killed = False  # SIGKILLed as stuck, not yet reaped
        self.last_exit = ""

    @property
    def name(self) -> str:
        return self.role if self.role != "worker" else f"worker-{self.slot}"


def _role_main(role: str) -> Callable[[Config, int, int], int]:
    if role == "worker":
        from ..fetch.worker import main
    elif role == "scheduler":
        from ..sched.scheduler import main
    else:
        from ..publish.process import main
    return main


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


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
        self.control_sock: socket.socket | None = None
        self.control_clients: dict[socket.socket, tuple[float, bytes]] = {}
        self.lock_fd: int | None = None
        self.store: Store | None = None
        self.totals = metrics.Totals()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics.DaemonCollector(self.metrics_snapshot))
        self.next_metrics = 0.0
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.watchdog_every = notify.watchdog_interval()
        self.exit_after_drain = False
        self.stop_deadline: float | None = None
        self.exit_code = EX_OK
        self.ready_sent = False
        self.traffic: list[tuple[float, float, float]] = []  # (monotonic, polls, messages) samples
        self.memory = 0
        self.next_memory = 0.0
        self.drain_started: float | None = None

    # --- startup ----------------------------------------------------------------------------
    def run(self) -> int:
        credentials.install_policy(self.config)  # before any fork: the children inherit it
        insecure_store = hardening.postgres_transport_warning(self.config.store_url)
        if insecure_store:
            log.warning("event=insecure_store_connection detail=%s", insecure_store)
        self.prepare_runtime_dir()
        self.acquire_lock()
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
        self.open_control_socket()
        if self.config.metrics.http_listen:
            metrics.serve_http(self.config.metrics.http_listen, self.registry, self.healthy)
        log.info("event=started pid=%d version=%s workers=%d store=%s", self.pid, __version__,
                 self.config.worker_count, self.config.store_url.split("://")[0])
        try:
            return self.loop()
        finally:
            self.cleanup()

    def prepare_runtime_dir(self) -> None:
        path = Path(self.config.daemon.runtime_dir)
        longest = path / "supervisor.sock"
        if len(str(longest).encode()) > 100:  # sun_path holds 108 bytes; ZeroMQ ipc a little less
            raise ConfigError(f"daemon.runtime_dir: {path} is too long for Unix sockets "
                              f"({len(str(longest).encode())} bytes to {longest.name}; at most 100)")
        group = self.config.daemon.control_group
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if group:
                # The group may traverse (not list) the directory to reach control.sock (0660);
                # the ipc sockets stay 0600, owner only.
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
                os.chmod(path, 0o710)
            else:
                os.chmod(path, 0o700)
        except KeyError:
            raise ConfigError(f"daemon.control_group: no such group {group!r}") from None
        except OSError as exc:
            raise ConfigError(f"daemon.runtime_dir: cannot prepare {path}: {exc.strerror}") from None
        st = path.stat()
        if st.st_uid != os.geteuid():
            raise ConfigError(f"daemon.runtime_dir: {path} belongs to uid {st.st_uid}, not to this user")

    def acquire_lock(self) -> None:
        """One daemon per runtime_dir: a second one refuses to start instead of stealing sockets."""
        lock_path = Path(self.config.daemon.runtime_dir) / "mailingestd.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"daemon.runtime_dir: another mailingestd (pid {holder}) is running on "
                              f"{self.config.daemon.runtime_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.pid}\n".encode(), 0)
        self.lock_fd = fd

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
            if self.control_sock is not None:
                self.control_sock.close()
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

    def open_control_socket(self) -> None:
        path = Path(self.config.daemon.runtime_dir) / "control.sock"
        if path.exists():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if self.config.daemon.control_group:
            try:
                os.chown(path, -1, grp.getgrnam(self.config.daemon.control_group).gr_gid)
                os.chmod(path, 0o660)
            except (KeyError, OSError) as exc:
                log.error("event=control_group_failed group=%s error=%s", self.config.daemon.control_group, exc)
        sock.listen(MAX_CONTROL_CLIENTS)
        sock.setblocking(False)
        self.control_sock = sock

    def serve_control(self) -> None:
        """Answer mailingestctl requests; each gets one reply, garbage gets an error.

        A connection waits in ``control_clients`` until its whole request line has arrived, read
        without blocking each turn of the loop: a client that connects and says nothing (or
        dribbles) costs a slot for CONTROL_CLIENT_TIMEOUT, never a stall of the supervisor.
        """
        assert self.control_sock is not None
        now = time.monotonic()
        while len(self.control_clients) < MAX_CONTROL_CLIENTS:
            try:
                conn, _ = self.control_sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            conn.setblocking(False)
            self.control_clients[conn] = (now + CONTROL_CLIENT_TIMEOUT, b"")
        for conn, (deadline, buf) in list(self.control_clients.items()):
            try:
                while b"\n" not in buf and len(buf) <= control.MAX_REQUEST_BYTES:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
            except BlockingIOError:
                if now < deadline:
                    self.control_clients[conn] = (deadline, buf)
                    continue
            except OSError:
                pass
            del self.control_clients[conn]
            with conn:
                line = buf.split(b"\n", 1)[0] if len(buf) <= control.MAX_REQUEST_BYTES else None
                request = control.decode_request(line) if line is not None else "request too long"
                refused = request if isinstance(request, str) else self.refusal(conn, request)
                reply = control.Reply(ok=False, error=refused) if refused else self.dispatch(request)
                try:
                    conn.settimeout(2.0)
                    conn.sendall(control.encode_reply(reply))
                except OSError as exc:
                    log.warning("event=control_client_error error=%s", exc)

    def refusal(self, conn: socket.socket, request: control.AnyRequest) -> str | None:
        """The socket's mode lets daemon.control_group connect; what each peer may ask is decided
        on its kernel credentials (control.authorize)."""
        try:
            peer = control.peer_of(conn)
        except OSError:
            return "permission denied: no peer credentials"
        group = self.config.daemon.control_group
        try:
            gid = grp.getgrnam(group).gr_gid if group else None
        except KeyError:
            gid = None
        refused = control.authorize(request, peer, gid)
        if refused:
            log.warning("event=control_refused command=%s uid=%d pid=%d", type(request).__name__.lower(), peer.uid,
                        peer.pid)
        return refused

    def dispatch(self, request: control.AnyRequest) -> control.Reply:
        handler = getattr(self, f"handle_{type(request).__name__.lower()}")
        try:
            return handler(request)
        except Exception as exc:  # a control request must never take the supervisor down
            log.exception("event=control_failed command=%s", type(request).__name__.lower())
            return control.Reply(ok=False, error=f"internal error: {type(exc).__name__}: {exc}")

    def handle_status(self, request: control.Status) -> control.Reply:
        return control.Reply(ok=True, data=self.status())

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
        if new not in _TRANSITIONS[self.state]:
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
            sched = self.slot_of("scheduler")
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

    def making_progress(self, now: float) -> bool:
        """What WATCHDOG=1 vouches for: this loop runs (it is the one sending) and the scheduler
        heartbeats in time. Workers are not part of it: one that dies and waits out its restart
        backoff is this loop's job, and withholding keep-alives for it got the whole daemon
        SIGABRTed (every IDLE connection dropped); a worker's crash loop still ends in exit 70."""
        sched = self.slot_of("scheduler")
        return (sched is not None and not sched.killed and sched.last_heartbeat is not None
                and now - sched.last_heartbeat <= self.heartbeat_limit())

    def heartbeat_limit(self) -> float:
        return min(self.config.daemon.heartbeat_timeout, 3 * self.config.daemon.heartbeat_interval + 1)

    def healthy(self) -> bool:
        """Scheduler and every worker heartbeat in time (``/health``)."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.role == "publisher" or slot.retired:
                continue
            if slot.killed or slot.last_heartbeat is None or now - slot.last_heartbeat > self.heartbeat_limit():
                return False
        return True

    def slot_of(self, role: str) -> ChildSlot | None:
        return next((s for s in self.slots if s.role == role and not s.retired), None)

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
            self.config = new
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
        if old.queue.kind == "none" and new.queue.kind != "none" and self.slot_of("publisher") is None:
            self.slots.append(ChildSlot("publisher", 0, None))
        self.tell_scheduler(frames.Control(command="reload", workers=workers))
        log.info("event=reloaded workers=%d accounts_in_config=%d", workers, len(new.accounts))
        notify.notify("READY=1")
        return None

    # --- the loop -------------------------------------------------------------------------------------
    def loop(self) -> int:
        assert self.pull is not None and self.control_sock is not None
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.control_sock, zmq.POLLIN)
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
            self.serve_control()
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

    @staticmethod
    def child_pss(slot: ChildSlot) -> int:
        """A child's own report (children are not dumpable: their smaps_rollup is closed to us
        unless we are root), else a read of it."""
        reported = slot.beat.stats.pss_bytes if slot.beat is not None and slot.beat.stats is not None else 0
        return reported or pss_bytes(slot.pid)

    def write_metrics(self, now: float) -> None:
        if now >= self.next_memory:
            self.next_memory = now + 15.0  # PSS makes the kernel walk every mapping: not too often
            self.memory = pss_bytes(self.pid) + sum(self.child_pss(s) for s in self.slots if s.pid)
        if now < self.next_metrics:
            return
        self.next_metrics = now + self.config.metrics.interval
        polls = sum(self.totals.labeled("polls", self.beats()).values())
        messages = self.totals.counter("messages_ingested", self.beats())
        self.traffic.append((now, polls, messages))
        self.traffic = [t for t in self.traffic if now - t[0] <= 3600]
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
            notify.notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={self.pid}")
        if now >= self.next_status:
            self.next_status = now + 5.0
            notify.notify(f"STATUS={self.status_line()}")
        if self.watchdog_every and now >= self.next_watchdog:
            if self.making_progress(now):
                self.next_watchdog = now + self.watchdog_every
                notify.notify("WATCHDOG=1")
            else:  # withheld; look again shortly (systemd acts if it stays withheld)
                self.next_watchdog = now + min(0.5, self.watchdog_every)

    # --- views ------------------------------------------------------------------------------------------
    def beats(self) -> list[frames.Heartbeat]:
        return [s.beat for s in self.slots if s.beat is not None]

    def scheduler_stats(self) -> frames.SchedulerStats:
        sched = self.slot_of("scheduler")
        stats = sched.beat.stats if sched and sched.beat else None
        if isinstance(stats, frames.SchedulerStats):
            return stats
        return frames.SchedulerStats(accounts=0, in_flight=0, uidvalidity_changes=0, drain_in_flight_accounts=0,
                                     drain_in_flight_messages=0)

    def worker_stats(self) -> list[frames.WorkerStats]:
        return [b.stats for b in self.beats() if isinstance(b.stats, frames.WorkerStats)]

    def status_line(self) -> str:
        accounts = self.scheduler_stats().accounts
        idle = sum(w.idle_connections for w in self.worker_stats())
        messages = int(self.totals.counter("messages_ingested", self.beats()))
        return f"{self.state.value}; {accounts} accounts, {int(idle)} idling; {messages} messages stored"

    def metrics_snapshot(self) -> dict[str, Any]:
        beats = self.beats()
        now = time.monotonic()
        sched = self.slot_of("scheduler")
        sched_beat = sched.beat if sched else None
        publisher = self.slot_of("publisher")
        pub_beat = publisher.beat if publisher else None
        children: dict[str, float] = {"scheduler": 0, "worker": 0, "publisher": 0}
        restarts: dict[str, float] = {"scheduler": 0, "worker": 0, "publisher": 0}
        ages: dict[str, float] = {}
        for slot in self.slots:
            restarts[slot.role] = restarts.get(slot.role, 0) + slot.restarts
            if slot.pid is not None:
                children[slot.role] = children.get(slot.role, 0) + 1
                age = now - (slot.last_heartbeat if slot.last_heartbeat is not None else slot.started_at)
                ages[slot.role] = max(ages.get(slot.role, 0.0), age)
        accounts: dict[tuple[str, str], float] = {}
        if sched_beat is not None:
            for key, value in sched_beat.labeled.get("accounts", {}).items():
                state, _, priority = key.partition("/")
                accounts[(state, priority)] = value
        connections: dict[str, float] = {}
        for beat in beats:
            if beat.role == "worker":
                for server, value in beat.labeled.get("connections", {}).items():
                    connections[server] = connections.get(server, 0) + value
        return {
            "beats": beats, "totals": self.totals, "state": self.state.value, "start_time": self.started_wall,
            "children": children, "restarts": restarts, "heartbeat_age": ages, "memory_bytes": self.memory,
            "memory_budget": self.config.daemon.memory_budget, "accounts": accounts, "connections": connections,
            "connection_limit": sched_beat.labeled.get("connection_limit", {}) if sched_beat else {},
            "waiting": sched_beat.labeled.get("waiting", {}) if sched_beat else {},
            "capacity": {name: sched_beat.labeled.get(name, {}) if sched_beat else {} for name in CAPACITY_STATS},
            "last_ingest": self.totals.last_ingest_at(beats),
            "idle_connections": sum(w.idle_connections for w in self.worker_stats()),
            "outbox_depth": pub_beat.stats.outbox_depth
            if pub_beat and isinstance(pub_beat.stats, frames.PublisherStats) else 0,
            "outbox_parked": pub_beat.stats.parked
            if pub_beat and isinstance(pub_beat.stats, frames.PublisherStats) else 0,
            "folders_stuck": sum(w.stuck_folders for w in self.worker_stats()),
            "outbox_oldest_age": pub_beat.stats.outbox_oldest_age
            if pub_beat and isinstance(pub_beat.stats, frames.PublisherStats) else 0.0,
            "publish_rate": pub_beat.stats.publish_rate
            if pub_beat and isinstance(pub_beat.stats, frames.PublisherStats) else 0.0,
            "node_id": self.config.daemon.node_id or socket.gethostname(),
            "high_interval": self.config.scheduler.high_interval,
            "leases": lease_counts(self.config, sched_beat.detail if sched_beat else None),
            "notify_failures": notify.failures(),
        }

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        snap = self.metrics_snapshot()
        beats = snap["beats"]
        children = []
        for slot in self.slots:
            if slot.retired and slot.pid is None:
                continue
            children.append({
                "role": slot.role, "slot": slot.slot, "pid": slot.pid, "cpu": slot.cpu,
                "state": slot.beat.state if slot.beat else ("starting" if slot.pid else "restarting"),
                "rss_bytes": rss_bytes(slot.pid) if slot.pid else 0, "restarts": slot.restarts,
                "heartbeat_age": round(now - slot.last_heartbeat, 3) if slot.last_heartbeat is not None else None,
                "last_exit": slot.last_exit or None,
            })
        polls_total = sum(self.totals.labeled("polls", beats).values())
        messages_total = self.totals.counter("messages_ingested", beats)
        minute_ago = next((t for t in self.traffic if now - t[0] <= 65), None)
        sched = self.slot_of("scheduler")
        sched_beat = sched.beat if sched else None
        by_state: dict[str, float] = {}
        by_priority: dict[str, float] = {}
        for (state, priority), value in snap["accounts"].items():
            by_state[state] = by_state.get(state, 0) + value
            by_priority[priority] = by_priority.get(priority, 0) + value
        servers = {}
        for server in sorted(set(snap["connections"]) | set(snap["connection_limit"]) | set(snap["waiting"])):
            servers[server] = {"connections": snap["connections"].get(server, 0),
                               "limit": snap["connection_limit"].get(server),
                               "waiting": snap["waiting"].get(server, 0),
                               **server_capacity(server, snap["capacity"])}
        lag = self.totals.histogram("scheduler_lag_seconds", beats)
        errors: list[str] = []
        for beat in beats:
            for line in beat.errors:
                if line not in errors:
                    errors.append(line)
        pub = self.slot_of("publisher")
        return {
            "supervisor": {"pid": self.pid, "version": __version__, "state": self.state.value,
                           "uptime": round(now - self.started_mono, 1), "node_id": self.config.daemon.node_id
                           or socket.gethostname(), "store": self.config.store_url.split("://")[0],
                           "memory_bytes": self.memory, "memory_budget": self.config.daemon.memory_budget},
            "children": children,
            "accounts": {"total": self.scheduler_stats().accounts,
                         "by_state": by_state, "by_priority": by_priority},
            "servers": servers,
            "traffic": {"polls_total": polls_total, "messages_total": messages_total,
                        "polls_last_minute": polls_total - minute_ago[1] if minute_ago else polls_total,
                        "messages_last_minute": messages_total - minute_ago[2] if minute_ago else messages_total,
                        "idle_connections": snap["idle_connections"],
                        "lag_p50": Histogram.quantile(LAG_BUCKETS, lag, 0.5) if lag else None,
                        "lag_p99": Histogram.quantile(LAG_BUCKETS, lag, 0.99) if lag else None},
            "outbox": {"enabled": self.config.queue.kind != "none", "depth": snap["outbox_depth"],
                       "parked": snap["outbox_parked"],
                       "published_total": self.totals.counter("published", beats),
                       "oldest_age": round(snap["outbox_oldest_age"], 1),
                       "publish_rate": snap["publish_rate"], "node_id": snap["node_id"],
                       "publish_errors_total": self.totals.counter("publish_errors", beats),
                       "publisher_state": pub.beat.state if pub and pub.beat else None},
            "drain": {"in_flight_accounts": self.scheduler_stats().drain_in_flight_accounts,
                      "in_flight_messages": self.scheduler_stats().drain_in_flight_messages},
            "cluster": cluster_status(self.config, sched_beat.detail if sched_beat else None),
            "stuck_folders": sorted(line for beat in beats if beat.role == "worker"
                                    for line in beat.detail.get("stuck_folders", "").splitlines()),
            "errors": errors[:10],
        }

    def cleanup(self) -> None:
        for slot in self.slots:
            self.kill(slot, signal.SIGKILL)
        for name in ("control.sock",):
            try:
                (Path(self.config.daemon.runtime_dir) / name).unlink()
            except OSError:
                pass
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
        log.info("event=stopped exit=%d", self.exit_code)
        notify.notify("STATUS=stopped")
        if not notify.flush(wait=2.0):  # STOPPING=1 still queued: systemd gets a bounded chance to read
            log.error("event=notify_lost what=stopping failures_total=%d", notify.failures())


def run(config: Config) -> int:
    return Supervisor(config).run()
