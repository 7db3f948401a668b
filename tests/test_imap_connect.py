"""What a new connection costs at the IMAP edge: round trips, memory kept per idling session, TLS setup.

A worker holds thousands of idling connections, and every one of them was opened by
``imap.connect`` + ``examine`` + ``idle_start``. The scripted server (tests/hostile_imap.py) records
the commands the client sent, and whether the command after ENABLE came before ENABLE's reply
(pipelined); Dovecot checks the memory each session keeps.
"""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace
from typing import Any

import pytest

from mailingestd.fetch import imap
from mailingestd.fetch.imap import FailureKind, ImapError
from hostile_imap import HostileServer, Session

SECRET = "hunter2-do-not-log"
AFTER_LOGIN = b"IMAP4rev1 IDLE ENABLE CONDSTORE UNSELECT"


def account(host: str, port: int, **extra: Any) -> SimpleNamespace:
    fields = {"id": "acct-1", "host": host, "port": port, "tls": "none", "username": "user1",
              "tls_ca_file": None, "tls_verify": True}
    return SimpleNamespace(**{**fields, **extra})


def recording(commands: list[bytes], *, greeting_caps: bool = True, login_caps: bool = True,
              enable_reply: bytes = b"OK ENABLE completed") -> Any:
    """A well-behaved server that records every command name and answers ENABLE only once the next
    command has arrived, or after a second: a command that came first is recorded as pipelined."""

    def scenario(session: Session) -> None:
        caps = b"[CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] " if greeting_caps else b""
        session.send(b"* OK " + caps + b"scripted server ready\r\n")
        while True:
            tag, name, rest = session.read_command()
            commands.append(name)
            if name == b"LOGIN":
                code = b"[CAPABILITY " + AFTER_LOGIN + b"] " if login_caps else b""
                session.send(tag + b" OK " + code + b"Logged in\r\n")
            elif name == b"CAPABILITY" and commands.count(b"LOGIN"):
                session.send(b"* CAPABILITY " + AFTER_LOGIN + b"\r\n" + tag + b" OK done\r\n")
            elif name == b"ENABLE":
                following = session.read_command_within(1.0)
                if following is not None:
                    commands.append(b"(pipelined) " + following[1])
                enabled = b"* ENABLED CONDSTORE\r\n" if enable_reply.startswith(b"OK") else b""
                session.send(enabled + tag + b" " + enable_reply + b"\r\n")
                if following is None:
                    continue
                if following[1] == b"EXAMINE":
                    session.send(b"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 1] ok\r\n"
                                 b"* OK [HIGHESTMODSEQ 5] ok\r\n" + following[0] + b" OK [READ-ONLY] done\r\n")
                else:
                    session.answer(*following)
            else:
                session.answer(tag, name, rest)

    return scenario


@pytest.mark.timeout(20)
def test_connect_examine_idle_is_three_round_trips() -> None:
    """Capabilities from the greeting and from LOGIN's OK (no CAPABILITY command), ENABLE CONDSTORE
    pipelined with the EXAMINE that follows, then IDLE."""
    commands: list[bytes] = []
    with HostileServer(recording(commands)) as server:
        client = imap.connect(account(server.host, server.port), SECRET, timeout=2)
        assert {"IDLE", "CONDSTORE", "ENABLE"} <= imap.capabilities(client)
        state = imap.examine(client, "INBOX")
        assert state.highestmodseq == 5 and state.uidvalidity == 7
        assert imap.idle_start(client) + imap.idle_read(client) == []
        imap.idle_stop(client, 2)
        imap.logout(client, 1)
    assert commands == [b"LOGIN", b"ENABLE", b"(pipelined) EXAMINE", b"IDLE", b"LOGOUT"]


@pytest.mark.timeout(20)
def test_servers_that_send_no_capabilities_unasked_are_asked() -> None:
    commands: list[bytes] = []
    with HostileServer(recording(commands, greeting_caps=False, login_caps=False)) as server:
        client = imap.connect(account(server.host, server.port), SECRET, timeout=2)
        assert "CONDSTORE" in imap.capabilities(client)
        imap.examine(client, "INBOX")
        imap.logout(client, 1)
    assert commands == [b"CAPABILITY", b"LOGIN", b"CAPABILITY", b"ENABLE", b"(pipelined) EXAMINE", b"LOGOUT"]


@pytest.mark.timeout(20)
def test_idle_right_after_connect_reads_the_enable_reply_first() -> None:
    """IDLE's lines are read by hand: a reply still owed to a pipelined command is read before."""
    commands: list[bytes] = []
    with HostileServer(recording(commands)) as server:
        client = imap.connect(account(server.host, server.port), SECRET, timeout=2)
        assert imap.idle_start(client) + imap.idle_read(client) == []
        assert imap.idling(client)
        imap.idle_stop(client, 2)
        imap.logout(client, 1)
    assert commands[:3] == [b"LOGIN", b"ENABLE", b"IDLE"]  # IDLE only after ENABLE's reply


@pytest.mark.timeout(20)
@pytest.mark.parametrize("reply", [b"NO not now", b"BAD what"])
def test_a_refused_pipelined_enable_fails_the_next_command(reply: bytes) -> None:
    with HostileServer(recording([], enable_reply=reply)) as server:
        client = imap.connect(account(server.host, server.port), SECRET, timeout=2)
        with pytest.raises(ImapError) as info:
            imap.examine(client, "INBOX")
        imap.close(client)
    assert info.value.kind is FailureKind.PROTOCOL
    assert "ENABLE" in info.value.detail and SECRET not in str(info.value)


def test_an_idling_dovecot_session_keeps_a_few_kib(dovecot: Any) -> None:
    """What the edge keeps per idling session (imaplib's unread 8 KiB reader, its ten-line history,
    a regex per connection, SELECT's untagged lists and per-session copies of the capability list
    were the bulk, about 19 KiB)."""
    users = [dovecot.new_user() for _ in range(30)]
    first = imap.connect(account(dovecot.host, dovecot.port, username=users[0]), dovecot.password, timeout=5)
    clients = [first]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for user in users[1:]:
            client = imap.connect(account(dovecot.host, dovecot.port, username=user), dovecot.password, timeout=5)
            clients.append(client)
            imap.examine(client, "INBOX")
            imap.idle_start(client)
            imap.idle_read(client)
        per_session = (tracemalloc.get_traced_memory()[0] - before) / (len(clients) - 1)
    finally:
        tracemalloc.stop()
        for client in clients:
            imap.logout(client, 2)
    assert per_session < 6 * 1024, f"{per_session:.0f} bytes per idling session"
