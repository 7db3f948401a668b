"""What every throwaway server shares: free ports, binaries, process groups, the _Server base."""


from __future__ import annotations

import atexit
import ctypes
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import imapclient



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


