"""Process hygiene shared by ``mailingestd`` and ``mailingestctl`` (docs/security.md).

- Files either program creates are private (umask 077): a message written with ``messages get``,
  a key printed into a file, a SQLite store and its -wal/-shm files.
- No core dumps: a dump of a worker holds decrypted passwords and tokens. The unit sets
  ``LimitCORE=0``; :func:`no_core_dumps` does the same from inside, for any other way of running.
- The daemon does not run as root unless asked to (``--allow-root``): it needs no privilege, and
  as root a bug in the IMAP edge would be a root compromise.
"""

from __future__ import annotations

import os
import resource


def private_files() -> None:
    os.umask(0o077)


def no_core_dumps() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):  # already lower than asked, or not allowed: nothing to undo
        pass


def refuse_root(allow_root: bool) -> str | None:
    """Why the daemon will not start as this user, or None."""
    if os.geteuid() == 0 and not allow_root:
        return ("refusing to run as root: run it as its own user (the unit's User=mailingestd, or "
                "runuser -u mailingestd -- mailingestd ...), or pass --allow-root")
    return None


def postgres_transport_warning(url: str) -> str | None:
    """A warning when a PostgreSQL store on another host is reached without verified TLS.

    With libpq's default ``sslmode=prefer`` a man in the middle can downgrade the connection and
    rewrite rows, ``accounts`` included (docs/security.md). A Unix socket or loopback is local.
    """
    if not url.startswith(("postgresql://", "postgres://")):
        return None
    import ipaddress
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    hosts = [h for h in (parts.hostname or "").split(",") if h] + query.get("host", [])
    if not hosts:
        return None  # libpq's default: the local Unix socket

    def local(host: str) -> bool:
        if host.startswith("/") or host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            return False

    sslmode = (query.get("sslmode") or [""])[-1]
    if all(local(h) for h in hosts) or sslmode in ("verify-full", "require"):
        return None
    return (f"store.url: PostgreSQL on {', '.join(h for h in hosts if not local(h))} without sslmode=verify-full "
            f"(sslmode={sslmode or 'prefer, the default'}): a man in the middle can read and rewrite the store, "
            "accounts included; add ?sslmode=verify-full")


PR_SET_DUMPABLE = 4  # linux/prctl.h
PR_GET_DUMPABLE = 3


def not_dumpable() -> None:
    """No core dump, and no ptrace or /proc/PID/mem by other processes of the same user (a
    mailingestctl run as mailingestd, say): for the children, which hold decrypted secrets.
    Their memory use is then reported by themselves (child.Child.heartbeat), since the
    supervisor may no longer read their smaps_rollup."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def dumpable() -> bool:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1
