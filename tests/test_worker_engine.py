"""The worker connection engine (issue 5) through the real daemon, measured on the server's side.

Dovecot instances of this module record every client command with its time (``rawlog_dir``) and
log every login with microseconds, so the tests count what the server actually received: IDLE
commands and their spacing, STATUS polls, logins per account and per second. The scripted hostile
server (tests/hostile_imap.py) stands in only for misbehaviour no real server produces on demand;
it timestamps every connection it accepts.
"""

from __future__ import annotations

import os
import pwd
import random
import statistics
import time
from collections.abc import Iterator
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self

import pytest
from harness import Daemon, account_toml, wait_until
from hostile_imap import HostileServer, Session, fetch_response

from devtools.devservers import Dovecot
from mailingestd.fetch.sessions import RENEW_JITTER, IdleTimers

LOG_TIMESTAMP = 'log_timestamp = "%Y-%m-%d %H:%M:%S.%{usecs} "\n'


def rawlog_conf(root: Path) -> str:
    """Dovecot settings: microsecond log timestamps, and a rawlog of every session of the users
    whose directory exists under root/rawlog (one ``.in`` file per connection, lines timestamped)."""
    return LOG_TIMESTAMP + f"protocol imap {{\n  rawlog_dir = {root}/rawlog/%u\n}}\n"


def recording_dovecot(root: Path, idle: bool = True, users: int = 1) -> Dovecot:
    server = Dovecot(root, users=users, idle=idle, extra_conf=rawlog_conf(root))
    server.start()
    return server


@pytest.fixture(scope="module")
def idle_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A Dovecot with IDLE of this module's own (it is paused and recorded here)."""
    server = recording_dovecot(tmp_path_factory.mktemp("dovecot-idle-rawlog"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def noidle_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """Like the session's ``dovecot_noidle`` (IDLE left out of the capabilities), but recorded."""
    server = recording_dovecot(tmp_path_factory.mktemp("dovecot-noidle-rawlog"), idle=False)
    yield server
    server.stop()


def recorded_user(server: Dovecot) -> str:
    """A fresh user whose sessions Dovecot records (the rawlog directory must exist)."""
    user = server.new_user()
    directory = server.root / "rawlog" / user
    directory.mkdir(parents=True)
    dovecot_user = pwd.getpwnam("dovecot")
    os.chown(directory, dovecot_user.pw_uid, dovecot_user.pw_gid)
    return user


def daemon_sessions(server: Dovecot, user: str) -> list[list[tuple[float, str]]]:
    """The commands the daemon sent, one list of (unix time, line) per connection it made.

    The daemon's sessions are told apart from the test's own APPENDs by ENABLE CONDSTORE, which
    mailingestd.fetch.imap.connect sends first on every Dovecot connection.
    """
    sessions = []
    for path in sorted((server.root / "rawlog" / user).glob("*.in")):
        lines = []
        for raw in path.read_text(errors="replace").splitlines():
            stamp, _, line = raw.partition(" ")
            lines.append((float(stamp), line))
        if any(line.endswith("ENABLE CONDSTORE") for _, line in lines):
            sessions.append(lines)
    return sessions


def commands(session: list[tuple[float, str]], name: str) -> list[float]:
    """Times at which the client sent command ``name`` (``tag NAME ...``; ``DONE`` has no tag)."""
    if name == "DONE":
        return [t for t, line in session if line == "DONE"]
    return [t for t, line in session if line.split(" ", 2)[1:2] == [name]]


def login_times(server: Dovecot, user: str | None = None) -> list[float]:
    """Unix times of successful logins, from Dovecot's log (microsecond timestamps)."""
    needle = "imap-login: Info: Login: user=<" + (f"{user}>" if user else "")
    times = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if needle in line:
            times.append(datetime.strptime(line[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp())
    return times


def message(tag: str) -> bytes:
    return f"From: a@example.com\r\nMessage-ID: <{tag}@t>\r\nSubject: {tag}\r\n\r\nbody\r\n".encode()


def stored_at(daemon: Daemon, tag: str, timeout: float) -> float:
    """The store's ingested_at (unix time) of the message ``<tag@t>``, waiting for it to arrive."""
    rows = wait_until(lambda: daemon.query("SELECT ingested_at FROM messages WHERE message_id = ?",
                                           (f"<{tag}@t>",)), timeout, 0.05,
                      f"message <{tag}@t> stored\n{daemon.log_tail()}")
    return float(rows[0][0])


def idling(daemon: Daemon, count: int, timeout: float = 20) -> None:
    wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == count, timeout, 0.2,
               f"{count} idling connections\n{daemon.log_tail()}")


def no_restarts(daemon: Daemon) -> None:
    children = daemon.status()["children"]
    assert children and all(child["restarts"] == 0 for child in children), children


def imap_section(**keys: str) -> str:
    return "[imap]\n" + "".join(f'{key} = "{value}"\n' for key, value in keys.items())


# ---------------------------------------------------------------------------------------------
# IDLE against a real Dovecot


def test_mail_appended_to_an_idling_mailbox_is_stored_well_under_2s(idle_dovecot, tmp_path):
    user = recorded_user(idle_dovecot)
    with Daemon(tmp_path, accounts=account_toml(user, idle_dovecot.host, idle_dovecot.port),
                password=idle_dovecot.password) as daemon:
        idling(daemon, 1)
        latencies = []
        for n in range(5):
            appended_at = time.time()  # before the APPEND: the latency measured is an upper bound
            idle_dovecot.append(user, message(f"fast-{n}"))
            latencies.append(stored_at(daemon, f"fast-{n}", 10) - appended_at)
        assert max(latencies) < 1.5, latencies
        assert statistics.median(latencies) < 1.0, latencies
        # Entered IDLE, and again after each message (the last re-entry may follow the commit).
        wait_until(lambda: len(commands(daemon_sessions(idle_dovecot, user)[0], "IDLE")) >= 6, 5, 0.1,
                   "IDLE re-entered after each message")
        assert len(daemon_sessions(idle_dovecot, user)) == 1  # one login (the test's APPENDs log in too)


def test_idle_is_renewed_on_its_timer_and_mail_still_arrives(idle_dovecot, tmp_path):
    user = recorded_user(idle_dovecot)
    with Daemon(tmp_path, accounts=account_toml(user, idle_dovecot.host, idle_dovecot.port),
                password=idle_dovecot.password, sections=imap_section(idle_renew="2s")) as daemon:
        idling(daemon, 1)
        wait_until(lambda: len(commands(daemon_sessions(idle_dovecot, user)[0], "IDLE")) >= 5, 15, 0.2,
                   "five IDLE commands on the server (four renewals)")
        [session] = daemon_sessions(idle_dovecot, user)
        idles, dones = commands(session, "IDLE"), commands(session, "DONE")
        assert len(dones) >= len(idles) - 1  # each renewal ended the previous IDLE with DONE
        gaps = [later - earlier for earlier, later in pairwise(idles)]
        # The first renewal after the login falls anywhere in idle_renew (connections made together
        # renew spread out); every later one within its last RENEW_JITTER, never later than it
        # (+ the job's time).
        assert 0 < gaps[0] <= 2.0 + 0.3, gaps
        assert all(2.0 * (1 - RENEW_JITTER) <= gap <= 2.0 + 0.3 for gap in gaps[1:]), gaps
        appended_at = time.time()
        idle_dovecot.append(user, message("after-renewals"))
        assert stored_at(daemon, "after-renewals", 10) - appended_at < 1.5
        assert len(daemon_sessions(idle_dovecot, user)) == 1  # renewals reuse the connection


def test_dead_connection_is_detected_and_replaced_without_a_worker_restart(idle_dovecot, tmp_path):
    user = recorded_user(idle_dovecot)
    sections = imap_section(keepalive="3s", timeout="3s")
    with Daemon(tmp_path, accounts=account_toml(user, idle_dovecot.host, idle_dovecot.port),
                password=idle_dovecot.password, sections=sections) as daemon:
        idling(daemon, 1)
        idle_dovecot.pause()  # every Dovecot process stopped: the TCP session stays, nothing answers
        try:
            paused_at = time.monotonic()
            wait_until(lambda: "no reply to DONE" in daemon.log_path.read_text(), 15, 0.1,
                       "the keepalive probe to declare the connection dead\n" + daemon.log_tail())
            # At most keepalive (3 s, jittered down) of silence, then timeout (3 s) for the reply.
            assert time.monotonic() - paused_at < 3 + 3 + 1.0
            wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == 0, 5, 0.2, "IDLE given up")
        finally:
            idle_dovecot.resume()
        idle_dovecot.append(user, message("after-resume"))
        stored_at(daemon, "after-resume", 20)
        idling(daemon, 1)
        errors = daemon.status()["errors"]
        assert any(f"account={user}" in line and "error_kind=timeout" in line for line in errors), errors
        assert len(daemon_sessions(idle_dovecot, user)) == 2  # a new connection, not the old one revived
        wait_until(lambda: idle_dovecot.connected_sessions(user) == 1, 15, 0.5, "the dead session gone")
        no_restarts(daemon)


# ---------------------------------------------------------------------------------------------
# polling: a server without IDLE, or an account with idle = false


@pytest.mark.parametrize("case", ["server_without_idle", "account_idle_false"])
def test_polling_keeps_one_connection_and_finds_mail_by_status(case, idle_dovecot, noidle_dovecot, tmp_path):
    server = noidle_dovecot if case == "server_without_idle" else idle_dovecot
    user = recorded_user(server)
    extra: dict[str, Any] = {"priority": "high"}  # polled every 2 s (the harness's high_interval)
    if case == "account_idle_false":
        extra["idle"] = False
    with Daemon(tmp_path, accounts=account_toml(user, server.host, server.port, **extra),
                password=server.password) as daemon:
        wait_until(lambda: daemon_sessions(server, user)
                   and len(commands(daemon_sessions(server, user)[0], "STATUS")) >= 4, 20, 0.2,
                   "four STATUS polls\n" + daemon.log_tail())
        appended_at = time.time()
        server.append(user, message("polled"))
        stored_at(daemon, "polled", 10)
        sessions = daemon_sessions(server, user)
        assert len(sessions) == 1  # one login: polls reuse the connection
        statuses = commands(sessions[0], "STATUS")
        assert commands(sessions[0], "IDLE") == []
        # Only a STATUS showing news leads to EXAMINE and the fetch: one poll after the APPEND did.
        names = [(t, line.split(" ")[1]) for t, line in sessions[0] if " " in line]
        examines = [i for i, (t, name) in enumerate(names) if name == "EXAMINE" and t > appended_at]
        assert len(examines) == 1 and names[examines[0] - 1][1] == "STATUS", names
        assert [name for _, name in names[examines[0]:examines[0] + 3]] == ["EXAMINE", "UID", "UID"]
        gaps = [later - earlier for earlier, later in pairwise(statuses)]
        assert min(gaps) > 1.0, gaps  # on the scheduler's schedule, not in a loop
        assert daemon.status()["traffic"]["idle_connections"] == 0
        no_restarts(daemon)


def test_two_folders_of_one_account_are_ingested(idle_dovecot, tmp_path):
    user = recorded_user(idle_dovecot)
    idle_dovecot.append(user, message("archive-0"), folder="Archive")
    idle_dovecot.append(user, message("inbox-0"))
    accounts = account_toml(user, idle_dovecot.host, idle_dovecot.port, folders=["INBOX", "Archive"])
    with Daemon(tmp_path, accounts=accounts, password=idle_dovecot.password,
                sections=imap_section(idle_renew="2s")) as daemon:
        stored_at(daemon, "archive-0", 15)
        stored_at(daemon, "inbox-0", 15)
        idling(daemon, 1)
        idle_dovecot.append(user, message("archive-1"), folder="Archive")
        idle_dovecot.append(user, message("inbox-1"))
        stored_at(daemon, "inbox-1", 5)  # INBOX idles
        stored_at(daemon, "archive-1", 5)  # Archive: STATUS at the next IDLE renewal
        folders = dict(daemon.query("SELECT message_id, folder FROM messages"))
        assert folders == {"<archive-0@t>": "Archive", "<archive-1@t>": "Archive",
                           "<inbox-0@t>": "INBOX", "<inbox-1@t>": "INBOX"}
        [session] = daemon_sessions(idle_dovecot, user)
        assert any('STATUS "Archive"' in line for _, line in session)
        assert len(daemon_sessions(idle_dovecot, user)) == 1  # one login (the test's APPENDs log in too)


# ---------------------------------------------------------------------------------------------
# a Dovecot restart under hundreds of idling accounts


@pytest.mark.timeout(240)
def test_restart_with_300_idling_accounts_reconnects_within_the_bucket(tmp_path):
    accounts, rate = 300, 1200  # connects_per_minute for 127.0.0.1: 20/s, burst of 10 s' worth
    burst = rate * 10 / 60
    server = Dovecot(tmp_path / "dovecot", users=0, extra_conf=LOG_TIMESTAMP)
    server.start()
    try:
        users = [server.new_user() for _ in range(accounts)]
        sections = (f'[limits.servers."{server.host}"]\nconnects_per_minute = {rate}\n'
                    "max_connections_per_server = 1000\n")
        with Daemon(tmp_path / "daemon", password=server.password, sections=sections,
                    accounts="".join(account_toml(u, server.host, server.port) for u in users)) as daemon:
            idling(daemon, accounts, timeout=90)
            before = len(login_times(server))
            assert before == accounts
            server.restart()
            restarted_at = time.time()
            idling(daemon, accounts, timeout=120)
            wait_until(lambda: server.connected_sessions() == accounts, 30, 0.5, "every session on the server")
            logins = sorted(login_times(server)[before:])
            assert len(logins) == accounts and logins[0] >= restarted_at - 1
            for window in (1, 2, 5, 10, 20):
                busiest = max(sum(1 for t in logins[i:] if t < start + window) for i, start in enumerate(logins))
                # The bucket's bound for any window of W seconds, +1 for a token earned as it opens.
                assert busiest <= burst + rate * window / 60 + 1, (window, busiest)
            # Not a storm: after a burst of at most 200, the rest came at no more than 20 a second.
            assert logins[-1] - logins[0] >= (accounts - burst - 1) / (rate / 60) * 0.9
            no_restarts(daemon)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# hostile servers and provider throttling (tests/hostile_imap.py), through the daemon


def announced_never_sent(session: Session) -> None:
    """A 50 MB literal (within max_literal) announced, 1 KiB sent, then silence."""
    session.greet()
    session.serve_until(b"UID FETCH")
    session.send(b"* 1 FETCH (UID 1 RFC822.SIZE 50000000 BODY[] {50000000}\r\n" + b"x" * 1024)
    session.hold()


def office365_backoff_3s(session: Session) -> None:
    """Office 365 throttling with a suggested wait longer than our own first backoffs."""
    session.greet()
    tag, _ = session.serve_until(b"UID FETCH")
    session.send(tag + b" BAD Request is throttled. Suggested Backoff Time: 3000 milliseconds\r\n"
                 b"* BYE Connection closed. 14\r\n")


class HostileFleet:
    """One hostile server per scenario, each on its own loopback address (its own server limits)."""

    def __init__(self, scenarios: dict[str, Any]) -> None:
        self.servers = {name: HostileServer(scenario, host=f"127.0.0.{n + 2}")
                        for n, (name, scenario) in enumerate(scenarios.items())}

    def __enter__(self) -> Self:
        for server in self.servers.values():
            server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers.values():
            server.stop()

    def accounts(self) -> str:
        return "".join(account_toml(name, server.host, server.port, id=name)
                       for name, server in self.servers.items())


def failures_logged(daemon: Daemon, account: str) -> list[str]:
    return [line for line in daemon.log_path.read_text(errors="replace").splitlines()
            if "event=poll_failed" in line and f"account={account} " in line]


BROKEN = {  # scenario: the error kind it must produce
    "garbage_greeting": "protocol",
    "endless_line": "protocol",
    "huge_literal": "protocol",
    "announced_never_sent": "timeout",
    "stall_mid_fetch": "timeout",
    "unexpected_bye": "network",
}


@pytest.mark.timeout(90)
def test_broken_servers_cost_one_connection_and_one_error_each_never_a_worker(tmp_path):
    scenarios = {name: announced_never_sent if name == "announced_never_sent" else name for name in BROKEN}
    sections = imap_section(timeout="2s", max_line="1MiB")
    with HostileFleet(scenarios) as fleet, Daemon(tmp_path, accounts=fleet.accounts(), password="pw",
                                                   sections=sections) as daemon:
        wait_until(lambda: all(s.connections >= 3 for s in fleet.servers.values()), 60, 0.2,
                   "three connections to every hostile server\n" + daemon.log_tail())
        status = daemon.status()
        for name, kind in BROKEN.items():
            accepted = fleet.servers[name].connections
            logged = failures_logged(daemon, name)
            # One error line per connection (the latest connection may still be failing).
            assert accepted - 1 <= len(logged) <= accepted, (name, accepted, logged)
            assert all(f"error_kind={kind} " in line for line in logged), (name, logged)
            assert all(len(line) < 600 for line in logged)  # one bounded line each
        shown = " ".join(status["errors"])
        assert all(f"account={name} " in shown for name in BROKEN), status["errors"]
        workers = [c for c in status["children"] if c["role"] == "worker"]
        assert all(c["rss_bytes"] < 128 * 1024 * 1024 for c in workers), workers  # 1 MiB lines, 50 MB literal
        no_restarts(daemon)


THROTTLING = ["too_many_connections", "overquota", "throttled", "office365_backoff_3s"]


@pytest.mark.timeout(90)
def test_throttling_replies_are_surfaced_and_the_suggested_backoff_is_honoured(tmp_path):
    scenarios: dict[str, Any] = {name: name for name in THROTTLING}
    scenarios["office365_backoff_3s"] = office365_backoff_3s
    with HostileFleet(scenarios) as fleet, Daemon(tmp_path, accounts=fleet.accounts(), password="pw",
                                                   sections=imap_section(timeout="2s")) as daemon:
        office = fleet.servers["office365_backoff_3s"]
        wait_until(lambda: office.connections >= 3 and all(s.connections >= 2 for s in fleet.servers.values()),
                   60, 0.2, "repeated connections to every throttling server\n" + daemon.log_tail())
        for name in THROTTLING:
            logged = failures_logged(daemon, name)
            assert logged and all("error_kind=throttled " in line for line in logged), (name, logged)
        shown = daemon.status()["errors"]
        for name in THROTTLING:
            assert any(f"account={name} " in line and "error_kind=throttled" in line for line in shown), shown
        # Without the suggestion the first retries come within 1-2 s (backoff_base 1 s, full jitter).
        gaps = [b - a for a, b in pairwise(office.accepted_at)]
        assert gaps and min(gaps) >= 3.0, gaps
        no_restarts(daemon)


def literal_during_idle(session: Session) -> None:
    """After the IDLE continuation, a 67 MB literal announced and dripped a byte a second: a
    response that would hold whoever reads it for as long as the server likes."""
    session.greet()
    session.serve_until(b"IDLE")
    session.send(b"+ idling\r\n")
    session.sleep(0.5)
    session.send(b"* 1 FETCH (UID 1 BODY[] {67000000}\r\n")
    session.drip(b"x" * 120, every=1.0)


@pytest.mark.timeout(120)
def test_a_literal_during_idle_costs_one_connection_never_the_worker(idle_dovecot, hostile, tmp_path):
    dripper = hostile(literal_during_idle, host="127.0.0.2")
    user = recorded_user(idle_dovecot)
    accounts = (account_toml("dripper", dripper.host, dripper.port, id="dripper")
                + account_toml(user, idle_dovecot.host, idle_dovecot.port))
    # One worker holds both accounts; heartbeat_timeout 5 s would kill a worker whose loop blocks.
    with Daemon(tmp_path, accounts=accounts, password=idle_dovecot.password, workers=1) as daemon:
        wait_until(lambda: dripper.connections >= 1, 20, 0.1, "the hostile server reached")
        idling(daemon, 1)
        latencies = []
        for n in range(8):
            appended_at = time.time()
            idle_dovecot.append(user, message(f"beside-{n}"))
            latencies.append(stored_at(daemon, f"beside-{n}", 10) - appended_at)
            time.sleep(0.5)
        assert max(latencies) < 3.0, latencies
        logged = failures_logged(daemon, "dripper")
        assert logged and any("error_kind=protocol" in line and "literal" in line for line in logged), logged
        # Backed off: not reconnected at once after each refusal (backoff_base 1 s, jittered).
        gaps = [b - a for a, b in pairwise(dripper.accepted_at)]
        assert all(gap >= 0.2 for gap in gaps), gaps
        no_restarts(daemon)


def answer_for_messages(session: Session, tag: bytes, name: bytes, rest: bytes, exists: int, prefix: str) -> None:
    """Answer one command as a folder holding UIDs 1..``exists`` (message ``<{prefix}{uid}@t>``)."""
    if name in (b"SELECT", b"EXAMINE"):
        session.send(b"* FLAGS (\\Seen)\r\n* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n"
                     b"* OK [UIDNEXT %d] next\r\n%s OK [READ-ONLY] done\r\n" % (exists, exists + 1, tag))
    elif name == b"STATUS":
        folder = rest.split(b" (", 1)[0]
        session.send(b"* STATUS %s (UIDVALIDITY 7 UIDNEXT %d MESSAGES %d)\r\n%s OK done\r\n"
                     % (folder, exists + 1, exists, tag))
    elif name == b"UID SEARCH":
        first = int(rest.split(b"UID ", 1)[-1].split(b":", 1)[0]) if b":" in rest else 1
        uids = b" ".join(b"%d" % uid for uid in range(max(first, 1), exists + 1))
        session.send(b"* SEARCH " + uids + b"\r\n" + tag + b" OK done\r\n")
    elif name == b"UID FETCH":
        wanted = {int(uid) for uid in rest.split(b" ", 1)[0].split(b",") if uid.isdigit()}
        replies = b"".join(fetch_response(uid, message(f"{prefix}{uid}")) for uid in sorted(wanted) if uid <= exists)
        session.send(replies + tag + b" OK done\r\n")
    else:
        session.answer(tag, name, rest)


def mail_announced_with_the_continuation(session: Session) -> None:
    """Dovecot's race, on demand: a message delivered between the client's last EXAMINE and its
    IDLE is announced at once, in the same segment as the ``+`` continuation. A client that reads
    the continuation and then waits for its socket to become readable never sees it."""
    session.greet()
    exists, idles = 1, 0
    while True:
        tag, name, rest = session.read_command()
        if name == b"IDLE":
            idles += 1
            if idles == 1:
                exists = 2
                session.send(b"+ idling\r\n* 2 EXISTS\r\n")
            else:
                session.send(b"+ idling\r\n")
            session.read_line()  # DONE
            session.send(tag + b" OK Idle completed\r\n")
        else:
            answer_for_messages(session, tag, name, rest, exists, "race")


@pytest.mark.timeout(60)
def test_mail_announced_with_the_idle_continuation_is_fetched_at_once(tmp_path):
    server = HostileServer(mail_announced_with_the_continuation)
    server.start()
    try:
        with Daemon(tmp_path, accounts=account_toml("race", server.host, server.port, id="race"),
                    password="pw") as daemon:
            stored_at(daemon, "race1", 20)
            # Renewal is 10 minutes away: only reading what came with the continuation finds it.
            stored_at(daemon, "race2", 5)
            no_restarts(daemon)
    finally:
        server.stop()


def mail_never_announced_in_idle(session: Session) -> None:
    """A server whose IDLE never reports new mail (no EXISTS): a second message is there from the
    first renewal on, and only that renewal's EXAMINE can show it (UIDNEXT 3)."""
    session.greet()
    exists, idles = 1, 0
    while True:
        tag, name, rest = session.read_command()
        if name == b"IDLE":
            idles += 1
            exists = 2 if idles >= 2 else 1
        answer_for_messages(session, tag, name, rest, exists, "silent")


@pytest.mark.timeout(60)
def test_mail_a_server_never_announces_is_found_by_the_renewal(hostile, tmp_path):
    """The renewal checks the folder it idles on (EXAMINE): mail the server's IDLE kept quiet
    about is stored by the first renewal, on the same connection."""
    server = hostile(mail_never_announced_in_idle)
    with Daemon(tmp_path, accounts=account_toml("silent", server.host, server.port, id="silent"), password="pw",
                sections=imap_section(idle_renew="2s")) as daemon:
        stored_at(daemon, "silent1", 20)
        stored_at(daemon, "silent2", 10)  # idle_renew is 2 s: the first renewal, at most
        idling(daemon, 1)
        assert server.connections == 1
        no_restarts(daemon)


def slow_examine_after_idle(session: Session) -> None:
    """A server slow to answer EXAMINE once the connection has idled: every renewal (DONE,
    EXAMINE, IDLE) keeps the connection out of IDLE for 1.5 s, a good part of each cycle."""
    session.greet()
    idled = 0
    while True:
        tag, name, rest = session.read_command()
        if name == b"IDLE":
            idled += 1
        elif name == b"EXAMINE" and idled:
            session.sleep(1.5)
        session.answer(tag, name, rest)


@pytest.mark.timeout(60)
def test_a_connection_renewing_its_idle_still_counts_as_idling(hostile, tmp_path):
    """The idle_connections gauge (and status) counts the accounts held in IDLE: a renewal in
    progress takes its connection out of IDLE for a moment, not out of the count (10,000 sessions
    renew about 17 times a second; the gauge would never read the number of accounts held)."""
    server = hostile(slow_examine_after_idle)
    with Daemon(tmp_path, accounts=account_toml("slow", server.host, server.port, id="slow"), password="pw",
                sections=imap_section(idle_renew="2s")) as daemon:
        idling(daemon, 1)
        readings = []
        for _ in range(24):  # 6 s: about three renewals, each 1.5 s out of IDLE
            readings.append(daemon.status()["traffic"]["idle_connections"])
            time.sleep(0.25)
        assert readings == [1] * len(readings), readings
        assert server.connections == 1  # renewals, not reconnects
        no_restarts(daemon)


# ---------------------------------------------------------------------------------------------
# the loop's timers (pure): renewals spread, bounded work per turn, stale entries dropped


def sessions(count: int) -> list[Any]:
    return [SimpleNamespace(generation=0, busy=False, idling=True, probe_deadline=None, heard_at=0.0,
                            renew_at=0.0, keepalive_after=0.0) for _ in range(count)]


def test_renewals_of_sessions_that_entered_idle_together_are_spread():
    timers = IdleTimers(renew_after=600, keepalive=3600, rng=random.Random(5))
    crowd = sessions(10_000)
    for session in crowd:
        timers.start(session, now=0.0)
    assert timers.due(479.0, 10_000) == []  # nothing before 80% of idle_renew
    per_second = [len(timers.due(float(t), 10_000)) for t in range(480, 601)]
    assert sum(per_second) == 10_000  # all renewed by idle_renew, never later
    assert max(per_second) < 150  # about 10,000 / 120 s = 83 a second, not 10,000 at once
    assert timers.due(10_000.0, 10) == []


def test_first_renewals_after_connecting_together_come_at_the_steady_rate_not_in_a_wave():
    """10,000 sessions that connected together (a start, a reconnect storm) renew over the whole
    interval from the start, as many a minute as later on; the ones that follow keep to the last
    RENEW_JITTER of theirs."""
    timers = IdleTimers(renew_after=600, keepalive=3600, rng=random.Random(7))
    crowd = sessions(10_000)
    for session in crowd:
        timers.start(session, now=0.0, connected=True)
    per_minute = [len(timers.due(float(t), 10_000)) for t in range(60, 601, 60)]
    assert sum(per_minute) == 10_000  # every session renewed within one interval, never later
    assert all(800 <= n <= 1_200 for n in per_minute), per_minute  # 10,000 / 10 minutes, from the first
    for session in crowd:  # the renewal re-enters IDLE on the same connection
        timers.start(session, now=600.0)
    assert timers.due(600.0 + 479.0, 10_000) == []


def test_timers_hand_out_at_most_the_limit_and_drop_stale_entries():
    timers = IdleTimers(renew_after=10, keepalive=5, rng=random.Random(1))
    crowd = sessions(100)
    for session in crowd:
        timers.start(session, now=0.0)
    for session in crowd[:50]:
        session.heard_at = 4.5  # heard from: keepalive moves on
    crowd[50].busy = True
    crowd[51].idling = False
    first = timers.due(5.0, 10)
    assert len(first) == 10 and all(s in crowd[52:] for s in first)
    rest = timers.due(5.0, 1000)
    assert len(rest) == 48 - 10 and crowd[50] not in rest and crowd[51] not in rest
    assert len(timers.due(9.5, 1000)) == 50  # the heard-from ones, at their new keepalive
    for _ in range(50):  # re-entering IDLE often leaves stale entries: compaction bounds the heap
        for session in crowd:
            timers.start(session, now=20.0)
        timers.compact(len(crowd))
    assert len(timers.heap) <= 2 * len(crowd) + 1024 + len(crowd)


def test_batches_commit_in_uid_order_beside_the_next_fetch_and_a_failed_commit_stops_the_rest(dovecot, mailbox,
                                                                                               tmp_path):
    """ingest.sync_folder commits batch N on a helper thread while batch N+1 is fetched: the
    commits still run one at a time in UID order, a failed commit leaves the checkpoint at the
    last batch committed before it and commits nothing after it, and the retry stores every
    message exactly once (rules 2 and 5)."""
    import threading

    from mailingestd.config import AccountConfig, ImapConfig
    from mailingestd.fetch import imap
    from mailingestd.fetch.ingest import sync_folder
    from mailingestd.store.store import StoreError, open_store

    uids = [dovecot.append(mailbox, f"Message-ID: <p{n}@test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode())
            for n in range(60)]
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    settings = ImapConfig(batch_messages=10)
    account = AccountConfig(id=mailbox, host=dovecot.host, port=dovecot.port, tls="none", username=mailbox,
                            password_env="UNUSED")
    commit_batch = store.commit_batch
    commits: list[tuple[int, str, bool]] = []  # (settled uid, thread, another commit was running)
    running = threading.Lock()

    def recording_commit(mailbox_state, messages, settled_uid, **kwargs):
        overlapped = not running.acquire(blocking=False)
        try:
            commits.append((settled_uid, threading.current_thread().name, overlapped))
            if len(commits) == 3 and fail:
                raise StoreError("refused for the test")
            return commit_batch(mailbox_state, messages, settled_uid, **kwargs)
        finally:
            if not overlapped:
                running.release()

    store.commit_batch = recording_commit
    try:
        fail = True
        client = imap.connect(account, dovecot.password, timeout=30)
        try:
            with pytest.raises(StoreError):
                sync_folder(client, store, mailbox, "INBOX", settings)
        finally:
            imap.logout(client)
        assert [uid for uid, _, _ in commits] == [uids[9], uids[19], uids[29]]
        assert not any(overlapped for _, _, overlapped in commits)
        assert all(thread != threading.current_thread().name for _, thread, _ in commits)
        assert store.get_mailbox(mailbox, "INBOX").last_uid == uids[19]
        assert store.counts()["messages"] == 20

        fail, commits[:] = False, []
        client = imap.connect(account, dovecot.password, timeout=30)
        try:
            result = sync_folder(client, store, mailbox, "INBOX", settings)
        finally:
            imap.logout(client)
        assert [uid for uid, _, _ in commits] == [uids[n] for n in range(29, 60, 10)]
        assert result.new_messages == 40 and result.settled_uid == uids[-1]
        assert store.get_mailbox(mailbox, "INBOX").last_uid == uids[-1]
        counts = store.counts()
        assert counts["messages"] == counts["outbox"] == 60
    finally:
        store.close()
