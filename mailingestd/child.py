"""What every child process shares: its sockets, its heartbeat, parent-death and signal handling.

A child is forked by the supervisor and creates its ZeroMQ context only after the fork. It dies
with the supervisor (PR_SET_PDEATHSIG, and an ``os.getppid()`` check for the race before it),
stops gracefully on SIGTERM, and reports to the supervisor every heartbeat interval.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import zmq

from .auth import credentials
from . import frames, hardening
from .config import Config

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
INCARNATION = 0  # set by the supervisor in the child after fork: restarts of this slot before it
MAX_ERRORS = 10
SEND_HWM = 10_000


def ipc_path(config: Config, name: str) -> str:
    return f"ipc://{Path(config.daemon.runtime_dir) / name}"


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the supervisor dies (no orphans holding sockets)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def bind_pull(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, SEND_HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, frames.MAX_FRAME_BYTES)
    path = endpoint[len("ipc://"):]
    if os.path.exists(path):
        os.unlink(path)  # a stale socket of this slot's previous life; the lock proves it is ours
    sock.bind(endpoint)
    os.chmod(path, 0o600)
    return sock


def connect_push(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    sock.setsockopt(zmq.SNDTIMEO, 0)
    sock.connect(endpoint)
    return sock


def send(sock: zmq.Socket, frame: frames.Frame) -> bool:
    """Send without blocking; False when the peer's queue is full or gone (the caller decides)."""
    try:
        sock.send(frames.encode(frame), zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (shared pages split among sharers); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ErrorLog:
    """The most recent distinct error lines, with counts (bounded)."""

    def __init__(self, limit: int = MAX_ERRORS) -> None:
        self.limit = limit
        self.entries: collections.OrderedDict[str, int] = collections.OrderedDict()

    def add(self, line: str) -> None:
        self.entries[line] = self.entries.pop(line, 0) + 1
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)

    def lines(self) -> list[str]:
        return [f"{line} (x{count})" if count > 1 else line for line, count in reversed(self.entries.items())]


class Child:
    """Process plumbing for one role: context, supervisor socket, heartbeat, stop flag."""

    def __init__(self, config: Config, role: str, slot: int, parent_pid: int) -> None:
        self.config = config
        self.role = role
        self.slot = slot
        self.parent_pid = parent_pid
        self.pid = os.getpid()
        self.stop_requested = False
        self.fast_stop = False
        self.errors = ErrorLog()
        self.frames_dropped = 0
        self.last_heartbeat = 0.0
        self.stored_seen = 0
        self.last_ingest = 0.0
        die_with_parent(parent_pid)
        hardening.not_dumpable()  # decrypted secrets live here: no core dump, no same-user ptrace
        self.pss_bytes = 0
        self.next_pss = 0.0
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_int)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads go through the supervisor
        self.ctx = zmq.Context(io_threads=1)
        self.to_supervisor = connect_push(self.ctx, ipc_path(config, "supervisor.sock"))

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _on_int(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        self.fast_stop = True

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def heartbeat_due(self, now: float) -> bool:
        return now - self.last_heartbeat >= self.config.daemon.heartbeat_interval

    def heartbeat(self, state: str, now: float, stats: frames.AnyStats, **fields: Any) -> None:
        self.last_heartbeat = now
        stats.frames_dropped = self.frames_dropped
        if now >= self.next_pss:
            self.next_pss = now + 15.0  # PSS makes the kernel walk every mapping: not too often
            self.pss_bytes = pss_bytes(self.pid)
        stats.pss_bytes = self.pss_bytes
        for line in credentials.take_notices():  # plaintext or unverified TLS, for status
            self.errors.add(line)
        send(self.to_supervisor, frames.Heartbeat(role=self.role, slot=self.slot, pid=self.pid, state=state,
                                                  stats=stats, errors=self.errors.lines(), **fields))

    def ingest_clock(self, stored_total: int) -> float:
        """Unix time ``stored_total`` (messages stored so far) last grew, as seen at heartbeats;
        0.0 before the first message. Feeds mailingestd_last_ingest_timestamp_seconds."""
        if stored_total > self.stored_seen:
            self.stored_seen = stored_total
            self.last_ingest = time.time()
        return self.last_ingest

    def decode(self, data: bytes) -> frames.AnyFrame | None:
        frame = frames.decode(data)
        if frame is None:
            self.frames_dropped += 1
            self.errors.add(f"role={self.role} event=frame_dropped reason=malformed bytes={len(data)}")
        return frame

    def close(self) -> None:
        self.ctx.destroy(linger=0)
