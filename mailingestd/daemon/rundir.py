"""daemon.runtime_dir: made private to this user (the control group may traverse it), and locked
so that one daemon runs per directory."""

from __future__ import annotations

import errno
import fcntl
import grp
import os
from pathlib import Path

from ..config import Config, ConfigError


def prepare(config: Config) -> None:
    path = Path(config.daemon.runtime_dir)
    longest = path / "supervisor.sock"
    if len(str(longest).encode()) > 100:  # sun_path holds 108 bytes; ZeroMQ ipc a little less
        raise ConfigError(f"daemon.runtime_dir: {path} is too long for Unix sockets "
                          f"({len(str(longest).encode())} bytes to {longest.name}; at most 100)")
    group = config.daemon.control_group
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


def lock(config: Config, pid: int) -> int:
    """One daemon per runtime_dir: a second one refuses to start instead of stealing sockets.
    Returns the descriptor holding the lock (held until the process exits)."""
    lock_path = Path(config.daemon.runtime_dir) / "mailingestd.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"daemon.runtime_dir: another mailingestd (pid {holder}) is running on "
                          f"{config.daemon.runtime_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
    return fd
