"""Process faults during heavy ingest: SIGKILL and SIGSTOP of every role, the supervisor under a
restarting parent (a stand-in for systemd's Restart= and WatchdogSec=), and SIGTERM.

Nothing appended may be missing from the store, nothing stored twice, and a FIFO queue sees every
key exactly once (its deduplication window covers the repeats a crash causes).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import BIN, Daemon, wait_until
from reliability_kit import (
    LONG,
    Ledger,
    QueueConsumer,
    accounts_for,
    audit,
    pick,
    queue_section,
)

pytestmark = pytest.mark.reliability

ROLES = ["worker", "scheduler", "publisher"]
HEARTBEAT_TIMEOUT = 3.0


@pytest.fixture
def users(dovecot):
    return [dovecot.new_user() for _ in range(pick(6, 12))]


def all_running(daemon: Daemon, roles: list[str]) -> bool:
    status = daemon.try_status()
    return bool(status) and all(c["pid"] and c["heartbeat_age"] is not None and c["heartbeat_age"] < 2
                                for c in status["children"] if c["role"] in roles)


def inject(daemon: Daemon, role: str, signum: int, rng: random.Random) -> None:
    """SIGKILL one child of ``role``, or SIGSTOP it for a random while (past the heartbeat timeout or not)."""
    victim = rng.choice([c for c in daemon.status()["children"] if c["role"] == role and c["pid"]])
    os.kill(victim["pid"], signum)
    if signum == signal.SIGSTOP:
        time.sleep(rng.uniform(0.5, HEARTBEAT_TIMEOUT + 2))
        try:
            os.kill(victim["pid"], signal.SIGCONT)  # if the supervisor has not killed it already
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("roles", pick([ROLES], [[r] for r in ROLES]), ids=lambda r: "+".join(r))
def test_sigkill_and_sigstop_of_children(dovecot, moto, sqs_fifo_queue, users, tmp_path, roles):
    rng = random.Random()
    # 3 rounds: 6 faults in a row on the scheduler's one slot, each before it has run 30 s; 8 would
    # rightly be a crash loop (CRASH_LOOP_LIMIT) and stop the daemon.
    rounds = pick(1, 3)
    ledger = Ledger(dovecot, users, f"kill-{'-'.join(roles)}")
    daemon = Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password,
                    heartbeat_timeout=f"{HEARTBEAT_TIMEOUT}s",
                    sections=queue_section(sqs_fifo_queue, moto.endpoint_url))
    injected = 0
    consumer = QueueConsumer(moto, sqs_fifo_queue)
    with daemon:
        appender = ledger.background(rate=pick(20, 60))
        for _ in range(rounds):
            faults = [(role, sig) for role in roles for sig in (signal.SIGKILL, signal.SIGSTOP)]
            rng.shuffle(faults)
            if not LONG:  # the short suite: SIGKILL of each role, SIGSTOP of one of them
                faults = [f for f in faults if f[1] == signal.SIGKILL] + [
                    next(f for f in faults if f[1] == signal.SIGSTOP)]
            for role, signum in faults:
                time.sleep(rng.uniform(0.3, 2.0))
                wait_until(lambda: all_running(daemon, ROLES), 30, 0.2, "every child running\n" + daemon.log_tail())
                inject(daemon, role, signum, rng)
                injected += 1
        wait_until(lambda: all_running(daemon, ROLES), 30, 0.2, "every child running\n" + daemon.log_tail())
        recovered_from = time.monotonic()
        time.sleep(1)
        appender.stop()
        assert daemon.proc.poll() is None, "the supervisor survived\n" + daemon.log_tail()
        audit(daemon, ledger, f"SIGKILL/SIGSTOP {'+'.join(roles)}", injected, recovered_from=recovered_from,
              consumer=consumer)
        assert daemon.stop(signal.SIGTERM) == 0


class Systemd:
    """``Restart=on-failure`` and ``WatchdogSec=`` for one mailingestd, like systemd does it.

    Runs the daemon with NOTIFY_SOCKET and WATCHDOG_USEC; when it exits unsuccessfully it is
    started again after ``RestartSec``; when it misses the watchdog it gets SIGABRT, then SIGKILL.
    """

    def __init__(self, daemon: Daemon, watchdog: float = 4.0, restart_sec: float = 0.5) -> None:
        self.daemon = daemon
        self.watchdog = watchdog
        self.restart_sec = restart_sec
        self.notify_path = Path(daemon.root) / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.1)
        self.env = dict(daemon.env, NOTIFY_SOCKET=str(self.notify_path), WATCHDOG_USEC=str(int(watchdog * 1e6)))
        self.stopping = threading.Event()
        self.starts = 0
        self.watchdog_kills = 0
        self.exits: list[int] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> Systemd:
        self.thread.start()
        wait_until(lambda: self.daemon.try_status() is not None, 30, 0.2, "the daemon up")
        return self

    def run(self) -> None:
        with open(self.daemon.log_path, "ab") as log:
            self.supervise(log)

    def supervise(self, log: Any) -> None:
        while not self.stopping.is_set():
            proc = subprocess.Popen([str(BIN / "mailingestd"), "--allow-root", "--config", str(self.daemon.config_path)],
                                    env=self.env, stdout=log, stderr=log)
            self.daemon.proc = proc
            self.starts += 1
            last_watchdog = None
            while proc.poll() is None and not self.stopping.is_set():
                try:
                    datagram = self.notify.recv(4096).decode()
                except TimeoutError:
                    datagram = ""
                if "WATCHDOG=1" in datagram.split("\n") or "READY=1" in datagram.split("\n"):
                    last_watchdog = time.monotonic()
                if last_watchdog is not None and time.monotonic() - last_watchdog > self.watchdog:
                    self.watchdog_kills += 1
                    proc.send_signal(signal.SIGABRT)
                    try:
                        proc.wait(2)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            if self.stopping.is_set():
                break
            self.exits.append(proc.wait())
            if self.exits[-1] == 0:
                break  # Restart=on-failure: a clean exit stays down
            self.stopping.wait(self.restart_sec)

    def stop(self) -> int:
        self.stopping.set()
        self.thread.join(10)
        return self.daemon.stop(signal.SIGTERM)


def test_supervisor_killed_and_stopped_under_a_restarting_parent(dovecot, moto, sqs_fifo_queue, users, tmp_path):
    rng = random.Random()
    ledger = Ledger(dovecot, users, "supervisor")
    daemon = Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password,
                    sections=queue_section(sqs_fifo_queue, moto.endpoint_url))
    consumer = QueueConsumer(moto, sqs_fifo_queue)
    systemd = Systemd(daemon).start()
    appender = ledger.background(rate=pick(20, 60))
    faults = pick([signal.SIGKILL], [signal.SIGKILL, signal.SIGSTOP] * 4)
    rng.shuffle(faults)
    try:
        for signum in faults:
            wait_until(lambda: all_running(daemon, ROLES), 60, 0.2, "every child running\n" + daemon.log_tail())
            time.sleep(rng.uniform(0.5, 3.0))
            pid = daemon.proc.pid
            os.kill(pid, signum)
            if signum == signal.SIGSTOP:
                time.sleep(rng.uniform(1.0, systemd.watchdog + 3))
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        wait_until(lambda: all_running(daemon, ROLES), 60, 0.2, "every child running\n" + daemon.log_tail())
        recovered_from = time.monotonic()
        time.sleep(1)
        appender.stop()
        audit(daemon, ledger, "SIGKILL/SIGSTOP supervisor (restarted, watchdog)", len(faults),
              recovered_from=recovered_from, consumer=consumer)
        killed = faults.count(signal.SIGKILL)
        assert systemd.starts >= 1 + killed, "every SIGKILL was followed by a restart"
        assert 70 not in systemd.exits, "no crash-loop exit"
    finally:
        appender.stopping.set()
        assert systemd.stop() == 0
        daemon.kill()


def test_sigterm_during_ingest_exits_0_and_loses_nothing(dovecot, moto, sqs_fifo_queue, users, tmp_path):
    ledger = Ledger(dovecot, users, "sigterm")
    daemon = Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password,
                    sections=queue_section(sqs_fifo_queue, moto.endpoint_url))
    consumer = QueueConsumer(moto, sqs_fifo_queue)
    appender = ledger.background(rate=pick(20, 60))
    rounds = pick(1, 5)
    try:
        for _ in range(rounds):
            daemon.start()
            time.sleep(random.uniform(1.0, 4.0))
            stopped_at = time.monotonic()
            assert daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()
            assert time.monotonic() - stopped_at < 20, "SIGTERM drains within shutdown_timeout"
            daemon.log.close()
        daemon.start()
        recovered_from = time.monotonic()
        appender.stop()
        audit(daemon, ledger, "SIGTERM during ingest (then start)", rounds, recovered_from=recovered_from,
              consumer=consumer)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        appender.stopping.set()
        daemon.kill()
