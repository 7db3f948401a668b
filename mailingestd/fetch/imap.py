"""The thin IMAP edge: connect, read folder state, fetch, IDLE, and one error type for all failures.

Everything the ingest path and the workers say to an IMAP server goes through the functions this
module exports, on top of :class:`imapclient.IMAPClient`. It connects and logs in, and re-exports
the rest of the edge, one concern per module:

* :mod:`.transport`: bounded memory and time against hostile servers (limits on lines and
  literals, a deadline on every read, a timeout on every socket operation).
* :mod:`.errors`: one error type, :class:`ImapError` with a :class:`FailureKind` the scheduler acts
  on, and :func:`classify`, the single mapping from socket, TLS, imaplib and imapclient
  exceptions and from provider texts; suggested delays clamped to a day.
* :mod:`.mailbox`: EXAMINE, STATUS, UNSELECT, UID SEARCH and UID FETCH on one folder, read-only.
* :mod:`.idle`: IDLE for a selector loop (never blocking reads, DONE without waiting).
* :mod:`.notify`: NOTIFY (RFC 5465), one connection watching several folders.

A new connection costs as few round trips as the server allows: capabilities come from the
greeting and from LOGIN's reply when the server puts them there (no CAPABILITY command), and
``ENABLE CONDSTORE`` is pipelined with the caller's next command. TLS contexts (the CA store) are
shared by connections with the same settings.

Invariants here: the secret never appears in an error's detail; :func:`logout` and :func:`close`
never raise and are bounded by a timeout. Never two threads on one client: an IMAPClient is not
thread safe, and neither is the edge.
"""

from __future__ import annotations

import os
import ssl
import time
from typing import Protocol

import imapclient

from .errors import (
    MAX_SUGGESTED_BACKOFF_MS,
    FailureKind,
    ImapError,
    NotifyRefused,
    classify,
    raises_imap_error,
)
from .idle import (
    examine_read,
    has_new_mail,
    idle_done_send,
    idle_read,
    idle_start,
    idle_start_read,
    idle_start_send,
    idle_stop,
    idling,
    literal_waiting,
)
from .mailbox import (
    Fetched,
    FolderState,
    examine,
    fetch_messages,
    noop,
    status,
    uids_from,
    unselect,
)
from .notify import notify_none, notify_set, notifying, pushed_folders
from .transport import (
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_LITERAL,
    IDLE_MAX_LINE,
    IDLE_MAX_LITERAL,
    IDLE_READ_BUDGET,
    MIN_LITERAL_RATE,
)
from .transport import (
    BoundedIMAP4 as _BoundedIMAP4,
)
from .transport import (
    Client as _Client,
)
from .transport import (
    bounded as _bounded,
)

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_LITERAL",
    "IDLE_MAX_LINE",
    "IDLE_MAX_LITERAL",
    "IDLE_READ_BUDGET",
    "MAX_SUGGESTED_BACKOFF_MS",
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
    "examine_read",
    "fetch_messages",
    "has_new_mail",
    "idle_done_send",
    "idle_read",
    "idle_start",
    "idle_start_read",
    "idle_start_send",
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


# A verifying context loads the CA store (the system's and tls_ca_file): a noticeable fraction of
# a second of CPU and most of a MiB, which every TLS socket wrapped with it keeps alive. Contexts are
# shared by connections with the same settings and made afresh after _CONTEXT_TTL seconds or when
# the CA file changes, so the next connections use a renewed CA store as they did before.
_CONTEXTS: dict[tuple[str | None, bool, tuple[int, int] | None], tuple[float, ssl.SSLContext]] = {}
_CONTEXT_TTL = 600.0
_CONTEXTS_MAX = 64


def _ssl_context(account: Account) -> ssl.SSLContext:
    cafile = getattr(account, "tls_ca_file", None) or None
    verify = bool(getattr(account, "tls_verify", True))
    try:
        stat = os.stat(cafile) if cafile else None
    except OSError:  # create_default_context reports it, as for any connection
        return ssl.create_default_context(cafile=cafile)
    key = (cafile, verify, (stat.st_mtime_ns, stat.st_size) if stat else None)
    now = time.monotonic()
    cached = _CONTEXTS.get(key)
    if cached is not None and now - cached[0] < _CONTEXT_TTL:
        return cached[1]
    context = ssl.create_default_context(cafile=cafile)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if len(_CONTEXTS) >= _CONTEXTS_MAX:
        _CONTEXTS.clear()
    _CONTEXTS[key] = (now, context)
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
    :func:`examine` reports HIGHESTMODSEQ (sent without waiting: its reply is read, and a refusal
    raised, by the next command). ``timeout`` bounds the connect, the handshake and every
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
            # Pipelined (RFC 3501 5.5): the caller's next command (EXAMINE, STATUS) follows at once
            # and its reading takes ENABLE's reply along; a refusal fails that command instead.
            _bounded(client).send_ahead("ENABLE", "CONDSTORE")
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


@raises_imap_error
def capabilities(client: imapclient.IMAPClient) -> frozenset[str]:
    """The server's capabilities (after login), e.g. ``{"IMAP4REV1", "IDLE", "CONDSTORE"}``."""
    return frozenset(c.decode("ascii", "replace").upper() for c in client.capabilities())


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
