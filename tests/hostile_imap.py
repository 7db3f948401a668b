"""A scripted IMAP server of the test suite's own, for misbehaviour no real server produces on demand.

Everything a well-behaved server does is tested against a real Dovecot; this server exists only for
lines without end, literals announced and never sent, servers that stop mid-response, garbage
greetings, unexpected BYEs, slow drips and the providers' throttling replies. It speaks just enough
IMAP (greeting, CAPABILITY, LOGIN, AUTHENTICATE PLAIN, SELECT/EXAMINE, STATUS, UID SEARCH, UID FETCH,
NOOP, IDLE, LOGOUT) to lead a client to the misbehaviour.

    with HostileServer("huge_literal") as server:
        connect(Account(host=server.host, port=server.port, tls="none"), "pw")

A scenario is a name from :data:`SCENARIOS` or any callable taking a :class:`Session`; it runs once
per accepted connection, in its own thread. ``server.connections`` counts connections accepted.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

MESSAGE = (
    b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: hostile\r\n"
    b"Message-ID: <hostile@example.com>\r\n\r\nbody\r\n"
)
CAPABILITIES = b"IMAP4rev1 IDLE LITERAL+ AUTH=PLAIN"


class ClientGone(Exception):
    """The client closed the connection (or the server is stopping): the scenario ends."""


class Session:
    """One client connection: read its commands, answer them normally, or misbehave."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self._stopping = stopping
        self._buffer = b""
        sock.settimeout(0.1)

    # -- raw I/O -------------------------------------------------------------------------

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ClientGone() from exc

    def drip(self, data: bytes, every: float, size: int = 1) -> None:
        """Send ``data`` ``size`` bytes at a time, one piece every ``every`` seconds."""
        for start in range(0, len(data), size):
            self.send(data[start:start + size])
            self.sleep(every)

    def sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise ClientGone()

    def _recv(self) -> bytes:
        while not self._stopping.is_set():
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise ClientGone() from exc
            if not chunk:
                raise ClientGone()
            return chunk
        raise ClientGone()

    def read_line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._buffer += self._recv()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def hold(self) -> None:
        """Say nothing more and keep the connection open until the client gives up."""
        while True:
            self._recv()

    # -- a minimal IMAP server -----------------------------------------------------------

    def greet(self) -> None:
        self.send(b"* OK [CAPABILITY " + CAPABILITIES + b"] hostile test server ready\r\n")

    def read_command(self) -> tuple[bytes, bytes, bytes]:
        """The next command as (tag, NAME, arguments); ``UID FETCH`` and ``UID SEARCH`` are names."""
        parts = self.read_line().split(b" ", 2) + [b"", b""]
        tag, name, rest = parts[0], parts[1].upper(), parts[2]
        if name == b"UID":
            sub, _, rest = rest.partition(b" ")
            name = b"UID " + sub.upper()
        return tag, name, rest

    def read_command_within(self, seconds: float) -> tuple[bytes, bytes, bytes] | None:
        """The next command if it arrives within ``seconds``, else None (nothing is lost)."""
        deadline = time.monotonic() + seconds
        while b"\r\n" not in self._buffer:
            if not select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            self._buffer += self._recv()
        return self.read_command()

    def serve_until(self, wanted: bytes) -> tuple[bytes, bytes]:
        """Answer commands normally until ``wanted`` arrives; return its (tag, arguments)."""
        while True:
            tag, name, rest = self.read_command()
            if name == wanted:
                return tag, rest
            self.answer(tag, name, rest)

    def answer(self, tag: bytes, name: bytes, rest: bytes) -> None:
        """A well-behaved reply to one command."""
        ok = tag + b" OK " + name + b" completed\r\n"
        if name == b"CAPABILITY":
            self.send(b"* CAPABILITY " + CAPABILITIES + b"\r\n" + ok)
        elif name == b"LOGIN":
            self.send(ok)
        elif name == b"AUTHENTICATE":
            self.send(b"+ \r\n")
            self.read_line()
            self.send(ok)
        elif name in (b"SELECT", b"EXAMINE"):
            self.send(
                b"* FLAGS (\\Seen)\r\n* 1 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 7] UIDs valid\r\n"
                b"* OK [UIDNEXT 2] next\r\n" + tag + b" OK [READ-ONLY] " + name + b" completed\r\n"
            )
        elif name == b"STATUS":
            folder = rest.split(b" (", 1)[0]
            self.send(b"* STATUS " + folder + b" (UIDVALIDITY 7 UIDNEXT 2 MESSAGES 1)\r\n" + ok)
        elif name == b"UID SEARCH":
            self.send(b"* SEARCH 1\r\n" + ok)
        elif name == b"UID FETCH":
            self.send(fetch_response(1, MESSAGE) + ok)
        elif name == b"IDLE":
            self.send(b"+ idling\r\n")
            self.read_line()  # DONE
            self.send(ok)
        elif name == b"LOGOUT":
            self.send(b"* BYE logging out\r\n" + ok)
            raise ClientGone()
        else:
            self.send(ok)


def fetch_response(uid: int, raw: bytes) -> bytes:
    return (
        b"* %d FETCH (UID %d RFC822.SIZE %d INTERNALDATE \"01-Jan-2024 10:00:00 +0100\" "
        b"BODY[] {%d}\r\n" % (uid, uid, len(raw), len(raw)) + raw + b")\r\n"
    )


Scenario = Callable[[Session], None]


class HostileServer:
    """A scripted IMAP server on 127.0.0.1 and a free port, one thread per connection."""

    def __init__(self, scenario: str | Scenario, host: str = "127.0.0.1") -> None:
        self.scenario: Scenario = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
        self.host = host  # any 127.x.y.z: a server of its own name for per-server limits
        self.connections = 0
        self.accepted_at: list[float] = []  # time.monotonic() of each accepted connection
        self._stopping = threading.Event()
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> HostileServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        thread = threading.Thread(target=self._accept_loop, name="hostile-imap", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self.accepted_at.append(time.monotonic())
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, sock: socket.socket) -> None:
        with sock:
            try:
                self.scenario(Session(sock, self._stopping))
            except ClientGone:
                pass


# ---------------------------------------------------------------------------------------------
# scenarios


def garbage_greeting(session: Session) -> None:
    session.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    session.hold()


def silent(session: Session) -> None:
    session.hold()


def slow_greeting(session: Session) -> None:
    session.drip(b"* OK [CAPABILITY IMAP4rev1] a very slow server says hello\r\n", every=0.1)
    session.hold()


def endless_line(session: Session) -> None:
    session.greet()
    session.serve_until(b"UID FETCH")
    session.send(b"* 1 FETCH (UID 1 FLAGS (")
    while True:
        session.send(b"x" * 65536)


def huge_literal(session: Session) -> None:
    session.greet()
    session.serve_until(b"UID FETCH")
    session.send(b"* 1 FETCH (UID 1 RFC822.SIZE 10000000000 BODY[] {10000000000}\r\n")
    session.hold()


def stall_mid_fetch(session: Session) -> None:
    session.greet()
    session.serve_until(b"UID FETCH")
    session.send(fetch_response(1, MESSAGE * 20)[:200])
    session.hold()


def drip_literal(session: Session) -> None:
    session.greet()
    session.serve_until(b"UID FETCH")
    session.send(b"* 1 FETCH (UID 1 BODY[] {1000000}\r\n")
    session.drip(b"x" * 1000000, every=0.05, size=1024)


def bye_mid_fetch(session: Session) -> None:
    session.greet()
    session.serve_until(b"UID FETCH")
    session.send(fetch_response(1, MESSAGE) + b"* BYE Internal error, closing connection\r\n")


def unexpected_bye(session: Session) -> None:
    session.greet()
    session.serve_until(b"EXAMINE")
    session.send(b"* BYE Disconnected for inactivity.\r\n")


def too_many_connections(session: Session) -> None:
    """Gmail's answer to the 16th simultaneous connection of one account."""
    session.greet()
    tag, _ = session.serve_until(b"LOGIN")
    session.send(tag + b" NO [ALERT] Too many simultaneous connections. (Failure)\r\n")
    session.hold()


def overquota(session: Session) -> None:
    """Gmail past its IMAP bandwidth limit: BYE in the middle of a FETCH."""
    session.greet()
    session.serve_until(b"UID FETCH")
    session.send(b"* BYE [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)\r\n")


def throttled(session: Session) -> None:
    session.greet()
    tag, _ = session.serve_until(b"EXAMINE")
    session.send(tag + b" NO [THROTTLED] Too many commands, slow down\r\n")
    session.hold()


def office365_backoff(session: Session) -> None:
    """Office 365's throttling reply, followed as it does by BYE and a close."""
    session.greet()
    tag, _ = session.serve_until(b"UID FETCH")
    session.send(
        tag + b" BAD Request is throttled. Suggested Backoff Time: 200 milliseconds\r\n"
        b"* BYE Connection closed. 14\r\n"
    )


def bye_in_idle(session: Session) -> None:
    session.greet()
    session.serve_until(b"IDLE")
    session.send(b"+ idling\r\n")
    session.sleep(0.2)
    session.send(b"* BYE Server shutting down.\r\n")


def partial_idle_lines(session: Session) -> None:
    """New mail announced in pieces: ``* 3 EX`` now, ``ISTS`` later (imapclient #519)."""
    session.greet()
    tag, _ = session.serve_until(b"IDLE")
    session.send(b"+ idling\r\n* 3 EX")
    session.sleep(0.3)
    session.send(b"ISTS\r\n* 1 RECENT\r\n")
    session.read_line()  # DONE
    session.send(tag + b" OK IDLE terminated\r\n")
    session.serve_until(b"NEVER")


def deaf_in_idle(session: Session) -> None:
    """Accepts IDLE, then never answers DONE: a network cut as seen by the client (#449)."""
    session.greet()
    session.serve_until(b"IDLE")
    session.send(b"+ idling\r\n")
    session.hold()


def starttls_injection(session: Session) -> None:
    """A man in the middle appends a plaintext response to the STARTTLS reply (CVE-2011-0411)."""
    session.send(b"* OK hostile server ready\r\n")
    tag, _ = session.serve_until(b"CAPABILITY")
    session.send(b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n" + tag + b" OK done\r\n")
    tag, _ = session.serve_until(b"STARTTLS")
    session.send(tag + b" OK Begin TLS\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n")
    session.hold()


SCENARIOS: dict[str, Scenario] = {
    scenario.__name__: scenario
    for scenario in (
        garbage_greeting, silent, slow_greeting, endless_line, huge_literal, stall_mid_fetch,
        drip_literal, bye_mid_fetch, unexpected_bye, too_many_connections, overquota, throttled,
        office365_backoff, bye_in_idle, partial_idle_lines, deaf_in_idle, starttls_injection,
    )
}
