"""sd_notify through systemd-python; every call is a no-op when NOTIFY_SOCKET is unset."""

from __future__ import annotations

import os


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*fields: str) -> None:
    """Send ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``... in one datagram."""
    if not enabled():
        return
    from systemd import daemon

    daemon.notify("\n".join(fields))


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
