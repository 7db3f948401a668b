"""One error type for the IMAP edge, and the one mapping from everything that can go wrong to it.

Invariants:

* Every public function of the edge (``mailingestd.fetch.imap`` and the modules it re-exports)
  lets only :class:`ImapError` out: :func:`raises_imap_error` wraps them, :func:`classify` maps the
  rest. An :class:`ImapError` carries a :class:`FailureKind` (the vocabulary the scheduler shares,
  ``frames.FailureKind``), a ``detail`` of one line of at most ``_DETAIL_MAX`` characters, and
  ``retry_after`` only when the server named a delay.
* A delay a server names is clamped here (``MAX_SUGGESTED_BACKOFF_MS``, one day) before anybody
  computes with it; the planner clamps it again to ``scheduler.backoff_max``.
* :class:`LimitExceeded` (our own limits refused what a server sent) and :class:`ServerClosed`
  (EOF) are raised by the transport and only ever leave the edge as ``PROTOCOL`` and ``NETWORK``.

The text rules are provider replies seen in the field (Gmail, Office 365, Dovecot); first match wins.
"""

from __future__ import annotations

import functools
import imaplib
import re
import socket
import ssl
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from imapclient import exceptions as imapclient_exceptions

from ..frames import (
    FailureKind,  # the one vocabulary of failures, shared with the scheduler
)

__all__ = ["MAX_SUGGESTED_BACKOFF_MS", "FailureKind", "ImapError", "LimitExceeded", "NotifyRefused",
           "ServerClosed", "classify", "raises_imap_error"]

_DETAIL_MAX = 300


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


class LimitExceeded(Exception):
    """The server sent more than our limits allow (raised by the reader, mapped to PROTOCOL)."""


class ServerClosed(ConnectionError):
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
    if isinstance(exc, LimitExceeded):
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
    if isinstance(exc, (imaplib.IMAP4.error, LimitExceeded, ServerClosed)):
        return text  # our own or imaplib's words, already saying what happened
    return f"{exc.__class__.__name__}: {text}"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _DETAIL_MAX:
        text = text[: _DETAIL_MAX - 3] + "..."
    return text


_P = ParamSpec("_P")
_R = TypeVar("_R")


def raises_imap_error(func: Callable[_P, _R]) -> Callable[_P, _R]:
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
