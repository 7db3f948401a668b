"""Real throwaway servers for the demo, the tests and the benchmarks.

Every class here starts a real server process on 127.0.0.1 and a free high port, with all of its
files under one directory you give it: Dovecot and Cyrus (IMAP), PostgreSQL, moto_server (SQS),
Prometheus's node_exporter and Prometheus itself. Nothing here is mocked and nothing imports pytest,
so the same code serves ``tests/conftest.py``, ``bench/`` and ``python -m devtools.devservers``
(the README demo).

Common contract: ``start()`` waits until the server answers and raises :class:`ServerStartError` with
the tail of the server's log when it does not within its timeout; ``stop()`` waits until the process
is gone; ``restart()`` is stop + start on the same port; every instance is also a context manager, and
an ``atexit`` hook kills whatever is still running when the interpreter exits (a failed test must not
leave a Dovecot behind). A missing binary raises :class:`MissingBinaryError` naming the Debian or PyPI
package to install.

Dovecot, Cyrus and PostgreSQL need root: the Dovecot and Cyrus masters start as root and drop to the
``dovecot`` and ``cyrus`` users, and ``initdb`` refuses root, so PostgreSQL runs as the ``postgres``
system user.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import imapclient

__all__ = [
    "Cyrus",
    "Dovecot",
    "MissingBinaryError",
    "MotoServer",
    "NodeExporter",
    "Postgres",
    "Prometheus",
    "ServerStartError",
    "free_port",
]

LOOPBACK = "127.0.0.1"
TlsCert = Literal["valid", "self_signed", "expired", "wrong_host"]

# Dovecot 2.3's default post-login capability list minus IDLE; imap_capability can only add to the
# defaults ("+...") or replace them, so a polling-only server needs the whole list spelled out.
_CAPABILITIES_WITHOUT_IDLE = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS "
    "THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS "
    "LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH "
    "LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ "
    "NOTIFY"
)


class ServerStartError(RuntimeError):
    """A server did not come up (or go down) in time; the message ends with its log's tail."""


class MissingBinaryError(RuntimeError):
    """A server binary is not installed; the message names the package that provides it."""


# ---------------------------------------------------------------------------------------------
# small helpers shared by every server


_handed_out_ports: set[int] = set()


def free_port() -> int:
    """Return a loopback TCP port that is free now and was not handed out before in this process.

    Remembering earlier answers avoids giving the same port to two servers started back to back
    before either has bound it.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK, 0))
            port = probe.getsockname()[1]
        if port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port
    raise RuntimeError("no free loopback port found")


def _find_binary(name: str, package: str, extra_dirs: Sequence[str] = ()) -> str:
    """Locate a server binary on PATH or in ``extra_dirs`` (sbin is often not on PATH)."""
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise MissingBinaryError(f"{name} not found: install it with {package}")
    return found


def _port_accepts(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has exited; only its parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it, read from /proc (children of a daemon included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _make_traversable(path: Path) -> None:
    """Give "others" search permission on ``path`` and its ancestors.

    pytest creates its temporary directories 0700, and Dovecot's mail processes and PostgreSQL run
    as other users who must reach files below them.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod(mode | 0o001)


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def _http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback only)
        return response.read()


def _run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a helper command; on failure raise with its output (CalledProcessError hides it)."""
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a forked child: ask the kernel to SIGKILL us when the parent thread exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_running: set[_Server] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: stop every server still running when the interpreter exits."""
    for server in list(_running):
        try:
            server.kill()
        except Exception:  # noqa: BLE001 (best effort while exiting; nothing left to report to)
            pass


class _Server:
    """Start/stop bookkeeping shared by every server: a root dir, a port, a log, an atexit entry."""

    name = "server"
    start_timeout = 30.0
    stop_timeout = 30.0

    def __init__(self, root: Path, port: int | None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1 the server listens on (kept across restarts)."""
        return self._port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def pid(self) -> int | None:
        """PID of the server's main process (None when not started)."""
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path:
        """The file the server writes its log to; its tail ends every start error."""
        return self.root / f"{self.name}.log"

    # subclasses implement these three
    def _launch(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        return _port_accepts(self.port)

    def _exited_early(self) -> bool:
        return self._process is not None and self._process.poll() is not None

    def start(self) -> None:
        """Start the server and wait until it answers."""
        if self.running:
            return
        self._launch()
        _running.add(self)
        deadline = time.monotonic() + self.start_timeout
        while not self._ready():
            if self._exited_early() or time.monotonic() > deadline:
                why = "exited" if self._exited_early() else f"not up after {self.start_timeout:.0f} s"
                self.kill()
                raise ServerStartError(
                    f"{self.name} on port {self.port} {why}; {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _spawn(
        self, argv: Sequence[str], preexec: Callable[[], None] | None = None, **kwargs: Any
    ) -> None:
        """Run a foreground server in its own session, output appended to the log.

        The child gets SIGKILL when this thread dies (PR_SET_PDEATHSIG): atexit does not run when
        the test process is killed by a signal, and a leftover server would hold its port. So start
        servers from a thread that lives as long as they should (the main thread, in tests).
        """

        def in_child() -> None:
            _die_with_parent()
            if preexec is not None:
                preexec()

        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=in_child,
                **kwargs,
            )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM) and wait until it has exited."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Stop at once (SIGKILL to the whole process tree); used by the atexit net and on errors."""
        if self._process is not None and self._process.poll() is None:
            tree = _descendants(self._process.pid)
            _signal_all(tree, signal.SIGCONT)
            _signal_all(tree, signal.SIGKILL)
            self._process.wait(timeout=self.stop_timeout)
        _running.discard(self)

    def _terminate(self, signum: int) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            _running.discard(self)
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        _running.discard(self)

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} root={self.root}>"


# ---------------------------------------------------------------------------------------------
# IMAP servers: what Dovecot and Cyrus have in common


class _ImapServer(_Server):
    """An IMAP server whose users log in with :attr:`password`; mail goes in with APPEND."""

    _password = "secret"

    @property
    def password(self) -> str:
        return self._password

    def client(self, user: str, *, timeout: float = 30.0) -> imapclient.IMAPClient:
        """A logged-in IMAPClient for ``user``."""
        raise NotImplementedError

    def append(
        self,
        user: str,
        raw: bytes,
        folder: str = "INBOX",
        flags: Sequence[str | bytes] = (),
    ) -> int:
        """APPEND ``raw`` to ``folder`` (created if missing); return the new message's UID."""
        return self.append_many(user, [raw], folder, flags)[0]

    def append_many(
        self,
        user: str,
        messages: Iterable[bytes],
        folder: str = "INBOX",
        flags: Sequence[str | bytes] = (),
    ) -> list[int]:
        """APPEND many messages over one connection (for benchmarks); return their UIDs in order."""
        uids = []
        with self.client(user) as imap:
            if folder.upper() != "INBOX" and not imap.folder_exists(folder):
                imap.create_folder(folder)
            for raw in messages:
                response = imap.append(folder, raw, flags=tuple(flags))
                match = re.search(rb"\[APPENDUID \d+ (\d+)\]", response)
                if match is None:
                    raise RuntimeError(f"APPEND answered without APPENDUID: {response!r}")
                uids.append(int(match.group(1)))
        return uids


# ---------------------------------------------------------------------------------------------
# Dovecot


class Dovecot(_ImapServer):
    """A Dovecot 2.3 IMAP server from a generated config, sized for 10,000 sessions.

    Any username logs in with ``password`` (static passdb); ``users`` only names the accounts
    tests and benchmarks are meant to use, and :meth:`new_user` hands out fresh ones. Mail is
    Maildir under ``root/mail/<user>``, owned by the ``dovecot`` system user. With ``tls=True``
    :attr:`port` serves implicit TLS and :attr:`starttls_port` plain IMAP with STARTTLS; the
    certificate is signed by a throwaway CA in :attr:`ca_file`, or is deliberately bad
    (``tls_cert="self_signed" | "expired" | "wrong_host"``) for refusal tests.
    """

    name = "dovecot"

    def __init__(
        self,
        root: Path,
        *,
        users: int | list[str] = 20,
        password: str = "secret",
        idle: bool = True,
        tls: bool = False,
        tls_cert: TlsCert = "valid",
        port: int | None = None,
        extra_conf: str = "",
        user_prefix: str = "user",
    ) -> None:
        super().__init__(root, port)
        self._dovecot = _find_binary("dovecot", "apt-get install dovecot-imapd")
        self._doveadm = _find_binary("doveadm", "apt-get install dovecot-core")
        self._openssl = _find_binary("openssl", "apt-get install openssl") if tls else ""
        if isinstance(users, int):
            users = [f"{user_prefix}{n}" for n in range(1, users + 1)]
        self._users = list(users)
        self._user_prefix = user_prefix
        self._fresh_users = 0
        self._password = password
        self.idle = idle
        self.tls = tls
        self.tls_cert = tls_cert
        self._starttls_port = free_port() if tls else 0
        self.extra_conf = extra_conf
        self.config_path = self.root / "dovecot.conf"
        self.mail_root = self.root / "mail"
        self.base_dir = self.root / "run"
        if len(str(self.base_dir)) > 48:
            # Dovecot's deepest socket (run/token-login/imap-urlauth) must fit in sun_path (108
            # bytes): a deep pytest tmp_path does not, so the sockets go to a short directory.
            self.base_dir = Path(tempfile.mkdtemp(prefix="dovecot-run-", dir="/tmp"))
            os.chmod(self.base_dir, 0o755)
        self.ca_file: Path | None = None
        self._paused = False

    # -- properties -------------------------------------------------------------------------

    @property
    def users(self) -> list[str]:
        """Usernames prepared for tests and benchmarks (any name logs in, though)."""
        return list(self._users)

    @property
    def starttls_port(self) -> int:
        """Plain-IMAP port offering STARTTLS (only with ``tls=True``; 0 otherwise)."""
        return self._starttls_port

    @property
    def master_pid(self) -> int | None:
        try:
            return int((self.base_dir / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def new_user(self) -> str:
        """A username no other caller of this instance has been given (its mailbox starts empty)."""
        self._fresh_users += 1
        return f"{self._user_prefix}-fresh{self._fresh_users}-{os.getpid()}-{time.monotonic_ns()}"

    # -- lifecycle --------------------------------------------------------------------------

    def _write_config(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("Dovecot test servers need root (the master starts as root)")
        dovecot_user = pwd.getpwnam("dovecot")
        _make_traversable(self.root)
        self.mail_root.mkdir(exist_ok=True)
        os.chown(self.mail_root, dovecot_user.pw_uid, dovecot_user.pw_gid)
        ssl_conf = "ssl = no"
        if self.tls:
            cert, key = self._make_certificates()
            ssl_conf = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"
        client_limit = _client_limit()
        capability = "" if self.idle else f"imap_capability = {_CAPABILITIES_WITHOUT_IDLE}"
        imap_port, imaps_port = (self._starttls_port, self.port) if self.tls else (self.port, 0)
        self.config_path.write_text(
            textwrap.dedent(
                f"""\
                # Generated by devtools.devservers; throwaway test server, not for production.
                base_dir = {self.base_dir}
                state_dir = {self.root / "state"}
                log_path = {self.log_path}
                info_log_path = {self.log_path}
                protocols = imap
                listen = {LOOPBACK}
                shutdown_clients = yes
                disable_plaintext_auth = no
                auth_mechanisms = plain login
                auth_verbose = yes
                verbose_proctitle = yes
                {ssl_conf}
                {capability}
                # The dovecot user (uid {dovecot_user.pw_uid}) owns the mail, below the default 500.
                first_valid_uid = {min(dovecot_user.pw_uid, 100)}
                first_valid_gid = {min(dovecot_user.pw_gid, 100)}
                mail_location = maildir:{self.mail_root}/%u
                # Throwaway data: skip fsync so bulk APPENDs for benchmarks are fast.
                mail_fsync = never
                passdb {{
                  driver = static
                  args = password={self._password}
                }}
                userdb {{
                  driver = static
                  args = uid=dovecot gid=dovecot home={self.mail_root}/%u
                }}
                # Sized for 10,000 concurrent sessions (see docs/architecture.md, "Measured on a 2-core machine").
                default_client_limit = {client_limit}
                default_process_limit = 200
                default_vsz_limit = 1G
                service imap-login {{
                  inet_listener imap {{
                    address = {LOOPBACK}
                    port = {imap_port}
                  }}
                  inet_listener imaps {{
                    address = {LOOPBACK}
                    port = {imaps_port}
                    ssl = yes
                  }}
                  service_count = 0
                  process_min_avail = 2
                  client_limit = 5000
                  process_limit = 8
                  vsz_limit = 1G
                }}
                service imap {{
                  service_count = 0
                  client_limit = 1000
                  process_limit = 64
                  vsz_limit = 2G
                }}
                # Tests log in with wrong passwords on purpose, and Dovecot's per-IP auth penalty
                # would then delay every later login from 127.0.0.1 by up to 15 s. Auth runs
                # unprivileged and cannot open the penalty socket (mode 0), which disables the penalty.
                auth_failure_delay = 0
                service anvil {{
                  client_limit = {client_limit}
                  unix_listener anvil-auth-penalty {{
                    mode = 0
                  }}
                }}
                service auth {{
                  user = $default_internal_user
                  client_limit = {client_limit}
                }}
                protocol imap {{
                  mail_max_userip_connections = 100000
                }}
                """
            )
            + self.extra_conf
            + "\n"
        )

    def _make_certificates(self) -> tuple[Path, Path]:
        """Create a throwaway CA and a server certificate of the requested kind; return (cert, key)."""
        tls_dir = self.root / "tls"
        tls_dir.mkdir(exist_ok=True)
        self.ca_file = _make_certificates(self._openssl, tls_dir, self.tls_cert)
        return tls_dir / "server.crt", tls_dir / "server.key"

    def _launch(self) -> None:
        self._write_config()
        self._paused = False
        self._spawn([self._dovecot, "-F", "-c", str(self.config_path)], preexec=_raise_fd_limit)

    def _ready(self) -> bool:
        return _port_accepts(self.port) and (not self.tls or _port_accepts(self._starttls_port))

    def stop(self) -> None:
        """Stop the master and wait until it and every child (log, stats included) are gone.

        ``doveadm stop`` only SIGTERMs the pid in ``base_dir/master.pid`` and returns before the
        master has exited; here the same signal is sent directly, because doveadm's own stats
        connection keeps Dovecot's stats process alive ~2 s longer. Processes that outlive the
        master (log, stats, imap sessions) are ended too, so a restart starts from nothing.
        """
        if not self.running:
            _running.discard(self)
            return
        self.resume()
        tree = _descendants(self._process.pid)
        self._process.send_signal(signal.SIGTERM)
        _wait_until(lambda: self._process.poll() is not None, 2.0)
        # Two waits would otherwise slow every test: an imap process with a client attached
        # outlives the master by ~10 s before it says "Server shutting down", and a master stopped
        # right after start sleeps ~5 s on an auth process still reading its config. A healthy
        # master is gone within ~1 s; whatever is left gets SIGTERM, then SIGKILL.
        tree = sorted(set(tree) | set(_descendants(self._process.pid)))
        leftovers = [pid for pid in tree if _pid_alive(pid)]
        _signal_all(leftovers, signal.SIGTERM)
        if not _wait_until(lambda: not any(map(_pid_alive, leftovers)), 2.0):
            _signal_all(leftovers, signal.SIGKILL)
        self._terminate(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP every process of this instance: connections stay open but nothing answers."""
        if self._process is not None:
            _signal_all(_descendants(self._process.pid), signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT every process of this instance)."""
        if self._process is not None and self._paused:
            _signal_all(_descendants(self._process.pid), signal.SIGCONT)
        self._paused = False

    # -- observing the server ---------------------------------------------------------------

    def login_count(self, user: str | None = None) -> int:
        """Successful IMAP logins so far (all users, or one), counted from the log."""
        needle = "imap-login: Info: Login: user=<" + (f"{user}>" if user is not None else "")
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count(needle)

    def connected_sessions(self, user: str | None = None) -> int:
        """Logged-in IMAP sessions right now, from ``doveadm who -1`` (one line per connection)."""
        argv = [self._doveadm, "-c", str(self.config_path), "who", "-1"]
        if user is not None:
            argv.append(user)
        output = _run(argv, timeout=30).stdout
        # Header line is "username proto pid ip"; blank output means nobody is connected.
        return sum(1 for line in output.splitlines()[1:] if line.strip())

    # -- mailbox helpers --------------------------------------------------------------------

    def client(self, user: str, *, timeout: float = 30.0) -> imapclient.IMAPClient:
        """A logged-in IMAPClient for ``user`` (implicit TLS verified against :attr:`ca_file`)."""
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.ca_file))
        client = imapclient.IMAPClient(
            LOOPBACK, port=self.port, ssl=self.tls, ssl_context=context, timeout=timeout
        )
        client.login(user, self._password)
        return client

    def expunge(self, user: str, uid: int, folder: str = "INBOX") -> None:
        """Delete and expunge one message by UID (UID EXPUNGE, so nothing else goes)."""
        with self.client(user) as imap:
            imap.select_folder(folder)
            imap.delete_messages([uid])
            imap.uid_expunge([uid])

    def delete_folder(self, user: str, folder: str) -> None:
        """Delete ``folder`` and its mail."""
        with self.client(user) as imap:
            imap.delete_folder(folder)

    def recreate_folder(self, user: str, folder: str) -> int:
        """Delete and create ``folder`` again, so its UIDVALIDITY changes; return the new one.

        INBOX cannot be deleted in IMAP, so for INBOX the Maildir is removed behind Dovecot's back
        (with no session open), which also gives it a new UIDVALIDITY.
        """
        if folder.upper() == "INBOX":
            shutil.rmtree(self.mail_root / user, ignore_errors=True)
        else:
            with self.client(user) as imap:
                if imap.folder_exists(folder):
                    imap.delete_folder(folder)
                imap.create_folder(folder)
        with self.client(user) as imap:
            return int(imap.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"])


def _raise_fd_limit() -> None:
    """Lift the soft descriptor limit to the hard one: 10,000 sessions need far more than 1024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _client_limit() -> int:
    """The largest per-service client limit the master's descriptor limit can back (at most 30,000)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 30_000 if hard == resource.RLIM_INFINITY else min(30_000, hard)


# P-256 keys: generating RSA keys costs about a second each, and every TLS test makes two.
_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _make_certificates(openssl: str, tls_dir: Path, kind: TlsCert) -> Path:
    """Write ca.crt, server.crt and server.key into ``tls_dir``; return the CA file.

    valid: signed by the CA for 127.0.0.1 and localhost. self_signed: right names, not from the CA.
    expired: from the CA, validity ended in 2001. wrong_host: from the CA, for another host name.
    """
    ca_key, ca_crt = tls_dir / "ca.key", tls_dir / "ca.crt"
    key, csr, crt = tls_dir / "server.key", tls_dir / "server.csr", tls_dir / "server.crt"
    quiet: dict[str, Any] = {"cwd": tls_dir, "timeout": 60}
    _run([openssl, "req", "-x509", *_NEW_KEY, "-nodes", "-days", "30", "-subj",
          "/CN=mailingestd throwaway test CA", "-keyout", ca_key, "-out", ca_crt], **quiet)
    san = "DNS:wrong.host.invalid" if kind == "wrong_host" else "IP:127.0.0.1,DNS:localhost"
    cn = "wrong.host.invalid" if kind == "wrong_host" else "localhost"
    if kind == "self_signed":
        _run([openssl, "req", "-x509", *_NEW_KEY, "-nodes", "-days", "30", "-subj",
              f"/CN={cn}", "-addext", f"subjectAltName={san}", "-keyout", key, "-out", crt], **quiet)
        return ca_crt
    _run([openssl, "req", "-new", *_NEW_KEY, "-nodes", "-subj", f"/CN={cn}",
          "-keyout", key, "-out", csr], **quiet)
    if kind == "expired":
        # `openssl x509 -req` cannot back-date in OpenSSL 3.0, `openssl ca` can.
        (tls_dir / "index.txt").write_text("")
        (tls_dir / "ca.cnf").write_text(textwrap.dedent(f"""\
            [ca]
            default_ca = throwaway
            [throwaway]
            database = {tls_dir}/index.txt
            new_certs_dir = {tls_dir}
            rand_serial = yes
            default_md = sha256
            policy = anything
            copy_extensions = none
            x509_extensions = server
            [anything]
            commonName = supplied
            [server]
            subjectAltName = {san}
            """))
        _run([openssl, "ca", "-batch", "-config", tls_dir / "ca.cnf", "-cert", ca_crt,
              "-keyfile", ca_key, "-in", csr, "-out", crt, "-notext",
              "-startdate", "20000101000000Z", "-enddate", "20010101000000Z"], **quiet)
        return ca_crt
    (tls_dir / "san.ext").write_text(f"subjectAltName={san}\n")
    _run([openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
          "-CAcreateserial", "-days", "30", "-sha256", "-extfile", tls_dir / "san.ext",
          "-out", crt], **quiet)
    return ca_crt


# ---------------------------------------------------------------------------------------------
# Cyrus IMAP


_CYRUS_COMMON = "/usr/lib/cyrus/bin"  # Debian's directory of Cyrus binaries


class Cyrus(_ImapServer):
    """A Cyrus IMAP 3.6 server (Debian's ``cyrus-imapd``): IDLE, no NOTIFY; plain IMAP, no TLS.

    Everything lives under ``root`` (the databases and sockets in a short directory when ``root``
    is deep): ``imapd.conf`` and ``cyrus.conf``, the databases (``config/``), the mail
    (``spool/``) and a SASL password database (``sasldb2``, written with ``saslpasswd2`` from
    ``sasl2-bin``), so no system user is needed besides ``cyrus`` (from ``cyrus-common``), which the
    master (started as root) switches to. ``imapd`` and ``idled`` come from ``.venv/cyrus``, where
    ``./dev setup`` unpacks them, else from an installed ``cyrus-imapd``. Every user has
    :attr:`password`; ``cyrus`` is the admin that creates users' mailboxes (:meth:`new_user`).
    The namespace is Cyrus 3's default (altnamespace and unixhierarchysep on): a user's folders
    sit beside INBOX and are named as the user sees them ("Work", separator "/"). ``idled`` runs
    under the master, as in production, so IDLE reports new mail at once (without it Cyrus polls
    every ``imapidlepoll``, 60 s). Each user's sessions are recorded (Cyrus's protocol telemetry,
    one file per session): :meth:`sessions`.
    """

    name = "cyrus"
    admin = "cyrus"

    def __init__(self, root: Path, *, password: str = "secret", port: int | None = None,
                 user_prefix: str = "user") -> None:
        super().__init__(root, port)
        self._master = _find_binary("master", "apt-get install cyrus-common", [_CYRUS_COMMON])
        # cyrus-imapd conflicts with dovecot-imapd (both provide imap-server): ./dev unpacks it
        # into the venv (CYRUS_DIR in ./dev); a system without Dovecot may have it installed.
        unpacked = [str(Path(sys.prefix) / "cyrus" / _CYRUS_COMMON.lstrip("/")), _CYRUS_COMMON]
        hint = "./dev setup (unpacks cyrus-imapd into .venv/cyrus)"
        self._imapd = _find_binary("imapd", hint, unpacked)
        self._idled = _find_binary("idled", hint, unpacked)
        self._saslpasswd = _find_binary("saslpasswd2", "apt-get install sasl2-bin")
        self._password = password
        self._user_prefix = user_prefix
        self._fresh_users = 0
        self.imapd_conf = self.root / "imapd.conf"
        self.cyrus_conf = self.root / "cyrus.conf"
        self.sasldb = self.root / "sasldb2"
        # Unix sockets (idled's in run/, each imapd's config/socket/idle.<pid>) must fit in sun_path
        # (108 bytes): below a deep root, the databases and sockets go to a short directory.
        short = self.root if len(str(self.root)) <= 60 else Path(tempfile.mkdtemp(prefix="cyrus-"))
        self.config_dir = short / "config"
        self.run_dir = short / "run"

    def _owned_by_cyrus(self, *paths: Path) -> None:
        cyrus = pwd.getpwnam("cyrus")
        for path in paths:
            os.chown(path, cyrus.pw_uid, cyrus.pw_gid)

    def _write_config(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("Cyrus test servers need root (the master starts as root)")
        _make_traversable(self.root)
        _make_traversable(self.config_dir.parent)
        # config/socket: each imapd binds its own idle.<pid> there to hear from idled.
        for directory in (self.config_dir, self.config_dir / "log", self.config_dir / "socket",
                          self.root / "spool", self.run_dir):
            directory.mkdir(exist_ok=True)
            self._owned_by_cyrus(directory)
        self.imapd_conf.write_text(textwrap.dedent(f"""\
            # Generated by devtools.devservers; throwaway test server, not for production.
            configdirectory: {self.config_dir}
            defaultpartition: default
            partition-default: {self.root / "spool"}
            proc_path: {self.run_dir / "proc"}
            mboxname_lockpath: {self.run_dir / "lock"}
            idlesocket: {self.run_dir / "idle"}
            notifysocket: {self.run_dir / "notify"}
            lmtpsocket: {self.run_dir / "lmtp"}
            servername: localhost
            admins: {self.admin}
            allowplaintext: yes
            sasl_pwcheck_method: auxprop
            sasl_auxprop_plugin: sasldb
            sasl_sasldb_path: {self.sasldb}
            sasl_mech_list: PLAIN LOGIN
            altnamespace: yes
            unixhierarchysep: yes
            telemetry_bysessionid: yes
            """))
        # The master does not pass its -C on: every command it runs is told the file itself.
        self.cyrus_conf.write_text(textwrap.dedent(f"""\
            START {{
            }}
            SERVICES {{
              imap cmd="{self._imapd} -C {self.imapd_conf}" listen="{LOOPBACK}:{self.port}" prefork=1
            }}
            DAEMON {{
              idled cmd="{self._idled} -C {self.imapd_conf}"
            }}
            """))
        self._set_password(self.admin)

    def _set_password(self, user: str) -> None:
        # The realm is the servername: imapd names no realm of its own for SASL.
        _run([self._saslpasswd, "-f", str(self.sasldb), "-p", "-c", "-u", "localhost", user],
             input=self._password, timeout=30)
        self._owned_by_cyrus(self.sasldb)

    def _launch(self) -> None:
        self._write_config()
        self._spawn([self._master, "-C", str(self.imapd_conf), "-M", str(self.cyrus_conf),
                     "-p", str(self.run_dir / "master.pid")])

    def _ready(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as probe:
                return probe.recv(4096).startswith(b"* OK")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the master; then end whatever it left (imapd sessions, idled) and wait."""
        if self._process is not None and self.running:
            tree = _descendants(self._process.pid)
            self._process.send_signal(signal.SIGTERM)
            _wait_until(lambda: self._process.poll() is not None, 5.0)
            leftovers = [pid for pid in tree if _pid_alive(pid)]
            _signal_all(leftovers, signal.SIGKILL)
            _wait_until(lambda: not any(map(_pid_alive, leftovers)), 5.0)
        self._terminate(signal.SIGKILL)

    # -- users and mail ---------------------------------------------------------------------

    def new_user(self) -> str:
        """A new user with an empty INBOX (``user/<name>``, created by the admin); sessions recorded."""
        self._fresh_users += 1
        user = f"{self._user_prefix}-fresh{self._fresh_users}-{os.getpid()}-{time.monotonic_ns()}"
        self._set_password(user)
        telemetry = self.config_dir / "log" / user
        telemetry.mkdir()
        self._owned_by_cyrus(telemetry)
        with self.client(self.admin) as imap:
            imap.create_folder(f"user/{user}")
        return user

    def client(self, user: str, *, timeout: float = 30.0) -> imapclient.IMAPClient:
        """A logged-in IMAPClient for ``user`` (plain IMAP)."""
        client = imapclient.IMAPClient(LOOPBACK, port=self.port, ssl=False, timeout=timeout)
        client.login(user, self._password)
        return client

    def sessions(self, user: str) -> list[list[tuple[int, str]]]:
        """The commands ``user``'s sessions sent, one list of (unix second, line) per session.

        From Cyrus's telemetry: what the client sent starts ``<SECONDS<``, what the server sent
        ``>SECONDS>``, and each read from the client gets its own mark, so a line the client wrote
        in two pieces has a second mark inside it (removed here).
        """
        found = []
        for path in (self.config_dir / "log" / user).iterdir():
            lines = []
            for raw in path.read_text(errors="replace").splitlines():
                match = re.match(r"<(\d+)<(.*)", raw)
                if match:
                    lines.append((int(match.group(1)), re.sub(r"<\d+<", "", match.group(2))))
            found.append(lines)
        return sorted(found)  # in the order they started (files are named by a random session id)


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _postgres_user() -> pwd.struct_passwd:
    """The ``postgres`` system user, created when missing (initdb refuses to run as root)."""
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        _run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/postgresql",
              "--shell", "/bin/bash", "postgres"])
        return pwd.getpwnam("postgres")


class Postgres(_Server):
    """A PostgreSQL 15 cluster under ``root/data``, run as the ``postgres`` user on 127.0.0.1.

    ``initdb`` on first start, then the postmaster runs in the foreground as our child (rather than
    detached by ``pg_ctl start``) so that it dies with the test process; ``pg_ctl stop -m MODE``
    stops it. Trust authentication on loopback, ``fsync = off`` (throwaway data, fast tests), the
    Unix socket in ``root/run``. ``stop(mode="immediate")`` is a crash as far as the data is
    concerned; the next start runs crash recovery.
    """

    name = "postgres"
    _bin_dirs = ("/usr/lib/postgresql/15/bin",)

    def __init__(self, root: Path, port: int | None = None) -> None:
        super().__init__(root, port)
        package = "apt-get install postgresql-15"
        self._initdb = _find_binary("initdb", package, self._bin_dirs)
        self._pg_ctl = _find_binary("pg_ctl", package, self._bin_dirs)
        self._postgres = _find_binary("postgres", package, self._bin_dirs)
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "run"

    @property
    def url(self) -> str:
        """Connection URL of the ``postgres`` database as the ``postgres`` superuser."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _as_postgres(self) -> dict[str, Any]:
        """Popen arguments that run a command as the postgres user (initdb and pg_ctl refuse root)."""
        user = _postgres_user()
        return {
            "user": user.pw_uid,
            "group": user.pw_gid,
            "extra_groups": [],
            "cwd": self.root,
            "env": {**os.environ, "HOME": str(self.root), "LC_ALL": "C.UTF-8"},
        }

    def _initialise(self) -> None:
        user = _postgres_user()
        _make_traversable(self.root)
        for directory in (self.data_dir, self.socket_dir):
            directory.mkdir(exist_ok=True)
            os.chown(directory, user.pw_uid, user.pw_gid)
        self.data_dir.chmod(0o700)
        _run(
            [self._initdb, "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync"],
            timeout=120,
            **self._as_postgres(),
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                textwrap.dedent(
                    f"""
                    # devtools.devservers: throwaway test cluster. fsync off only risks data on
                    # a machine crash; synchronous_commit stays on so a killed server (stop
                    # mode immediate) keeps every acknowledged commit, as crash tests expect.
                    listen_addresses = '{LOOPBACK}'
                    port = {self.port}
                    unix_socket_directories = '{self.socket_dir}'
                    fsync = off
                    full_page_writes = off
                    max_connections = 300
                    """
                )
            )

    def _launch(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            try:
                self._initialise()
            except RuntimeError as exc:
                raise ServerStartError(f"initdb failed: {exc}") from exc
        self._spawn([self._postgres, "-D", str(self.data_dir)], **self._as_postgres())

    def _ready(self) -> bool:
        # Line 8 of postmaster.pid turns to "ready" once connections are accepted (PostgreSQL 10+).
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """``pg_ctl stop -m mode`` and wait; ``immediate`` skips the shutdown checkpoint (a crash)."""
        if self.running:
            subprocess.run(
                [self._pg_ctl, "-D", str(self.data_dir), "-m", mode, "-w",
                 "-t", str(int(self.stop_timeout)), "stop"],
                capture_output=True,
                timeout=self.stop_timeout + 10,
                **self._as_postgres(),
            )
        self._terminate(signal.SIGQUIT)

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop with ``mode``, then start again on the same port with the same data."""
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; return its URL."""
        import psycopg  # only the PostgreSQL users of this module need the driver
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{urllib.parse.quote(name)}"


# ---------------------------------------------------------------------------------------------
# moto (SQS, S3)


class MotoServer(_Server):
    """``moto_server`` on loopback: SQS (and S3) for boto3 through :attr:`endpoint_url`.

    moto keeps everything in memory, so :meth:`restart` comes back EMPTY: queues and messages are
    gone. Credentials are dummies; :attr:`env` has what a child process needs to reach it.
    """

    name = "moto"
    region = "us-east-1"

    def __init__(self, root: Path, port: int | None = None) -> None:
        super().__init__(root, port)
        beside_python = Path(sys.executable).parent / "moto_server"
        self._moto_server = (
            str(beside_python)
            if beside_python.exists()
            else _find_binary("moto_server", "pip install 'moto[server]'")
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (in any process) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def _launch(self) -> None:
        self._spawn([self._moto_server, "-H", LOOPBACK, "-p", str(self.port)])

    def _ready(self) -> bool:
        try:
            _http_get(f"{self.endpoint_url}/moto-api/data.json", timeout=1)
            return True
        except OSError:
            return False

    def client(self, service: str = "sqs") -> Any:
        """A boto3 client for ``service`` talking to this server."""
        import boto3  # imported lazily: Dovecot-only users of this module need not pay for it

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_queue(self, name: str, fifo: bool = False) -> str:
        """Create an SQS queue (``.fifo`` appended for FIFO when missing); return its URL.

        FIFO queues get no content-based deduplication: senders pass MessageDeduplicationId.
        """
        attributes = {}
        if fifo:
            name = name if name.endswith(".fifo") else f"{name}.fifo"
            attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "false"}
        return self.client("sqs").create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]

    def create_bucket(self, name: str) -> None:
        """Create an S3 bucket."""
        self.client("s3").create_bucket(Bucket=name)


# ---------------------------------------------------------------------------------------------
# Prometheus node_exporter and Prometheus


class NodeExporter(_Server):
    """``prometheus-node-exporter`` with only the textfile collector, reading ``textfile_dir``."""

    name = "node_exporter"

    def __init__(self, textfile_dir: Path, port: int | None = None, root: Path | None = None) -> None:
        self.textfile_dir = Path(textfile_dir)
        self.textfile_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(root or self.textfile_dir.parent / f"node_exporter-{id(self):x}", port)
        self._binary = _find_binary(
            "prometheus-node-exporter", "apt-get install prometheus-node-exporter"
        )

    @property
    def url(self) -> str:
        """The /metrics URL."""
        return f"http://{LOOPBACK}:{self.port}/metrics"

    @property
    def target(self) -> str:
        """host:port, as a Prometheus scrape target."""
        return f"{LOOPBACK}:{self.port}"

    def _launch(self) -> None:
        self._spawn(
            [
                self._binary,
                f"--web.listen-address={self.target}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={self.textfile_dir}",
            ]
        )

    def scrape(self) -> str:
        """GET /metrics and return the exposition text."""
        return _http_get(self.url).decode()


class Prometheus(_Server):
    """A real Prometheus server on loopback scraping ``scrape_targets`` (``host:port`` strings)."""

    name = "prometheus"
    start_timeout = 60.0

    def __init__(
        self,
        root: Path,
        scrape_targets: list[str],
        port: int | None = None,
        scrape_interval: str = "1s",
    ) -> None:
        super().__init__(root, port)
        self._binary = _find_binary("prometheus", "apt-get install prometheus")
        self.scrape_targets = list(scrape_targets)
        self.scrape_interval = scrape_interval

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _launch(self) -> None:
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "targets", "static_configs": [{"targets": self.scrape_targets}]}
            ],
        }
        config_path = self.root / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        self._spawn(
            [
                self._binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
            ]
        )

    def _ready(self) -> bool:
        try:
            _http_get(f"{self.url}/-/ready", timeout=1)
            return True
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; return ``data.result`` (a list of series)."""
        body = json.loads(_http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus query {expr!r} failed: {body}")
        return body["data"]["result"]

    def wait_for_series(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll :meth:`query` until it returns at least one series; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no series for {expr!r} on {self.url} after {timeout:.0f} s")
            time.sleep(0.2)
