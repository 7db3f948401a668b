"""The bounded transport under imaplib: every byte from a server goes through a buffer of ours.

imaplib reads whatever a server announces: a line of any length (up to a module-wide 1 MB), a
literal of any announced size in one allocation, and a slow drip of bytes never trips a per-``recv``
timeout. :class:`BoundedIMAP4` replaces imaplib's reader with its own buffer over the socket.

Invariants:

* A line longer than ``max_line`` or a literal announced larger than ``max_literal`` is refused
  (:class:`~.errors.LimitExceeded`) *before* it is read; a literal is read in chunks as it arrives
  (memory follows the bytes received, not the size announced).
* Every socket operation has a timeout: a line must complete within ``timeout`` seconds of silence
  and by its deadline, a literal within ``timeout + size / MIN_LITERAL_RATE``; every send has the
  write timeout. :meth:`BoundedIMAP4.recv_available` alone never blocks (the selector loop's read),
  and restores the timeout before it returns.
* Bytes after a STARTTLS reply that arrived in plaintext are never taken as server output
  (response injection): the session is aborted.
* ``file`` (imaplib's reader) is assigned once, by ``open()``, and never read from; only
  ``sock`` is replaced after STARTTLS.
* A command sent ahead (:meth:`BoundedIMAP4.send_ahead`, pipelining) has its reply checked as soon
  as a later command's reading has taken it along, and always before lines are read by hand
  (IDLE): a refusal fails the session then, as it would have at once.
* An idling session keeps little: no buffered reader, no line history, no compiled pattern of
  its own, no untagged responses of its EXAMINE; capability lists are shared between sessions.

Never two threads on one client: neither imaplib, imapclient nor this buffer is thread safe.
"""

from __future__ import annotations

import imaplib
import random
import re
import socket
import ssl
import time
from typing import Any

import imapclient
import imapclient.response_parser
import imapclient.util

from .errors import LimitExceeded, ServerClosed
from .fetch_response import parse_plain

__all__ = ["DEFAULT_MAX_LINE", "DEFAULT_MAX_LITERAL", "IDLE_MAX_LINE", "IDLE_MAX_LITERAL", "IDLE_READ_BUDGET",
           "MIN_LITERAL_RATE", "BoundedIMAP4", "Client", "bounded", "shared_capabilities"]

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
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

# imaplib compiles a tagged-response pattern for each connection from a random tag prefix; tags
# only have to differ between the commands of one connection, so one prefix and one compiled
# pattern serve every connection of the process.
_TAG_PREFIX = imaplib.Int2AP(random.randint(4096, 65535))
_TAGGED = re.compile(rb"(?P<tag>" + _TAG_PREFIX + rb"\d+) (?P<type>[A-Z]+) (?P<data>.*)", re.ASCII)
# A CAPABILITY response code at the start of a tagged OK (LOGIN, AUTHENTICATE): RFC 3501 6.2.3.
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.ASCII | re.IGNORECASE)
# Python 3.11 to 3.13 share imaplib's open() and _connect(), which BoundedIMAP4 replaces; from 3.14
# ``file`` is a read-only property over imaplib's own reader, and both are then imaplib's.
_IMAPLIB_OWNS_FILE = isinstance(getattr(imaplib.IMAP4, "file", None), property)
# The capability lists servers send, one shared tuple per distinct list: thousands of sessions on
# one server hold the same few lists. Bounded: a server varying its list cannot grow it forever.
_CAPABILITIES: dict[bytes, tuple[bytes, ...]] = {}
_CAPABILITIES_MAX = 256


_GREETING_CAPABILITIES: dict[bytes, tuple[str, ...]] = {}


def shared_capabilities(raw: bytes) -> tuple[bytes, ...]:
    """``raw`` (``b"IMAP4rev1 IDLE ..."``) as a tuple of upper-case names, shared between sessions."""
    found = _CAPABILITIES.get(raw)
    if found is None:
        found = tuple(raw.upper().split())
        if len(_CAPABILITIES) < _CAPABILITIES_MAX:
            _CAPABILITIES[raw] = found
    return found


def _greeting_capabilities(raw: bytes) -> tuple[str, ...]:
    """The same for imaplib's ``capabilities`` (a tuple of str, before login)."""
    found = _GREETING_CAPABILITIES.get(raw)
    if found is None:
        found = tuple(name.decode("ascii", "replace") for name in shared_capabilities(raw))
        if len(_GREETING_CAPABILITIES) < _CAPABILITIES_MAX:
            _GREETING_CAPABILITIES[raw] = found
    return found


class BoundedIMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 reading through its own buffer, with size limits and deadlines.

    imaplib calls only ``readline()`` and ``read(size)`` to receive, so replacing those two bounds
    every response; ``send()`` gets the write timeout. The TLS socket (implicit or after STARTTLS)
    is ``self.sock``; ``SSLSocket.recv`` returns decrypted bytes, including any the TLS object has
    already buffered.
    """

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None, timeout: float,
                 max_line: int, max_literal: int) -> None:
        self._implicit_tls = ssl_context
        self.io_timeout = timeout
        self.max_line = max_line
        self.max_literal = max_literal
        self._rbuf = bytearray()
        self._scanned = 0  # bytes at the start of _rbuf known to hold no LF
        self.sent_ahead: list[tuple[str, bytes]] = []  # (command, tag) sent without waiting
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

    def open(self, host: str = "", port: int = imaplib.IMAP4_PORT, timeout: float | None = None) -> None:
        """imaplib's open() without its buffered reader: every read goes through ``_rbuf``, and an
        8 KiB buffer per connection that is never filled is memory thousands of sessions keep."""
        if _IMAPLIB_OWNS_FILE:
            super().open(host, port, timeout)
            return
        self.host = host
        self.port = port
        self.sock = self._create_socket(timeout)
        self.file = self.sock.makefile("rb", buffering=0)  # closed by shutdown(), never read

    def _connect(self) -> None:
        try:
            if _IMAPLIB_OWNS_FILE:
                super()._connect()
            else:
                self._greeted()
        except self.abort as exc:  # not a greeting at all
            raise self.error(f"garbage instead of a greeting: {exc}") from None
        except self.error as exc:  # a well-formed refusal, usually "* BYE ..."
            raise self.error(f"server refused the session at greeting: {exc}") from None

    def _greeted(self) -> None:
        """imaplib's _connect() with the process-wide tag pattern, and the capabilities of the
        greeting's CAPABILITY response code when it has one (RFC 3501 7.1): the CAPABILITY command
        imaplib always sends is then one round trip saved on every connection."""
        self.tagpre = _TAG_PREFIX
        self.tagre = _TAGGED
        self.welcome = self._get_response()
        if "PREAUTH" in self.untagged_responses:
            self.state = "AUTH"
        elif "OK" in self.untagged_responses:
            self.state = "NONAUTH"
        else:
            raise self.error(self.welcome)
        greeting = self.untagged_responses.pop("CAPABILITY", None)
        if greeting and greeting[-1]:
            self.capabilities = _greeting_capabilities(greeting[-1])
        else:
            self._get_capabilities()
        for version in imaplib.AllowedVersions:
            if version in self.capabilities:
                self.PROTOCOL_VERSION = version
                return
        raise self.error("server not IMAP4 compliant")

    def _log(self, line: str) -> None:
        """imaplib keeps the last ten lines of every session for debugging, the LOGIN line with its
        password among them; the edge logs its own events and keeps none."""

    def _get_line(self) -> bytes:
        """imaplib's _get_line() without formatting every line for that history."""
        line = self.readline()
        if not line:
            raise self.abort("socket error: EOF")
        if not line.endswith(b"\r\n"):
            raise self.abort(f"socket error: unterminated line: {line[:100]!r}")
        return line[:-2]

    def _command_complete(self, name: str, tag: bytes) -> tuple[str, list[Any]]:
        typ, data = super()._command_complete(name, tag)
        if name in ("LOGIN", "AUTHENTICATE") and typ == "OK" and "CAPABILITY" not in self.untagged_responses:
            # The capabilities after login in the tagged OK (RFC 3501 6.2.3): imapclient takes an
            # untagged CAPABILITY from here instead of asking with a CAPABILITY command.
            code = _CAPABILITY_CODE.match(data[-1] or b"")
            if code:
                self.untagged_responses["CAPABILITY"] = [code.group(1)]
        if self.sent_ahead and name != "LOGOUT":
            self.settle_ahead(wait=False)
        return typ, data

    def forget_untagged(self) -> None:
        """Drop the untagged responses a command left (a SELECT leaves a dozen lists), once the
        caller has read what it needs: an idling session keeps none of them. A BYE stays, for
        the next command to report."""
        bye = self.untagged_responses.get("BYE")
        self.untagged_responses.clear()
        if bye:
            self.untagged_responses["BYE"] = bye
        self.mo = None  # imaplib's last match, which holds the line it matched

    def send_ahead(self, name: str, *args: Any) -> None:
        """Send a command without waiting for its completion (pipelining, RFC 3501 5.5): the next
        command's reading takes its reply along, and :meth:`settle_ahead` checks it."""
        self.sent_ahead.append((name, self._command(name, *args)))

    def settle_ahead(self, wait: bool = True) -> None:
        """Check the replies of commands sent ahead; with ``wait``, read until they have come
        (bounded like any read). A command refused fails the session as it would have at once."""
        while self.sent_ahead:
            name, tag = self.sent_ahead[0]
            if not wait and self.tagged_commands.get(tag) is None:
                return
            del self.sent_ahead[0]
            typ, data = super()._command_complete(name, tag)
            self.untagged_responses.pop("ENABLED", None)
            if typ != "OK":
                raise self.error(f"{name} refused: {typ} {data!r}")

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
            raise LimitExceeded(
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
                raise ServerClosed(f"server closed the connection {size - have} bytes into a literal")
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def _take_line(self, limit: int) -> bytes | None:
        """Pop one complete line (with its CRLF) from the buffer, or None when there is none."""
        newline = self._rbuf.find(b"\n", self._scanned)
        if newline < 0:
            self._scanned = len(self._rbuf)
            if self._scanned > limit:
                raise LimitExceeded(
                    f"server sent a line longer than {limit} bytes without an end (max_line)"
                )
            return None
        if newline + 1 > limit:
            raise LimitExceeded(f"server sent a line of {newline + 1} bytes, limit is {limit}")
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
            raise ServerClosed("server closed the connection")
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
                    raise LimitExceeded(f"server sent an IDLE line longer than {IDLE_MAX_LINE} bytes")
                if len(chunk) < 65536:
                    break  # the socket held no more (a further recv would only raise): the selector says when more comes
            # Still empty the TLS object, whose bytes the selector cannot see.
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


class Client(imapclient.IMAPClient):
    """IMAPClient on top of :class:`BoundedIMAP4`."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None, timeout: float,
                 max_line: int, max_literal: int) -> None:
        self._limits = {"timeout": timeout, "max_line": max_line, "max_literal": max_literal}
        self._implicit_tls = ssl_context
        super().__init__(host, port, ssl=ssl_context is not None, ssl_context=ssl_context,
                         timeout=timeout)
        del self._limits  # only _create_IMAP4 needed them
        # imapclient turns on imaplib's debug output (every line formatted for the log even when
        # the logger is off, and a command history dumped on errors); the edge logs its own events.
        self._imap.debug = 0
        vars(self._imap).pop("_mesg", None)  # imapclient's logger adapter for that output, per client
        self.normalise_times = False  # keep INTERNALDATE's time zone
        self.idle_tag: bytes | None = None
        self.idle_done_sent = False

    def fetch(self, messages: Any, data: Any, modifiers: Any = None) -> dict[int, dict[bytes, Any]]:
        """imapclient's ``fetch``, with the plain replies ingest asks for read by
        :func:`~.fetch_response.parse_plain` (a tenth of the cost); any other reply by imapclient."""
        if not (self.use_uid and not self.normalise_times) or modifiers or not messages:
            return super().fetch(messages, data, modifiers)
        tag = self._imap._command("UID", "FETCH", imapclient.imapclient.join_message_ids(messages),
                                  imapclient.imapclient.seq_to_parenstr_upper(data))
        typ, lines = self._imap._command_complete("FETCH", tag)
        self._checkok("fetch", typ, lines)
        typ, lines = self._imap._untagged_response(typ, lines, "FETCH")
        response = parse_plain(lines)
        if response is None:
            response = imapclient.response_parser.parse_fetch_response(lines, self.normalise_times, self.use_uid)
        return {uid: response[uid] for uid in imapclient.util.to_ints(messages) if uid in response}

    def _create_IMAP4(self) -> BoundedIMAP4:
        return BoundedIMAP4(self.host, self.port, ssl_context=self._implicit_tls, **self._limits)

    def _normalise_capabilites(self, raw_response: Any) -> tuple[bytes, ...]:  # sic, imapclient's name
        return shared_capabilities(raw_response if isinstance(raw_response, bytes) else str(raw_response).encode())


def bounded(client: imapclient.IMAPClient) -> BoundedIMAP4:
    imap = client._imap
    if not isinstance(imap, BoundedIMAP4):
        raise TypeError("use a client made by mailingestd.fetch.imap.connect()")
    return imap
