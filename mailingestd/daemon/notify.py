"""sd_notify for the supervisor; every call is a no-op when NOTIFY_SOCKET is unset.

A notification must never raise, block or stop the daemon (systemd reading its socket late, a
signal arriving during the send). libsystemd's ``sd_notify`` (and systemd-python over it) sends
on a blocking socket: with systemd's queue full it blocks, and a signal then surfaces as
``InterruptedError`` out of the supervisor's loop. So the datagram is sent here without blocking
on a socket of our own (the sd_notify wire protocol is one datagram of ``KEY=value`` lines).

A datagram that does not fit now is dropped when it only says ``WATCHDOG=1`` or ``STATUS=`` (a
late keep-alive or a stale status line is worth nothing), and kept otherwise (``READY=1``,
``RELOADING=1``, ``STOPPING=1``): ``flush()`` retries it on every turn of the supervisor's loop,
and ``flush(wait=...)`` at exit waits a bounded time for room. Failures are counted
(``failures``) and logged once until a send succeeds again.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

MAX_PENDING = 16  # state datagrams kept while systemd does not read; the oldest go first
_DROPPABLE = ("WATCHDOG=", "STATUS=")


def _droppable(fields: tuple[str, ...] | list[str]) -> bool:
    return all(field.startswith(_DROPPABLE) for field in fields)


class _Notifier:
    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.address = ""
        self.pending: collections.deque[bytes] = collections.deque(maxlen=MAX_PENDING)
        self.failures = 0
        self.failing = False

    def _socket(self, address: str) -> socket.socket:
        if self.sock is None or self.address != address:
            if self.sock is not None:
                self.sock.close()
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
            self.address = address
        return self.sock

    def _send_one(self, datagram: bytes) -> bool:
        address = os.environ.get("NOTIFY_SOCKET", "")
        target = "\0" + address[1:] if address.startswith("@") else address  # abstract namespace
        try:
            sock = self._socket(address)
            while True:
                try:
                    sock.sendto(datagram, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, target)
                    break
                except InterruptedError:
                    continue
        except OSError as exc:
            self.failures += 1
            if not self.failing:
                self.failing = True
                log.error("event=notify_failed socket=%s error=%s action=%s", address,
                          errno.errorcode.get(exc.errno or 0, str(exc)),
                          "dropped" if _droppable(datagram.decode().splitlines()) else "kept")
            return False
        if self.failing:
            self.failing = False
            log.info("event=notify_recovered failures_total=%d", self.failures)
        return True

    def send(self, fields: tuple[str, ...]) -> None:
        datagram = "\n".join(fields).encode()
        sent = self.flush() and self._send_one(datagram)  # never ahead of older state notifications
        if not sent and not _droppable(fields):
            self.pending.append(datagram)

    def flush(self, wait: float = 0.0) -> bool:
        """Send what is pending; True when nothing is left. ``wait``: seconds to wait for room."""
        deadline = time.monotonic() + wait
        while self.pending:
            if self._send_one(self.pending[0]):
                self.pending.popleft()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.05))  # an unconnected datagram socket cannot poll for the peer's room
        return True


_notifier = _Notifier()


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*fields: str) -> None:
    """Send ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``... in one datagram; never raises or blocks."""
    if enabled():
        _notifier.send(fields)


def flush(wait: float = 0.0) -> bool:
    """Retry the state notifications systemd had no room for; True when none is left."""
    return _notifier.flush(wait) if enabled() else True


def failures() -> int:
    """Notifications that could not be sent (each retry counts)."""
    return _notifier.failures


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds when systemd asked this PID for keep-alives, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
