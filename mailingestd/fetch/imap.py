"""The thin IMAP edge: connect, read folder state, fetch, IDLE, and one error type for all failures.

Everything the ingest path and the workers say to an IMAP server goes through the functions here,
on top of :class:`imapclient.IMAPClient`. What this module adds to imapclient:

* **Bounded memory and time against hostile servers.** imaplib reads whatever a server announces:
  a line of any length (up to a module-wide 1 MB), a literal of any announced size in one
  allocation, and a slow drip of bytes never trips a per-``recv`` timeout. :class:`_BoundedIMAP4`
  replaces imaplib's reader with its own buffer over the socket: a line longer than ``max_line`` or a
  literal announced larger than ``max_literal`` is refused *before* it is read; a literal is read in
  chunks as it arrives (memory follows the bytes received, not the size announced); a line must
  complete within ``timeout`` seconds and a literal within ``timeout + size / MIN_LITERAL_RATE``.
* **One error type.** Every public function raises :class:`ImapError` with a :class:`FailureKind`
  the scheduler acts on, ``retry_after`` when the server named a delay, and a one-line ``detail``
  that never contains the secret. :func:`classify` is the single mapping from socket, TLS, imaplib
  and imapclient exceptions and from provider texts.
* **IDLE for a selector loop.** :func:`idle_read` never blocks, drains data hidden in the TLS
  object's buffer (``SSLSocket.pending()``), keeps partial lines for the next call (imapclient
  #519), and raises on EOF instead of spinning. :func:`idle_stop` and :func:`logout` are bounded by
  a timeout even on a cut network (imapclient #449). :func:`idle_done_send` ends IDLE without
  waiting, so a loop can renew IDLE or probe thousands of connections without holding a thread per
  silent server: :func:`idle_read` then reports the server's reply (:func:`idling` turns False).

Never two threads on one client: an IMAPClient is not thread safe, and neither is this module.
"""

from __future__ import annotations

import functools
import imaplib
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ParamSpec, Protocol, TypeVar

import imapclient
from imapclient import exceptions as imapclient_exceptions
from imapclient import imap_utf7
from imapclient.response_parser import parse_response

from ..frames import FailureKind  # the one vocabulary of failures, shared with the scheduler

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_LITERAL",
    "MIN_LITERAL_RATE",
    "Account",
    "NotifyRefused",
    "FailureKind",
    "Fetched",
    "FolderState",
    "ImapError",
    "authenticate",
    "capabilities",
    "classify",
    "close",
    "connect",
    "examine",
    "fetch_messages",
    "has_new_mail",
    "idle_done_send",
    "idle_read",
    "idle_start",
    "idle_stop",
    "idling",
    "literal_waiting",
    "logout",
    "noop",
    "notify_none",
    "notify_set",
    "notifying",
    "pushed_folders",
    "status",
    "uids_from",
    "unselect",
]

# A `* SEARCH` reply carries every matching UID on one line: 8 MiB holds about 900,000 UIDs of
# eight digits, enough for the first sync of a very large folder. Anything longer is hostile.
DEFAULT_MAX_LINE = 8 * 1024 * 1024
# Gmail caps messages at 35 MiB (APPENDLIMIT=35651584), Office 365 at 150 MiB but 25-35 MiB in
# practice; 64 MiB fetches any real message and refuses a server announcing gigabytes.
DEFAULT_MAX_LITERAL = 64 * 1024 * 1024
# The slowest transfer we wait for: a literal must arrive within timeout + size / this rate, so a
# server that drips a byte a second cannot hold a worker thread forever.
MIN_LITERAL_RATE = 64 * 1024
# IDLE responses are a few dozen bytes ("* 12 EXISTS"); a worker holds thousands of idling
# connections, so a partial line kept between idle_read calls is capped far below max_line.
IDLE_MAX_LINE = 64 * 1024
# Bytes read from the socket per idle_read call, so one chatty connection cannot starve the others
# in the selector loop. What is left stays in the kernel buffer and keeps the socket readable.
IDLE_READ_BUDGET = 1024 * 1024
# The largest literal an untagged response may carry while IDLE runs (a mailbox name in a NOTIFY
# STATUS, say). Nobody asked for message bodies then: a server announcing more is hostile.
IDLE_MAX_LITERAL = 64 * 1024

_RECV_CHUNK = 256 * 1024
_DETAIL_MAX = 300
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_FETCH_ITEMS = [b"UID", b"RFC822.SIZE", b"INTERNALDATE", b"BODY.PEEK[]"]


class Account(Protocol):
    """What :func:`connect` reads from an account (any object with these attributes; ``tls``,
    ``tls_ca_file`` and ``tls_verify`` may be missing and then default to implicit, None, True)."""

    id: str
    host: str
    port: int
    tls: str  # "implicit" | "starttls" | "none"
    username: str
    tls_ca_file: str | None
    tls_verify: bool


# ---------------------------------------------------------------------------------------------
# errors


class ImapError(Exception):
    """An IMAP operation failed; ``kind`` says how to react, ``detail`` says what happened.

    ``retry_after`` is the delay in seconds the server asked for (Office 365's "Suggested Backoff
    Time"), or None. ``detail`` is one line of at most a few hundred characters, never the secret.
    """

    def __init__(self, kind: FailureKind, detail: str, retry_after: float | None = None) -> None:
        self.kind = kind
        self.detail = _one_line(detail)
        self.retry_after = retry_after
        super().__init__(kind, self.detail, retry_after)

    def __str__(self) -> str:
        after = f" (retry after {self.retry_after:g}s)" if self.retry_after is not None else ""
        return f"{self.kind.value}: {self.detail}{after}"

    def __repr__(self) -> str:
        return f"ImapError({self.kind.value!r}, {self.detail!r}, retry_after={self.retry_after!r})"


class NotifyRefused(ImapError):
    """The server answered ``NOTIFY SET`` with NO or BAD: the session is intact, only NOTIFY is
    not available for this request (the caller falls back to IDLE on one folder)."""


class _LimitExceeded(Exception):
    """The server sent more than our limits allow (raised by the reader, mapped to PROTOCOL)."""


class _ServerClosed(ConnectionError):
    """The server closed the connection (EOF) while we waited for a response."""


# Provider texts, first match wins. Order matters: "NO [UNAVAILABLE] Maximum number of
# connections ..." (Dovecot) is a connection limit, and "NO [ALERT] Too many simultaneous
# connections" (Gmail) answers LOGIN but is not an authentication failure.
_TEXT_RULES: tuple[tuple[re.Pattern[str], FailureKind], ...] = (
    (
        re.compile(
            r"\[THROTTLED\]|\[OVERQUOTA\]|\[LIMIT\]|request is throttled|suggested backoff time"
            r"|too many (simultaneous |concurrent |open )?connections"
            r"|maximum number of connections|authenticated but not connected",
            re.I,
        ),
        FailureKind.THROTTLED,
    ),
    (
        re.compile(
            r"\[UNAVAILABLE\]|\[INUSE\]|\[SERVERBUG\]|server unavailable|shutting down"
            r"|temporary (system )?(error|failure)|try again later",
            re.I,
        ),
        FailureKind.SERVER_BUSY,
    ),
    (
        re.compile(
            r"\[PRIVACYREQUIRED\]|LOGINDISABLED|STARTTLS"
            r"|plaintext authentication (is )?(not allowed|disallowed)",
            re.I,
        ),
        FailureKind.TLS,
    ),
    (
        re.compile(
            r"\[AUTHENTICATIONFAILED\]|\[AUTHORIZATIONFAILED\]|\[EXPIRED\]|invalid credentials"
            r"|(LOGIN|AUTHENTICATE) failed|authentication failed|log ?in via your web browser"
            r"|application-specific password",
            re.I,
        ),
        FailureKind.AUTH,
    ),
    (re.compile(r"\[NONEXISTENT\]|\[NOPERM\]|mailbox doesn't exist|unknown mailbox", re.I),
     FailureKind.MAILBOX),
    (re.compile(r"\bBYE\b"), FailureKind.NETWORK),
)
_BACKOFF_MS = re.compile(r"Suggested Backoff Time:\s*(\d{1,40})\s*milliseconds", re.I)
MAX_SUGGESTED_BACKOFF_MS = 86_400_000


def classify(exc: BaseException) -> ImapError:
    """Map any exception raised while talking IMAP to an :class:`ImapError`.

    Socket and TLS errors map by type; imaplib and imapclient errors by the server text they carry
    (response codes such as ``[THROTTLED]`` or ``[AUTHENTICATIONFAILED]``, and the plain-text
    replies of Gmail, Office 365 and Dovecot); ``retry_after`` comes from Office 365's
    "Suggested Backoff Time: N milliseconds". An :class:`ImapError` is returned unchanged.
    """
    if isinstance(exc, ImapError):
        return exc
    text = _exception_text(exc)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return ImapError(FailureKind.TIMEOUT, text)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return ImapError(FailureKind.NETWORK, text)
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return ImapError(FailureKind.TLS, text)
    if isinstance(exc, OSError):  # refused, reset, EOF, DNS failure, unreachable
        return ImapError(FailureKind.NETWORK, text)
    if isinstance(exc, _LimitExceeded):
        return ImapError(FailureKind.PROTOCOL, text)
    backoff = _BACKOFF_MS.search(text)
    # A server's number: bounded here (one day), and again by scheduler.backoff_max in the planner.
    retry_after = min(int(backoff.group(1)), MAX_SUGGESTED_BACKOFF_MS) / 1000 if backoff else None
    for pattern, kind in _TEXT_RULES:
        if pattern.search(text):
            return ImapError(kind, text, retry_after)
    if isinstance(exc, imapclient_exceptions.LoginError):
        return ImapError(FailureKind.AUTH, text)
    return ImapError(FailureKind.PROTOCOL, text)


def _exception_text(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, (imaplib.IMAP4.error, _LimitExceeded, _ServerClosed)):
        return text  # our own or imaplib's words, already saying what happened
    return f"{exc.__class__.__name__}: {text}"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _DETAIL_MAX:
        text = text[: _DETAIL_MAX - 3] + "..."
    return text


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _raises_imap_error(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Let only :class:`ImapError` out of a public function."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except ImapError:
            raise
        except Exception as exc:
            raise classify(exc) from exc

    return wrapper


# ---------------------------------------------------------------------------------------------
# the bounded reader under imaplib


class _BoundedIMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 reading through its own buffer, with size limits and deadlines.

    imaplib calls only ``readline()`` and ``read(size)`` to receive, so replacing those two bounds
    every response; ``send()`` gets the write timeout. The TLS socket (implicit or after STARTTLS)
    is ``self.sock``; ``SSLSocket.recv`` returns decrypted bytes, including any the TLS object has
    already buffered.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        max_line: int,
        max_literal: int,
    ) -> None:
        self._implicit_tls = ssl_context
        self.io_timeout = timeout
        self.max_line = max_line
        self.max_literal = max_literal
        self._rbuf = bytearray()
        self._scanned = 0  # bytes at the start of _rbuf known to hold no LF
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        if self._implicit_tls is None:
            return sock
        try:  # the handshake runs under the connect timeout set above
            return self._implicit_tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def _connect(self) -> None:
        try:
            super()._connect()
        except self.abort as exc:  # not a greeting at all
            raise self.error(f"garbage instead of a greeting: {exc}") from None
        except self.error as exc:  # a well-formed refusal, usually "* BYE ..."
            raise self.error(f"server refused the session at greeting: {exc}") from None

    def _check_bye(self) -> None:
        bye = self.untagged_responses.get("BYE")
        if bye:
            text = bye[-1].decode("utf-8", "replace")
            raise self.abort(f"server said BYE: {text}")

    def starttls(self, ssl_context: ssl.SSLContext | None = None) -> tuple[str, list[Any]]:
        if ssl_context is None:
            raise self.error("STARTTLS needs an explicit SSL context")
        if self._tls_established:
            raise self.abort("TLS session already established")
        if "STARTTLS" not in self.capabilities:
            raise self.abort("server does not offer STARTTLS")
        typ, dat = self._simple_command("STARTTLS")
        if typ != "OK":
            raise self.error(f"STARTTLS refused: {dat!r}")
        if self._rbuf:
            # Bytes after the OK arrived in plaintext: a man in the middle injecting responses
            # into the TLS session (CVE-2011-0411 style). Never treat them as server output.
            raise self.abort("plaintext data after the STARTTLS reply (response injection)")
        # Only self.sock is replaced: reads go through _rbuf, never through imaplib's file
        # object, which is a read-only property from Python 3.14 (imapclient #618) and which
        # imaplib's shutdown() closes by itself.
        self.sock = ssl_context.wrap_socket(self.sock, server_hostname=self.host)
        self._tls_established = True
        self._get_capabilities()
        return self._untagged_response(typ, dat, "STARTTLS")

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.io_timeout)
        self.sock.sendall(data)

    def readline(self) -> bytes:
        deadline = time.monotonic() + self.io_timeout
        while True:
            line = self._take_line(self.max_line)
            if line is not None:
                return line
            self._recv_into_buffer(deadline)

    def read(self, size: int) -> bytes:
        if size > self.max_literal:
            raise _LimitExceeded(
                f"server announced a literal of {size} bytes, limit is {self.max_literal} "
                "(max_literal)"
            )
        deadline = time.monotonic() + self.io_timeout + size / MIN_LITERAL_RATE
        parts = [bytes(self._rbuf[:size])]
        del self._rbuf[:size]
        self._scanned = 0
        have = len(parts[0])
        while have < size:
            chunk = self._recv(min(size - have, _RECV_CHUNK), deadline, started=have > 0)
            if not chunk:
                raise _ServerClosed(f"server closed the connection {size - have} bytes into a literal")
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def _take_line(self, limit: int) -> bytes | None:
        """Pop one complete line (with its CRLF) from the buffer, or None when there is none."""
        newline = self._rbuf.find(b"\n", self._scanned)
        if newline < 0:
            self._scanned = len(self._rbuf)
            if self._scanned > limit:
                raise _LimitExceeded(
                    f"server sent a line longer than {limit} bytes without an end (max_line)"
                )
            return None
        if newline + 1 > limit:
            raise _LimitExceeded(f"server sent a line of {newline + 1} bytes, limit is {limit}")
        line = bytes(self._rbuf[: newline + 1])
        del self._rbuf[: newline + 1]
        self._scanned = 0
        return line

    def _recv(self, size: int, deadline: float, started: bool) -> bytes:
        """One recv, bounded by io_timeout of silence and by the response's deadline.

        ``started``: part of the response has arrived, so a timeout at the deadline means a slow
        drip rather than silence (only the error's wording differs).
        """
        too_slow = "server too slow: response still incomplete at its deadline"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(too_slow)
        self.sock.settimeout(min(remaining, self.io_timeout))
        try:
            return self.sock.recv(size)
        except TimeoutError:
            if started and remaining < self.io_timeout:
                raise TimeoutError(too_slow) from None
            raise TimeoutError(f"server silent for {self.io_timeout:g}s") from None

    def _recv_into_buffer(self, deadline: float) -> None:
        chunk = self._recv(65536, deadline, started=bool(self._rbuf))
        if not chunk:
            raise _ServerClosed("server closed the connection")
        self._rbuf += chunk

    def recv_available(self, budget: int) -> bool:
        """Move what the socket (and the TLS object) holds into the buffer without blocking.

        Returns True when the server has closed the connection (what came before stays buffered,
        so a final BYE can still be read).
        """
        self.sock.setblocking(False)
        try:
            received = 0
            while received < budget:
                try:
                    chunk = self.sock.recv(65536)
                except _WOULD_BLOCK:
                    return False
                if not chunk:
                    return True
                self._rbuf += chunk
                received += len(chunk)
                if self._rbuf.find(b"\n", self._scanned) < 0 and len(self._rbuf) > IDLE_MAX_LINE:
                    raise _LimitExceeded(f"server sent an IDLE line longer than {IDLE_MAX_LINE} bytes")
            # Budget spent: still empty the TLS object, whose bytes the selector cannot see.
            pending = getattr(self.sock, "pending", None)
            while pending is not None and pending() > 0:
                self._rbuf += self.sock.recv(pending())
            return False
        finally:
            self.sock.settimeout(self.io_timeout)

    def take_buffered_line(self) -> bytes | None:
        line = self._take_line(min(self.max_line, IDLE_MAX_LINE))
        return line[:-2] if line is not None and line.endswith(b"\r\n") else line

    def put_back_line(self, line: bytes) -> None:
        """Undo :meth:`take_buffered_line`: the line is read again, first, by the next reader."""
        self._rbuf[:0] = line + b"\r\n"
        self._scanned = 0


class _Client(imapclient.IMAPClient):
    """IMAPClient on top of :class:`_BoundedIMAP4`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        max_line: int,
        max_literal: int,
    ) -> None:
        self._limits = {"timeout": timeout, "max_line": max_line, "max_literal": max_literal}
        self._implicit_tls = ssl_context
        super().__init__(host, port, ssl=ssl_context is not None, ssl_context=ssl_context,
                         timeout=timeout)
        # imapclient turns on imaplib's debug output (every line formatted for the log even when
        # the logger is off, and a command history dumped on errors); the edge logs its own events.
        self._imap.debug = 0
        self.normalise_times = False  # keep INTERNALDATE's time zone
        self.idle_tag: bytes | None = None
        self.idle_done_sent = False

    def _create_IMAP4(self) -> _BoundedIMAP4:
        return _BoundedIMAP4(self.host, self.port, ssl_context=self._implicit_tls, **self._limits)


def _bounded(client: imapclient.IMAPClient) -> _BoundedIMAP4:
    imap = client._imap
    if not isinstance(imap, _BoundedIMAP4):
        raise TypeError("use a client made by mailingestd.fetch.imap.connect()")
    return imap


# ---------------------------------------------------------------------------------------------
# connecting


def _ssl_context(account: Account) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=getattr(account, "tls_ca_file", None) or None)
    if not getattr(account, "tls_verify", True):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def connect(
    account: Account,
    secret: str,
    *,
    timeout: float = 30.0,
    max_line: int = DEFAULT_MAX_LINE,
    max_literal: int = DEFAULT_MAX_LITERAL,
) -> imapclient.IMAPClient:
    """Open a connection to ``account.host:account.port``, secure it, and log in.

    ``account.tls``: ``"implicit"`` (default) wraps the socket in TLS before the greeting,
    ``"starttls"`` sends STARTTLS after it, ``"none"`` stays in plaintext. Certificates and the
    host name are verified (system CAs plus ``account.tls_ca_file``) unless ``account.tls_verify``
    is false. Then :func:`authenticate`, and ``ENABLE CONDSTORE`` when the server offers both, so
    :func:`examine` reports HIGHESTMODSEQ. ``timeout`` bounds the connect, the handshake and every
    later read and write; ``max_line`` and ``max_literal`` bound memory (see the module doc).

    Returns the logged-in client. Raises :class:`ImapError`; its detail never holds ``secret``.
    """
    tls = getattr(account, "tls", "implicit") or "implicit"
    if tls not in ("implicit", "starttls", "none"):
        raise ImapError(FailureKind.TLS, f"unknown tls mode {tls!r} for account {account.id}")
    client: _Client | None = None
    try:
        context = _ssl_context(account) if tls != "none" else None
        client = _Client(
            account.host,
            account.port,
            ssl_context=context if tls == "implicit" else None,
            timeout=timeout,
            max_line=max_line,
            max_literal=max_literal,
        )
        if tls == "starttls":
            if not client.has_capability("STARTTLS"):
                raise ImapError(FailureKind.TLS, "server does not offer STARTTLS")
            client.starttls(context)
        authenticate(client, account, secret)
        client.socket().settimeout(timeout)
        if client.has_capability("CONDSTORE") and client.has_capability("ENABLE"):
            client.enable("CONDSTORE")
        return client
    except BaseException as exc:
        if client is not None:
            _close_quietly(client)
        if not isinstance(exc, Exception):
            raise
        error = classify(exc)
        if secret and secret in error.detail:
            error = ImapError(error.kind, error.detail.replace(secret, "***"), error.retry_after)
        raise error from None  # the original may quote what the server echoed of the secret


def authenticate(client: imapclient.IMAPClient, account: Account, secret: str) -> None:
    """Log in as ``account.username`` with the password ``secret``.

    Sends ``LOGIN``, or ``AUTHENTICATE PLAIN`` when the server advertises LOGINDISABLED or the
    credentials are not ASCII (LOGIN cannot carry them). An account with ``auth == "oauth2"``
    sends OAUTHBEARER or XOAUTH2 with ``secret`` as the access token. Raises :class:`ImapError`
    (``AUTH`` for refused credentials).
    """
    auth = getattr(account, "auth", "password") or "password"
    if auth == "oauth2":
        # SASL OAUTHBEARER (RFC 7628) when offered, else Google/Microsoft's XOAUTH2; the secret
        # is the access token.
        if client.has_capability("AUTH=OAUTHBEARER"):
            client.oauthbearer_login(account.username, secret)
            client.login_mechanism = "OAUTHBEARER"
        elif client.has_capability("AUTH=XOAUTH2"):
            client.oauth2_login(account.username, secret)
            client.login_mechanism = "XOAUTH2"
        else:
            raise ImapError(FailureKind.AUTH, "server offers neither AUTH=OAUTHBEARER nor AUTH=XOAUTH2")
        return
    if auth != "password":
        raise ImapError(FailureKind.AUTH, f"auth method {auth!r} is not supported")
    ascii_only = account.username.isascii() and secret.isascii()
    if client.has_capability("LOGINDISABLED") and not isinstance(_bounded(client).sock, ssl.SSLSocket):
        # The server refuses LOGIN here because the connection is in clear (RFC 3501 6.2.3):
        # AUTHENTICATE PLAIN would send the same password just as readable.
        raise ImapError(FailureKind.TLS, "server disabled LOGIN on this plaintext connection; not sending the "
                                         "password in clear with AUTHENTICATE PLAIN either (use tls = starttls)")
    if client.has_capability("LOGINDISABLED") or not ascii_only:
        if not client.has_capability("AUTH=PLAIN"):
            raise ImapError(
                FailureKind.TLS if ascii_only else FailureKind.AUTH,
                "server disabled LOGIN and offers no AUTH=PLAIN"
                if ascii_only
                else "non-ASCII credentials need AUTH=PLAIN, which the server does not offer",
            )
        client.plain_login(account.username, secret)
        client.login_mechanism = "AUTHENTICATE PLAIN"
    else:
        client.login(account.username, secret)
        client.login_mechanism = "LOGIN"


@_raises_imap_error
def capabilities(client: imapclient.IMAPClient) -> frozenset[str]:
    """The server's capabilities (after login), e.g. ``{"IMAP4REV1", "IDLE", "CONDSTORE"}``."""
    return frozenset(c.decode("ascii", "replace").upper() for c in client.capabilities())


# ---------------------------------------------------------------------------------------------
# folder state and fetching


@dataclass(frozen=True, slots=True)
class FolderState:
    """What the server says about a folder. ``uidnext`` is a hint, never a promise (rule 3);
    ``highestmodseq`` is None without CONDSTORE; ``uidnext`` is None if the server omitted it."""

    uidvalidity: int
    uidnext: int | None
    exists: int
    highestmodseq: int | None = None


@dataclass(frozen=True, slots=True)
class Fetched:
    """One fetched message: ``raw`` is the RFC 5322 bytes exactly as the server sent them,
    ``size`` the server's RFC822.SIZE, ``internaldate`` time-zone aware (None if missing)."""

    uid: int
    raw: bytes
    size: int
    internaldate: datetime | None


def _folder_state(response: dict[bytes, Any], command: str) -> FolderState:
    if b"UIDVALIDITY" not in response:
        raise ImapError(FailureKind.PROTOCOL, f"{command} reply has no UIDVALIDITY")
    modseq = response.get(b"HIGHESTMODSEQ")
    return FolderState(
        uidvalidity=int(response[b"UIDVALIDITY"]),
        uidnext=int(response[b"UIDNEXT"]) if b"UIDNEXT" in response else None,
        exists=int(response.get(b"EXISTS", response.get(b"MESSAGES", 0))),
        highestmodseq=int(modseq) if modseq is not None else None,
    )


@_raises_imap_error
def examine(client: imapclient.IMAPClient, folder: str) -> FolderState:
    """Select ``folder`` read-only (``EXAMINE``) and return its state.

    Read-only so that nothing we do can change the mailbox (rule 4). HIGHESTMODSEQ is present when
    :func:`connect` enabled CONDSTORE. A missing folder raises ``ImapError(MAILBOX)``.
    """
    return _folder_state(client.select_folder(folder, readonly=True), "EXAMINE")


@_raises_imap_error
def status(client: imapclient.IMAPClient, folder: str) -> FolderState:
    """``STATUS folder (UIDVALIDITY UIDNEXT MESSAGES [HIGHESTMODSEQ])`` without selecting it."""
    items = ["UIDVALIDITY", "UIDNEXT", "MESSAGES"]
    if client.has_capability("CONDSTORE"):
        items.append("HIGHESTMODSEQ")
    return _folder_state(client.folder_status(folder, items), "STATUS")


@_raises_imap_error
def unselect(client: imapclient.IMAPClient) -> None:
    """Leave the selected folder, if any: ``UNSELECT`` (RFC 3691), or ``CLOSE`` without it.

    Dovecot answers STATUS on the selected folder from the session's own view, which only NOOP or
    a new selection refreshes: a poll that keeps INBOX selected would never see new mail by
    STATUS. Both commands leave a folder selected read-only (EXAMINE) untouched.
    """
    if _bounded(client).state != "SELECTED":
        return
    if client.has_capability("UNSELECT"):
        client.unselect_folder()
    else:
        client.close_folder()


@_raises_imap_error
def uids_from(client: imapclient.IMAPClient, first_uid: int) -> list[int]:
    """UIDs >= ``first_uid`` in the selected folder, ascending: ``UID SEARCH UID first:*``.

    ``first:*`` also matches the highest existing UID when nothing is newer (rule 3), so UIDs
    below ``first_uid`` are dropped here.
    """
    found = client.search(["UID", f"{first_uid}:*"])
    return sorted(uid for uid in found if uid >= first_uid)


@_raises_imap_error
def fetch_messages(client: imapclient.IMAPClient, uids: list[int]) -> dict[int, Fetched]:
    """``UID FETCH <uids> (UID RFC822.SIZE INTERNALDATE BODY.PEEK[])`` in the selected folder.

    ``BODY.PEEK[]`` does not set \\Seen (rule 4). Returns the messages by UID; a UID missing from
    the result was expunged (or the server answered OK without it) and is the caller's to retry or
    settle. Memory: each message is held once as bytes, up to ``max_literal`` each.
    """
    if not uids:
        return {}
    response = client.fetch(uids, _FETCH_ITEMS)
    fetched: dict[int, Fetched] = {}
    for uid, items in response.items():
        raw = items.get(b"BODY[]")
        if raw is None:  # an unsolicited FETCH (flags) for a message we did not get
            continue
        fetched[uid] = Fetched(
            uid=uid,
            raw=bytes(raw),
            size=int(items.get(b"RFC822.SIZE", len(raw))),
            internaldate=items.get(b"INTERNALDATE"),
        )
    return fetched


@_raises_imap_error
def noop(client: imapclient.IMAPClient) -> list[tuple[Any, ...]]:
    """``NOOP``: keeps the session alive and returns the untagged updates the server had queued,
    parsed as by imapclient, e.g. ``[(4, b'EXISTS')]``."""
    _text, responses = client.noop()
    return responses


# ---------------------------------------------------------------------------------------------
# NOTIFY (RFC 5465): one connection watches several folders

imaplib.Commands.setdefault("NOTIFY", ("AUTH", "SELECTED"))
# New mail and expunges must be asked for together (RFC 5465 section 5.2); MailboxName reports a
# configured folder that was created or renamed into place.
_NOTIFY_EVENTS = b"(MessageNew MessageExpunge MailboxName)"


def _folder_name(name: Any) -> str:
    """A mailbox name as imapclient parsed it (bytes in modified UTF-7, or an int for "2024")."""
    if isinstance(name, int):
        return str(name)
    if isinstance(name, bytes):
        return imap_utf7.decode(name)
    return str(name)


@_raises_imap_error
def notify_set(client: imapclient.IMAPClient, folders: list[str]) -> dict[str, FolderState]:
    """``NOTIFY SET STATUS (MAILBOXES (<folders>) (MessageNew MessageExpunge MailboxName))``.

    From now on the server reports new mail in any of ``folders`` as untagged ``* STATUS folder
    (MESSAGES n UIDNEXT m)`` responses, during IDLE too (:func:`pushed_folders` reads them).
    Call it with no folder selected: a selected folder is outside a MAILBOXES specification
    and its news would not be reported. ``STATUS`` makes the server report every folder's state
    at once, returned here by folder name, so mail that arrived before the command is not
    missed. Names nothing but ``folders``: no other folder is touched.
    """
    imap = _bounded(client)
    names = b" ".join(client._normalise_folder(folder) for folder in folders)
    try:
        typ, data = imap._simple_command("NOTIFY", b"SET STATUS (MAILBOXES (" + names + b") " + _NOTIFY_EVENTS + b")")
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error as exc:  # a tagged BAD: the session goes on
        raise NotifyRefused(FailureKind.PROTOCOL, f"NOTIFY SET refused: {exc}") from None
    if typ != "OK":  # a tagged NO
        raise NotifyRefused(FailureKind.PROTOCOL, f"NOTIFY SET refused: {data!r}")
    client.notify_active = True
    _, lines = imap._untagged_response(typ, data, "STATUS")
    states: dict[str, FolderState] = {}
    for line in lines:
        if line is None:
            continue
        parsed = parse_response([line])
        if len(parsed) >= 2 and isinstance(parsed[-1], tuple):
            items = dict(zip(parsed[-1][::2], parsed[-1][1::2]))
            if b"UIDVALIDITY" in items:
                states[_folder_name(parsed[0])] = _folder_state(items, "NOTIFY STATUS")
    return states


@_raises_imap_error
def notify_none(client: imapclient.IMAPClient) -> None:
    """``NOTIFY NONE``: no more unsolicited STATUS responses, so the replies to the commands that
    follow (STATUS of one folder in particular) cannot mix with notifications about others."""
    imap = _bounded(client)
    typ, data = imap._simple_command("NOTIFY", "NONE")
    if typ != "OK":
        raise imaplib.IMAP4.error(f"NOTIFY NONE refused: {data!r}")
    client.notify_active = False


def notifying(client: imapclient.IMAPClient) -> bool:
    """True after :func:`notify_set` until :func:`notify_none` on this connection."""
    return getattr(client, "notify_active", False)


def pushed_folders(responses: list[tuple[Any, ...]]) -> dict[str, int | None]:
    """The folders a NOTIFY-ing server reported news for, with the UIDNEXT it announced.

    ``* STATUS Work (MESSAGES 3 UIDNEXT 7)`` gives ``{"Work": 7}``; a ``* LIST`` (a folder created
    or renamed) gives the folder with None. An expunge also comes as a STATUS: the caller compares
    UIDNEXT with what it knows before fetching.
    """
    folders: dict[str, int | None] = {}
    for response in responses:
        if len(response) >= 3 and response[0] == b"STATUS" and isinstance(response[2], tuple):
            items = dict(zip(response[2][::2], response[2][1::2]))
            uidnext = items.get(b"UIDNEXT")
            folders[_folder_name(response[1])] = int(uidnext) if isinstance(uidnext, int) else None
        elif len(response) >= 4 and response[0] == b"LIST":
            folders[_folder_name(response[3])] = None
    return folders


# ---------------------------------------------------------------------------------------------
# IDLE for a selector loop


@_raises_imap_error
def idle_start(client: imapclient.IMAPClient) -> list[tuple[Any, ...]]:
    """Send ``IDLE`` and wait (bounded by the timeout) for the server's ``+`` continuation.

    Returns untagged responses that arrived before the continuation (usually none: check them
    with :func:`has_new_mail`). Afterwards register ``client.socket()`` for reading and call
    :func:`idle_read` when it is readable, and once right away.
    """
    if not client.has_capability("IDLE"):
        raise ImapError(FailureKind.PROTOCOL, "server does not offer IDLE")
    imap = _bounded(client)
    tag = imap._command("IDLE")
    early: list[tuple[Any, ...]] = []
    while True:
        line = imap._get_line()
        if line.startswith(b"+"):
            client.idle_tag = tag
            client.idle_done_sent = False
            client._idle_tag = tag  # imapclient's own idle_done() keeps working
            return early
        if line.startswith(tag + b" "):
            imap.tagged_commands.pop(tag, None)
            raise imaplib.IMAP4.error(f"IDLE refused: {line.decode('utf-8', 'replace')}")
        early.append(_parse_untagged(imap, line))


def _parse_untagged(imap: _BoundedIMAP4, line: bytes) -> tuple[Any, ...]:
    """Parse one untagged response (reading any literal it announces, within the limits)."""
    if not line.startswith(b"* "):
        raise imaplib.IMAP4.abort(f"unexpected response: {line[:100]!r}")
    body = line[2:]
    parts: list[Any] = []
    literal = imap.Literal.match(body)
    while literal:
        data = imap.read(int(literal.group("size")))
        parts.append((body, data))
        body = imap._get_line()
        literal = imap.Literal.match(body)
    parts.append(body)
    if len(parts) == 1:
        word, _, rest = body.partition(b" ")
        if word.upper() in (b"OK", b"NO", b"BAD", b"BYE"):
            return (word.upper(), rest)
    return tuple(parse_response(parts))


@_raises_imap_error
def idle_read(client: imapclient.IMAPClient) -> list[tuple[Any, ...]]:
    """Collect what an idling server has sent, without blocking.

    Reads what the socket and the TLS object already hold (at most ``IDLE_READ_BUDGET`` bytes;
    the rest keeps the socket readable) and returns the complete untagged responses, parsed as by
    imapclient's ``idle_check``, e.g. ``[(3, b'EXISTS'), (b'OK', b'Still here')]``. A partial line
    stays buffered for the next call. A response announcing a literal is not read here (that could
    block for as long as the server drips it): it stays buffered, :func:`literal_waiting` turns
    True, and :func:`idle_stop` in a job reads it within ``IDLE_MAX_LITERAL`` and its deadline. After :func:`idle_done_send`, the server's completion of IDLE ends
    the read: what follows stays buffered and :func:`idling` is False. Raises :class:`ImapError` when
    the server closed the connection, said BYE, or ended the IDLE command unasked.
    """
    imap = _bounded(client)
    if literal_waiting(client):
        return []  # a job must read it (idle_stop): nothing here may block on it
    closed = imap.recv_available(IDLE_READ_BUDGET)
    responses: list[tuple[Any, ...]] = []
    while (line := imap.take_buffered_line()) is not None:
        if imap.Literal.match(line):
            # Reading a literal may take as long as the server wants: left for a job, which
            # reads it within a byte budget and a deadline (idle_stop), never in a selector loop.
            imap.put_back_line(line)
            client.idle_literal_waiting = True
            return responses
        if client.idle_tag is not None and line.startswith(client.idle_tag + b" "):
            asked, tag = client.idle_done_sent, client.idle_tag
            client.idle_tag = client._idle_tag = None
            client.idle_done_sent = False
            imap.tagged_commands.pop(tag, None)
            if asked and line[len(tag) + 1:].split(b" ", 1)[0] == b"OK":
                return responses
            raise imaplib.IMAP4.abort(f"server ended IDLE: {line.decode('utf-8', 'replace')}")
        response = _parse_untagged(imap, line)
        if response[0] == b"BYE":
            raise imaplib.IMAP4.abort(f"server said BYE: {response[1].decode('utf-8', 'replace')}")
        responses.append(response)
    if closed:
        raise _ServerClosed("server closed the connection during IDLE")
    return responses


def literal_waiting(client: imapclient.IMAPClient) -> bool:
    """True when :func:`idle_read` met a response carrying a literal and left it unread: hand the
    connection to a job, whose :func:`idle_stop` reads it (bounded) and ends IDLE."""
    return getattr(client, "idle_literal_waiting", False)


def has_new_mail(responses: list[tuple[Any, ...]]) -> bool:
    """True if any response is ``n EXISTS``, ``n RECENT`` or ``n FETCH``: time to fetch."""
    return any(
        len(response) >= 2 and isinstance(response[0], int)
        and response[1] in (b"EXISTS", b"RECENT", b"FETCH")
        for response in responses
    )


def idling(client: imapclient.IMAPClient) -> bool:
    """True while the IDLE command is in progress (started, and its completion not yet read)."""
    return getattr(client, "idle_tag", None) is not None


@_raises_imap_error
def idle_done_send(client: imapclient.IMAPClient) -> None:
    """Send ``DONE`` without waiting for the server's reply (a few bytes on a quiet socket).

    For a selector loop renewing IDLE or probing a silent connection: keep the socket registered,
    and when :func:`idle_read` returns with :func:`idling` False the server has answered (it is
    alive); no answer within the loop's own deadline means a dead connection. :func:`idle_stop`
    may still be called afterwards: it only waits for the reply.
    """
    if client.idle_tag is None or client.idle_done_sent:
        return
    _bounded(client).send(b"DONE\r\n")
    client.idle_done_sent = True


@_raises_imap_error
def idle_stop(client: imapclient.IMAPClient, timeout: float) -> list[tuple[Any, ...]]:
    """Send ``DONE`` (unless :func:`idle_done_send` did) and read until the IDLE command
    completes, within ``timeout`` seconds.

    Returns the untagged responses that arrived meanwhile (check them with :func:`has_new_mail`).
    On a cut network this raises ``ImapError(TIMEOUT)`` after ``timeout`` instead of hanging
    (imapclient #449); the connection is then unusable.
    """
    imap = _bounded(client)
    tag = client.idle_tag
    if tag is None:
        return []
    saved_timeout, imap.io_timeout = imap.io_timeout, timeout
    saved_literal, imap.max_literal = imap.max_literal, min(imap.max_literal, IDLE_MAX_LITERAL)
    client.idle_literal_waiting = False
    try:
        if not client.idle_done_sent:
            imap.send(b"DONE\r\n")
            client.idle_done_sent = True
        responses: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = imap._get_line()
            if line.startswith(tag + b" "):
                imap.tagged_commands.pop(tag, None)
                client.idle_tag = client._idle_tag = None
                client.idle_done_sent = False
                word = line[len(tag) + 1:].split(b" ", 1)[0]
                if word != b"OK":
                    raise imaplib.IMAP4.error(f"IDLE ended with {line.decode('utf-8', 'replace')}")
                return responses
            responses.append(_parse_untagged(imap, line))
        raise TimeoutError(f"IDLE did not end within {timeout:g}s of DONE")
    finally:
        imap.io_timeout = saved_timeout
        imap.max_literal = saved_literal


def logout(client: imapclient.IMAPClient, timeout: float = 5.0) -> None:
    """End the session politely (``DONE`` if idling, then ``LOGOUT``) and close the socket.

    Bounded by ``timeout`` per step; never raises: a server that does not answer is simply cut.
    """
    imap = client._imap
    if isinstance(imap, _BoundedIMAP4):
        imap.io_timeout = timeout
    try:
        if getattr(client, "idle_tag", None) is not None:
            idle_stop(client, timeout)
        client.socket().settimeout(timeout)
        client.logout()
    except Exception:
        _close_quietly(client)


def close(client: imapclient.IMAPClient) -> None:
    """Cut the connection without a word: after a timeout or a broken stream, a polite LOGOUT
    would only wait for a server that is not listening. Never raises."""
    _close_quietly(client)


def _close_quietly(client: imapclient.IMAPClient) -> None:
    try:
        client.shutdown()
    except Exception:
        pass
