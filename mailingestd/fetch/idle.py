"""IDLE for a selector loop: thousands of idling connections on one thread, none blocking it.

Invariants:

* :func:`idle_read` never blocks: it reads what the socket and the TLS object hold (at most
  ``IDLE_READ_BUDGET`` bytes a call, data hidden in ``SSLSocket.pending()`` included), keeps
  partial lines for the next call (imapclient #519), leaves a response announcing a literal unread
  for a job (:func:`literal_waiting`), and raises on EOF, BYE or an IDLE ended unasked instead of
  spinning.
* :func:`idle_stop` and :func:`idle_start` are bounded by a timeout even on a cut network
  (imapclient #449); while IDLE runs no literal over ``IDLE_MAX_LITERAL`` is read.
* :func:`idle_done_send` ends IDLE without waiting, so a loop can renew IDLE or probe a silent
  connection without holding a thread: :func:`idle_read` then reports the server's reply
  (:func:`idling` turns False).
* ``client.idle_tag`` is the running IDLE command's tag, None otherwise; imapclient's own
  ``_idle_tag`` follows it so its ``idle_done()`` keeps working.
"""

from __future__ import annotations

import imaplib
import re
import time
from typing import Any

import imapclient
from imapclient.response_parser import parse_response

from .errors import FailureKind, ImapError, ServerClosed, raises_imap_error
from .mailbox import FolderState
from .transport import IDLE_MAX_LITERAL, IDLE_READ_BUDGET, BoundedIMAP4, bounded

__all__ = ["examine_read", "has_new_mail", "idle_done_send", "idle_read", "idle_start",
           "idle_start_read", "idle_start_send", "idle_stop", "idling", "literal_waiting", "parse_untagged"]


@raises_imap_error
def idle_start(client: imapclient.IMAPClient) -> list[tuple[Any, ...]]:
    """Send ``IDLE`` and wait (bounded by the timeout) for the server's ``+`` continuation.

    Returns untagged responses that arrived before the continuation (usually none: check them
    with :func:`has_new_mail`). Afterwards register ``client.socket()`` for reading and call
    :func:`idle_read` when it is readable, and once right away.
    """
    if not client.has_capability("IDLE"):
        raise ImapError(FailureKind.PROTOCOL, "server does not offer IDLE")
    imap = bounded(client)
    imap.settle_ahead()  # from here on lines are read by hand: no reply of an earlier command may be left
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
        early.append(parse_untagged(imap, line))


def parse_untagged(imap: BoundedIMAP4, line: bytes) -> tuple[Any, ...]:
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


@raises_imap_error
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
    imap = bounded(client)
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
        response = parse_untagged(imap, line)
        if response[0] == b"BYE":
            raise imaplib.IMAP4.abort(f"server said BYE: {response[1].decode('utf-8', 'replace')}")
        responses.append(response)
    if closed:
        raise ServerClosed("server closed the connection during IDLE")
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


@raises_imap_error
def idle_done_send(client: imapclient.IMAPClient, examine: str | None = None) -> None:
    """Send ``DONE`` without waiting for the server's reply (a few bytes on a quiet socket).

    For a selector loop renewing IDLE or probing a silent connection: keep the socket registered,
    and when :func:`idle_read` returns with :func:`idling` False the server has answered (it is
    alive); no answer within the loop's own deadline means a dead connection. :func:`idle_stop`
    may still be called afterwards: it only waits for the reply.

    ``examine``: ``EXAMINE`` that folder in the same segment (pipelined, RFC 3501 5.5: IDLE ends
    with DONE, so the server is waiting for no continuation); its reply follows IDLE's completion,
    which :func:`idle_read` leaves buffered for :func:`examine_read`.
    """
    if client.idle_tag is None or client.idle_done_sent:
        return
    imap = bounded(client)
    if examine is None:
        imap.send(b"DONE\r\n")
    else:
        tag = imap._new_tag()
        folder = client._normalise_folder(examine)  # modified UTF-7, quoted: bytes
        imap.send(b"DONE\r\n" + tag + b" EXAMINE " + (folder if isinstance(folder, bytes) else folder.encode()) + b"\r\n")
        client.loop_pending = _Pending(b"EXAMINE", tag)
    client.idle_done_sent = True


@raises_imap_error
def idle_stop(client: imapclient.IMAPClient, timeout: float) -> list[tuple[Any, ...]]:
    """Send ``DONE`` (unless :func:`idle_done_send` did) and read until the IDLE command
    completes, within ``timeout`` seconds.

    Returns the untagged responses that arrived meanwhile (check them with :func:`has_new_mail`).
    On a cut network this raises ``ImapError(TIMEOUT)`` after ``timeout`` instead of hanging
    (imapclient #449); the connection is then unusable.
    """
    imap = bounded(client)
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
            responses.append(parse_untagged(imap, line))
        raise TimeoutError(f"IDLE did not end within {timeout:g}s of DONE")
    finally:
        imap.io_timeout = saved_timeout
        imap.max_literal = saved_literal


# --- renewing IDLE from the selector loop ------------------------------------------------------------
# A renewal of a session idling on its only folder is two round trips: DONE with the folder's
# EXAMINE behind it (idle_done_send(examine=...)), then IDLE again. Each send is a few bytes on a
# quiet socket; each read takes what has arrived and returns None until the reply is complete, so
# the loop drives them from readiness like idle_read, no thread held (the loop bounds each step by
# imap.timeout).

_UIDVALIDITY = re.compile(rb"\* OK \[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_UIDNEXT = re.compile(rb"\* OK \[UIDNEXT (\d+)\]", re.IGNORECASE)
_HIGHESTMODSEQ = re.compile(rb"\* OK \[HIGHESTMODSEQ (\d+)\]", re.IGNORECASE)
_EXISTS = re.compile(rb"\* (\d+) EXISTS", re.IGNORECASE)


class _Pending:
    """The command the loop sent and whose reply it is collecting."""

    __slots__ = ("fields", "name", "responses", "tag")

    def __init__(self, name: bytes, tag: bytes) -> None:
        self.name = name
        self.tag = tag
        self.fields: dict[str, int] = {}
        self.responses: list[tuple[Any, ...]] = []


@raises_imap_error
def examine_read(client: imapclient.IMAPClient) -> FolderState | None:
    """What has arrived of the reply to the EXAMINE :func:`idle_done_send` sent, without blocking: the folder's
    state once the reply is complete, None until then. Raises ``ImapError`` when the server
    refuses (``MAILBOX``), closes, says BYE, or sends a literal (no EXAMINE reply has one)."""
    pending: _Pending = client.loop_pending
    for line in _complete_lines(client):
        if line.startswith(pending.tag + b" "):
            client.loop_pending = None
            bounded(client).tagged_commands.pop(pending.tag, None)
            if line[len(pending.tag) + 1:].split(b" ", 1)[0].upper() != b"OK":
                raise ImapError(FailureKind.MAILBOX, f"EXAMINE refused: {line.decode('utf-8', 'replace')[:200]}")
            if "uidvalidity" not in pending.fields:
                raise ImapError(FailureKind.PROTOCOL, "EXAMINE reply has no UIDVALIDITY")
            f = pending.fields
            return FolderState(uidvalidity=f["uidvalidity"], uidnext=f.get("uidnext"), exists=f.get("exists", 0),
                               highestmodseq=f.get("highestmodseq"))
        for name, pattern in (("uidvalidity", _UIDVALIDITY), ("uidnext", _UIDNEXT), ("exists", _EXISTS),
                              ("highestmodseq", _HIGHESTMODSEQ)):
            match = pattern.match(line)
            if match:
                pending.fields[name] = int(match.group(1))
                break
    return None


@raises_imap_error
def idle_start_send(client: imapclient.IMAPClient) -> None:
    """Send ``IDLE`` without waiting; :func:`idle_start_read` waits for the continuation."""
    imap = bounded(client)
    imap.settle_ahead()
    client.loop_pending = _Pending(b"IDLE", imap._command("IDLE"))


@raises_imap_error
def idle_start_read(client: imapclient.IMAPClient) -> list[tuple[Any, ...]] | None:
    """What has arrived of the reply to :func:`idle_start_send`, without blocking: once the ``+``
    continuation came, the session idles (as after :func:`idle_start`) and the untagged responses
    that came before it are returned (new mail, for :func:`has_new_mail`); None until then."""
    pending: _Pending = client.loop_pending
    for line in _complete_lines(client):
        if line.startswith(b"+"):
            client.loop_pending = None
            client.idle_tag = client._idle_tag = pending.tag
            client.idle_done_sent = False
            return pending.responses
        if line.startswith(pending.tag + b" "):
            client.loop_pending = None
            bounded(client).tagged_commands.pop(pending.tag, None)
            raise imaplib.IMAP4.error(f"IDLE refused: {line.decode('utf-8', 'replace')}")
        pending.responses.append(parse_untagged(bounded(client), line))
    return None


def _complete_lines(client: imapclient.IMAPClient) -> list[bytes]:
    """The complete lines the socket holds now (read without blocking, as idle_read does)."""
    imap = bounded(client)
    closed = imap.recv_available(IDLE_READ_BUDGET)
    lines = []
    while (line := imap.take_buffered_line()) is not None:
        if imap.Literal.match(line):
            raise imaplib.IMAP4.abort(f"unexpected literal in a reply the loop reads: {line[:100]!r}")
        if line.startswith(b"* BYE"):
            raise imaplib.IMAP4.abort(f"server said BYE: {line[6:].decode('utf-8', 'replace')}")
        lines.append(line)
    if closed and not lines:
        raise ServerClosed("server closed the connection")
    return lines
