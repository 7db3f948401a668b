"""The IMAP edge (mailingestd.fetch.imap): hostile servers, provider texts, and a real Dovecot.

Hostile cases run against tests/hostile_imap.py: each costs one connection and must end in one
ImapError of the right kind, with a one-line detail, within a bounded time and bounded memory.
Everything a well-behaved server does is checked against a real Dovecot (fixtures in conftest.py).
"""

from __future__ import annotations

import imaplib
import os
import selectors
import socket
import ssl
import time
import tracemalloc
from collections.abc import Callable
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import imapclient
import pytest
from imapclient.exceptions import IMAPClientError, LoginError

from mailingestd.fetch import imap, transport
from mailingestd.fetch.imap import FailureKind, ImapError
from hostile_imap import HostileServer, Session, fetch_response

SECRET = "hunter2-do-not-log"


def make_account(host: str, port: int, *, tls: str = "none", username: str = "user1",
                 **extra: Any) -> SimpleNamespace:
    fields = {"id": "acct-1", "host": host, "port": port, "tls": tls, "username": username,
              "tls_ca_file": None, "tls_verify": True}
    fields.update(extra)
    return SimpleNamespace(**fields)


def examine_and_fetch(client: imapclient.IMAPClient) -> None:
    imap.examine(client, "INBOX")
    imap.fetch_messages(client, [1])


def connect_only(client: imapclient.IMAPClient) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# hostile servers


def announced_never_sent(session: Session) -> None:
    """A 50 MB literal (allowed by max_literal) announced, 1 KiB sent, then silence."""
    session.greet()
    session.serve_until(b"UID FETCH")
    session.send(b"* 1 FETCH (UID 1 BODY[] {50000000}\r\n" + b"x" * 1024)
    session.hold()


HOSTILE_CASES = [
    # scenario, action, kind, words in the detail, retry_after, limits
    ("garbage_greeting", connect_only, FailureKind.PROTOCOL, "garbage instead of a greeting", None, {}),
    ("silent", connect_only, FailureKind.TIMEOUT, "silent for 1s", None, {}),
    ("slow_greeting", connect_only, FailureKind.TIMEOUT, "too slow", None, {}),
    ("endless_line", examine_and_fetch, FailureKind.PROTOCOL, "max_line", None,
     {"max_line": 256 * 1024}),
    ("huge_literal", examine_and_fetch, FailureKind.PROTOCOL, "literal of 10000000000 bytes", None, {}),
    ("stall_mid_fetch", examine_and_fetch, FailureKind.TIMEOUT, "silent for 1s", None, {}),
    (announced_never_sent, examine_and_fetch, FailureKind.TIMEOUT, "silent for 1s", None, {}),
    ("bye_mid_fetch", examine_and_fetch, FailureKind.NETWORK, "BYE: Internal error", None, {}),
    ("unexpected_bye", examine_and_fetch, FailureKind.NETWORK, "Disconnected for inactivity", None, {}),
    ("too_many_connections", connect_only, FailureKind.THROTTLED, "Too many simultaneous", None, {}),
    ("overquota", examine_and_fetch, FailureKind.THROTTLED, "[OVERQUOTA]", None, {}),
    ("throttled", examine_and_fetch, FailureKind.THROTTLED, "[THROTTLED]", None, {}),
    ("office365_backoff", examine_and_fetch, FailureKind.THROTTLED, "Suggested Backoff Time", 0.2, {}),
]


def run_hostile(scenario: Any, action: Callable[[imapclient.IMAPClient], None],
                timeout: float = 1.0, **limits: int) -> tuple[ImapError, float, int, int]:
    """Connect to a hostile server, run ``action``; return (error, seconds, peak bytes, connections)."""
    with HostileServer(scenario) as server:
        tracemalloc.start()
        started = time.monotonic()
        try:
            with pytest.raises(ImapError) as info:
                client = imap.connect(make_account(server.host, server.port), SECRET,
                                      timeout=timeout, **limits)
                try:
                    action(client)
                finally:
                    imap.logout(client, timeout=0.2)
            elapsed = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return info.value, elapsed, peak, server.connections


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "scenario, action, kind, words, retry_after, limits",
    HOSTILE_CASES,
    ids=[case[0] if isinstance(case[0], str) else case[0].__name__ for case in HOSTILE_CASES],
)
def test_hostile_server_gives_one_classified_error(
    scenario: Any, action: Callable[..., None], kind: FailureKind, words: str,
    retry_after: float | None, limits: dict[str, int],
) -> None:
    error, elapsed, peak, connections = run_hostile(scenario, action, **limits)
    assert error.kind is kind, error
    assert words in error.detail
    assert error.retry_after == retry_after
    assert "\n" not in error.detail and len(error.detail) <= 300
    assert SECRET not in error.detail and SECRET not in str(error)
    assert connections == 1
    assert elapsed < 3.0, f"took {elapsed:.1f}s"
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"


def test_literal_over_the_limit_is_refused_before_reading() -> None:
    error, elapsed, peak, _ = run_hostile("huge_literal", examine_and_fetch)
    assert "max_literal" in error.detail
    assert elapsed < 1.0  # refused at once, not after waiting for the bytes
    assert peak < 1024 * 1024  # 10 GB announced


def test_literal_in_progress_holds_memory_for_bytes_received_not_announced() -> None:
    error, _, peak, _ = run_hostile(announced_never_sent, examine_and_fetch)
    assert error.kind is FailureKind.TIMEOUT
    assert peak < 2 * 1024 * 1024  # 50 MB announced, 1 KiB sent


def test_slow_drip_of_a_literal_hits_the_transfer_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 MB at about 20 KB/s; with a 1 MB/s floor the deadline is timeout + ~1 s.
    monkeypatch.setattr(transport, "MIN_LITERAL_RATE", 1024 * 1024)  # read where the reader is
    error, elapsed, _, _ = run_hostile("drip_literal", examine_and_fetch)
    assert error.kind is FailureKind.TIMEOUT
    assert "too slow" in error.detail
    assert 1.5 < elapsed < 4.0


def test_message_within_max_literal_is_fetched_whole() -> None:
    raw = b"Subject: big\r\n\r\n" + b"y" * (3 * 1024 * 1024)

    def serve_big(session: Session) -> None:
        session.greet()
        tag, _ = session.serve_until(b"UID FETCH")
        session.send(fetch_response(1, raw) + tag + b" OK done\r\n")
        session.serve_until(b"NEVER")

    with HostileServer(serve_big) as server:
        client = imap.connect(make_account(server.host, server.port), SECRET, timeout=2,
                              max_literal=4 * 1024 * 1024)
        imap.examine(client, "INBOX")
        assert imap.fetch_messages(client, [1])[1].raw == raw
        imap.logout(client, 1)


def wait_readable(client: imapclient.IMAPClient, timeout: float) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(client.socket(), selectors.EVENT_READ)
        selector.select(timeout)


@pytest.mark.timeout(10)
def test_idle_read_keeps_partial_lines_until_they_complete() -> None:
    with HostileServer("partial_idle_lines") as server:
        client = imap.connect(make_account(server.host, server.port), SECRET, timeout=2)
        imap.examine(client, "INBOX")
        assert imap.idle_start(client) == []  # "* 3 EX" arrived with "+ idling": buffered
        assert imap.idle_read(client) == []
        wait_readable(client, 2)
        responses = imap.idle_read(client)
        assert responses == [(3, b"EXISTS"), (1, b"RECENT")]
        assert imap.has_new_mail(responses)
        assert imap.idle_stop(client, 2) == []
        assert imap.noop(client) == []
        imap.logout(client, 1)


def idling_on(server: HostileServer, timeout: float) -> Any:
    """A client of the scripted server, INBOX examined, in IDLE."""
    client = imap.connect(make_account(server.host, server.port), SECRET, timeout=timeout)
    imap.examine(client, "INBOX")
    imap.idle_start(client)
    return client


@pytest.mark.timeout(10)
def test_bye_during_idle_raises_instead_of_spinning() -> None:
    with HostileServer("bye_in_idle") as server:
        client = idling_on(server, 2)
        wait_readable(client, 2)
        with pytest.raises(ImapError) as info:
            imap.idle_read(client)
        assert info.value.kind is FailureKind.SERVER_BUSY
        assert "Server shutting down" in info.value.detail
        wait_readable(client, 2)
        with pytest.raises(ImapError) as info:  # then EOF: still an error, never an empty list
            imap.idle_read(client)
        assert info.value.kind is FailureKind.NETWORK
        imap.logout(client, 0.5)


@pytest.mark.timeout(10)
def test_idle_stop_and_logout_are_bounded_when_the_server_stops_answering() -> None:
    with HostileServer("deaf_in_idle") as server:
        client = idling_on(server, 5)
        started = time.monotonic()
        with pytest.raises(ImapError) as info:
            imap.idle_stop(client, 0.5)
        assert info.value.kind is FailureKind.TIMEOUT
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        imap.logout(client, 0.5)  # never raises
        assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------------------------------------
# classify(): real provider texts as imaplib / imapclient deliver them

CLASSIFY_TABLE = [
    # Gmail
    (LoginError("login failed: [AUTHENTICATIONFAILED] Invalid credentials (Failure)"),
     FailureKind.AUTH, None),
    (LoginError("login failed: [ALERT] Too many simultaneous connections. (Failure)"),
     FailureKind.THROTTLED, None),
    (LoginError("login failed: [ALERT] Please log in via your web browser: "
                "https://support.google.com/mail/accounts/answer/78754 (Failure)"),
     FailureKind.AUTH, None),
    (LoginError("login failed: [ALERT] Application-specific password required: "
                "https://support.google.com/accounts/answer/185833 (Failure)"),
     FailureKind.AUTH, None),
    (imaplib.IMAP4.abort("command: FETCH => [OVERQUOTA] Account exceeded command or bandwidth limits."),
     FailureKind.THROTTLED, None),
    (IMAPClientError("select failed: [NONEXISTENT] Unknown Mailbox: Nope (now in authenticated "
                     "state) (Failure)"),
     FailureKind.MAILBOX, None),
    # Office 365 / Exchange
    (imaplib.IMAP4.error("FETCH command error: BAD [b'Request is throttled. Suggested Backoff "
                         "Time: 89117 milliseconds']"),
     FailureKind.THROTTLED, 89.117),
    (IMAPClientError("fetch failed: Request is throttled. Suggested Backoff Time: 299609 milliseconds"),
     FailureKind.THROTTLED, 299.609),
    (LoginError("login failed: LOGIN failed."), FailureKind.AUTH, None),
    (LoginError("login failed: AUTHENTICATE failed."), FailureKind.AUTH, None),
    (imaplib.IMAP4.error("SELECT command error: BAD [b'User is authenticated but not connected.']"),
     FailureKind.THROTTLED, None),
    (IMAPClientError("select failed: Server Unavailable. 15"), FailureKind.SERVER_BUSY, None),
    # Dovecot
    (LoginError("login failed: [AUTHENTICATIONFAILED] Authentication failed."), FailureKind.AUTH, None),
    (LoginError("login failed: [UNAVAILABLE] Maximum number of connections from user+IP exceeded "
                "(mail_max_userip_connections=10)"),
     FailureKind.THROTTLED, None),
    (LoginError("login failed: [UNAVAILABLE] Temporary authentication failure. "
                "[mail.example.com:2024-01-01 10:00:00]"),
     FailureKind.SERVER_BUSY, None),
    (LoginError("login failed: [PRIVACYREQUIRED] Plaintext authentication disallowed on "
                "non-secure (SSL/TLS) connections."),
     FailureKind.TLS, None),
    (IMAPClientError("select failed: [NONEXISTENT] Mailbox doesn't exist: Nope"),
     FailureKind.MAILBOX, None),
    (imaplib.IMAP4.abort("command: NOOP => server said BYE: Server shutting down."),
     FailureKind.SERVER_BUSY, None),
    (imaplib.IMAP4.abort("command: IDLE => server said BYE: Disconnected for inactivity."),
     FailureKind.NETWORK, None),
    # transport
    (ConnectionRefusedError(111, "Connection refused"), FailureKind.NETWORK, None),
    (ConnectionResetError(104, "Connection reset by peer"), FailureKind.NETWORK, None),
    (socket.gaierror(-2, "Name or service not known"), FailureKind.NETWORK, None),
    (TimeoutError("timed out"), FailureKind.TIMEOUT, None),
    (ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get local issuer "
                                     "certificate"),
     FailureKind.TLS, None),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), FailureKind.NETWORK, None),
    (imaplib.IMAP4.abort("unexpected response: b'HTTP/1.1 400 Bad Request'"),
     FailureKind.PROTOCOL, None),
    (imapclient.exceptions.ProtocolError("unexpected EOF"), FailureKind.PROTOCOL, None),
]


@pytest.mark.parametrize("exc, kind, retry_after", CLASSIFY_TABLE,
                         ids=[str(row[0])[:50] for row in CLASSIFY_TABLE])
def test_classify_provider_texts(exc: BaseException, kind: FailureKind,
                                 retry_after: float | None) -> None:
    error = imap.classify(exc)
    assert error.kind is kind
    assert error.retry_after == retry_after
    assert error.detail and "\n" not in error.detail


def test_classify_keeps_an_imap_error_and_makes_details_one_short_line() -> None:
    original = ImapError(FailureKind.AUTH, "refused")
    assert imap.classify(original) is original
    long = imap.classify(imaplib.IMAP4.error("line one\r\nline two " + "z" * 1000))
    assert "\n" not in long.detail and len(long.detail) <= 300


# ---------------------------------------------------------------------------------------------
# a real Dovecot


def raw_message(n: int, body: bytes = b"") -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\nTo: bob@example.com\r\n"
        b"Subject: message %d\r\nMessage-ID: <m%d@example.com>\r\n"
        b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\nHello %d\r\n" % (n, n, n) + body
    )


def dovecot_client(dovecot: Any, user: str, **kwargs: Any) -> imapclient.IMAPClient:
    return imap.connect(make_account(dovecot.host, dovecot.port, username=user),
                        dovecot.password, timeout=5, **kwargs)


def test_dovecot_examine_search_fetch_without_setting_seen(dovecot: Any, mailbox: str) -> None:
    sent = [raw_message(1), raw_message(2, b"with trailing bytes \xe9\r\n")]
    for raw in sent:
        dovecot.append(mailbox, raw)
    client = dovecot_client(dovecot, mailbox)
    try:
        assert "IDLE" in imap.capabilities(client)
        state = imap.examine(client, "INBOX")
        assert state.exists == 2 and state.uidnext == 3 and state.uidvalidity > 0
        assert state.highestmodseq is not None  # CONDSTORE enabled by connect()
        assert imap.status(client, "INBOX") == state
        assert imap.uids_from(client, 1) == [1, 2]
        assert imap.uids_from(client, 3) == []  # "3:*" matches UID 2: filtered (rule 3)
        fetched = imap.fetch_messages(client, [1, 2, 99])
        assert sorted(fetched) == [1, 2]
        for uid, raw in zip((1, 2), sent, strict=True):
            assert fetched[uid].raw == raw
            assert fetched[uid].size == len(raw)
            assert isinstance(fetched[uid].internaldate, datetime)
            assert fetched[uid].internaldate.tzinfo is not None
    finally:
        imap.logout(client, 2)
    with dovecot.client(mailbox) as checker:
        checker.select_folder("INBOX", readonly=True)
        flags = checker.get_flags([1, 2])
    assert all(b"\\Seen" not in flags[uid] for uid in (1, 2)), flags


def test_dovecot_idle_sees_new_mail_and_stops_cleanly(dovecot: Any, mailbox: str) -> None:
    client = dovecot_client(dovecot, mailbox)
    try:
        imap.examine(client, "INBOX")
        responses = imap.idle_start(client) + imap.idle_read(client)
        assert not imap.has_new_mail(responses)
        dovecot.append(mailbox, raw_message(1))
        deadline = time.monotonic() + 5
        while not imap.has_new_mail(responses) and time.monotonic() < deadline:
            wait_readable(client, 0.5)
            responses += imap.idle_read(client)
        assert imap.has_new_mail(responses), responses
        imap.idle_stop(client, 2)
        assert imap.noop(client) == []
        assert imap.uids_from(client, 1) == [1]
    finally:
        imap.logout(client, 2)


def test_dovecot_missing_folder_is_a_mailbox_error(dovecot: Any, mailbox: str) -> None:
    client = dovecot_client(dovecot, mailbox)
    try:
        with pytest.raises(ImapError) as info:
            imap.examine(client, "No such folder")
        assert info.value.kind is FailureKind.MAILBOX
    finally:
        imap.logout(client, 2)


def test_dovecot_refused_connection_is_network() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ImapError) as info:
        imap.connect(make_account("127.0.0.1", port), SECRET, timeout=2)
    assert info.value.kind is FailureKind.NETWORK


@pytest.mark.timeout(60)
def test_dovecot_50_mb_message_fetched_when_max_literal_allows(dovecot: Any, mailbox: str) -> None:
    raw = raw_message(1, b"z" * (50 * 1000 * 1000))
    dovecot.append(mailbox, raw)
    client = dovecot_client(dovecot, mailbox)
    try:
        imap.examine(client, "INBOX")
        fetched = imap.fetch_messages(client, [1])
        assert len(fetched[1].raw) == len(raw) and fetched[1].raw == raw
    finally:
        imap.logout(client, 2)
    small = dovecot_client(dovecot, mailbox, max_literal=1024 * 1024)
    try:
        imap.examine(small, "INBOX")
        with pytest.raises(ImapError) as info:
            imap.fetch_messages(small, [1])
        assert info.value.kind is FailureKind.PROTOCOL and "max_literal" in info.value.detail
    finally:
        imap.logout(small, 1)


@pytest.fixture(scope="module")
def tls_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from devtools.devservers import Dovecot

    server = Dovecot(tmp_path_factory.mktemp("dovecot-tls"), users=2, tls=True)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_tls_verified_against_the_accounts_ca(tls_dovecot: Any, mode: str) -> None:
    port = tls_dovecot.port if mode == "implicit" else tls_dovecot.starttls_port
    account = make_account(tls_dovecot.host, port, tls=mode, username=tls_dovecot.users[0],
                           tls_ca_file=str(tls_dovecot.ca_file))
    client = imap.connect(account, tls_dovecot.password, timeout=5)
    try:
        assert isinstance(client.socket(), ssl.SSLSocket)
        assert imap.examine(client, "INBOX").uidvalidity > 0
    finally:
        imap.logout(client, 2)


def test_tls_connections_share_a_context_until_the_ca_file_changes(tls_dovecot: Any) -> None:
    """Loading the CA store costs a good part of a second of CPU and most of a MiB, kept by every
    socket wrapped with the context: connections with the same settings share one."""
    def context(**extra: Any) -> Any:
        acct = make_account(tls_dovecot.host, tls_dovecot.port, tls="implicit", username=tls_dovecot.users[0],
                            tls_ca_file=str(tls_dovecot.ca_file), **extra)
        client = imap.connect(acct, tls_dovecot.password, timeout=5)
        try:
            return client.socket().context
        finally:
            imap.logout(client, 2)

    first = context()
    assert context() is first
    lax = context(tls_verify=False)
    assert lax is not first and not lax.check_hostname
    stat = os.stat(tls_dovecot.ca_file)
    os.utime(tls_dovecot.ca_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert context() is not first  # a renewed CA file is read again


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_tls_unknown_ca_is_refused(tls_dovecot: Any, mode: str) -> None:
    port = tls_dovecot.port if mode == "implicit" else tls_dovecot.starttls_port
    account = make_account(tls_dovecot.host, port, tls=mode, username=tls_dovecot.users[0])
    with pytest.raises(ImapError) as info:
        imap.connect(account, tls_dovecot.password, timeout=5)
    assert info.value.kind is FailureKind.TLS


def test_wrong_password_is_auth_and_never_echoed(tls_dovecot: Any) -> None:
    # On the TLS instance, last: Dovecot delays further logins from an IP after a failure,
    # which would slow every test sharing the session's server.
    account = make_account(tls_dovecot.host, tls_dovecot.port, tls="implicit",
                           username=tls_dovecot.users[1], tls_ca_file=str(tls_dovecot.ca_file))
    with pytest.raises(ImapError) as info:
        imap.connect(account, "wrong-" + SECRET, timeout=5)
    assert info.value.kind is FailureKind.AUTH
    assert SECRET not in str(info.value) and SECRET not in repr(info.value.args)


@pytest.mark.parametrize("scenario, words", [
    ("starttls_injection", "response injection"),
    ("too_many_connections", "does not offer STARTTLS"),  # a server without STARTTLS at all
])
def test_starttls_refusals_are_tls_errors(scenario: str, words: str) -> None:
    with HostileServer(scenario) as server:
        account = make_account(server.host, server.port, tls="starttls")
        with pytest.raises(ImapError) as info:
            imap.connect(account, SECRET, timeout=1)
    assert info.value.kind is FailureKind.TLS
    assert words in info.value.detail
