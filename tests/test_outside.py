"""Nothing from outside takes the daemon down or makes it forget: hostile server delays, restarts
against the auth breaker, the watchdog while one worker crash-loops (docs/reliability.md)."""

from __future__ import annotations

import json
import math
import random
import re
import time

import pytest
from harness import Daemon, account_toml, wait_until
from hostile_imap import HostileServer, Session
from hypothesis import given
from hypothesis import strategies as st

from mailingestd import config
from mailingestd.backoff import retry_delay
from mailingestd.config import LimitsConfig, SchedulerConfig
from mailingestd.envelope import make_envelope
from mailingestd.fetch.imap import classify
from mailingestd.sched.planner import AccountPlan, AccountState, Planner
from mailingestd.store.store import StoredMessage

SCHEDULER = SchedulerConfig(high_interval=60, medium_interval=300, low_interval=900, idle_safety_interval=900,
                            backoff_base=5, backoff_max=900, auth_failure_limit=3, tick=0.1)
LIMITS = LimitsConfig(max_connections_per_server=100, connects_per_minute=10**6, max_connections_per_account=2)
ABSURD = b"Request is throttled. Suggested Backoff Time: 999999999999999999999 milliseconds"


# --- a delay the server suggests --------------------------------------------------------------------
@given(retry_after=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30)),
       attempt=st.integers(0, 100), seed=st.integers())
def test_a_suggested_delay_is_clamped_to_backoff_max(retry_after: float, attempt: int, seed: int) -> None:
    delay = retry_delay(attempt, 5.0, 900.0, random.Random(seed), retry_after)
    assert math.isfinite(delay) and 0.0 <= delay <= 900.0


def test_the_imap_edge_never_reports_an_absurd_delay() -> None:
    error = classify(Exception(b"NO [THROTTLED] " + ABSURD))
    assert error.retry_after is not None and math.isfinite(error.retry_after) and error.retry_after <= 86400


@pytest.mark.parametrize("retry_after", [1e18, math.inf, math.nan, -5.0])
def test_one_absurd_retry_after_parks_one_account_and_the_planner_goes_on(retry_after: float) -> None:
    planner = Planner(SCHEDULER, LIMITS, now=0.0, rng=random.Random(1))
    for name in ("bad", "good"):
        planner.add(AccountPlan(account_id=name, server="imap.example", priority="high"), 0.0)
    due = {order.account_id for order in planner.due(20.0, 10)}
    assert due == {"bad", "good"}
    planner.on_result("bad", 20.0, ok=False, failure_kind="throttled", retry_after=retry_after, connected=False,
                      idling=False)
    planner.on_result("good", 20.0, ok=True, connected=False, idling=False)
    assert planner.state_of("bad") == AccountState.BACKOFF
    wakeup = planner.next_wakeup(20.0)
    assert wakeup is not None and wakeup <= 20.0 + SCHEDULER.backoff_max
    seen = {order.account_id for order in planner.due(20.0 + SCHEDULER.backoff_max + 100, 10)}
    assert seen == {"bad", "good"}


def absurd_backoff(session: Session) -> None:
    """Office 365's throttling reply, with a Suggested Backoff Time of 10**21 milliseconds."""
    session.greet()
    tag, _ = session.serve_until(b"EXAMINE")
    session.send(tag + b" NO [THROTTLED] " + ABSURD + b"\r\n")
    session.serve_until(b"NEVER")


def test_an_absurd_suggested_backoff_leaves_every_child_in_place(dovecot, tmp_path) -> None:
    good = dovecot.new_user()
    with HostileServer(absurd_backoff) as server:
        accounts = (account_toml(good, dovecot.host, dovecot.port)
                    + account_toml("u", server.host, server.port, id="throttled"))
        with Daemon(tmp_path, accounts=accounts, password=dovecot.password, workers=1) as daemon:
            wait_until(lambda: server.connections >= 1, 20, what="the throttled account to connect")
            wait_until(lambda: any("throttled" in line for line in daemon.status()["errors"]), 15,
                       what="the throttled account's error in status\n" + daemon.log_tail())
            for n in range(5):
                sent = time.monotonic()
                dovecot.append(good, f"Message-ID: <absurd-{n}@t>\r\nSubject: {n}\r\n\r\nbody\r\n".encode())
                daemon.wait_stored(n + 1, timeout=10)
                assert time.monotonic() - sent < 3.0, daemon.log_tail()
            status = daemon.status()
            restarts = {c["role"]: c["restarts"] for c in status["children"]}
            assert restarts == {"scheduler": 0, "worker": 0}, daemon.log_tail()
            assert "Traceback" not in daemon.log_path.read_text()


# --- the auth breaker across restarts -----------------------------------------------------------------
def failed_logins(dovecot, user: str) -> int:
    text = dovecot.log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "auth failed" in line and f"user=<{user}>" in line)


def test_a_wrong_password_costs_auth_failure_limit_logins_across_restarts(dovecot, tmp_path) -> None:
    """auth_failed is state: restarts do not buy more wrong logins (a real provider locks the mailbox);
    an operator's ``account enable`` or new credentials lift it."""
    good, bad = dovecot.new_user(), dovecot.new_user()
    secret = tmp_path / "bad.secret"
    secret.write_text("wrong\n")
    accounts = (account_toml(good, dovecot.host, dovecot.port)
                + f'\n[[accounts]]\nid = "bad"\nhost = "{dovecot.host}"\nport = {dovecot.port}\ntls = "none"\n'
                  f'username = "{bad}"\npassword_file = "{secret}"\n')
    daemon = Daemon(tmp_path / "d", accounts=accounts, password=dovecot.password, workers=1)
    config = daemon.config_path.read_text()
    daemon.config_path.write_text(config.replace("[scheduler]\n", "[scheduler]\nauth_failure_limit = 2\n", 1))

    def auth_failed() -> int:
        return int(daemon.status()["accounts"]["by_state"].get("auth_failed", 0))

    for run in range(4):  # the first run and three restarts
        with daemon:
            if run == 0:
                wait_until(lambda: auth_failed() == 1, 30, 0.3, "auth_failed\n" + daemon.log_tail())
            dovecot.append(good, f"Message-ID: <restart-{run}@t>\r\n\r\nbody\r\n".encode())
            daemon.wait_stored(run + 1)  # the good account was polled: the bad one had its chance too
            time.sleep(2.5)  # backoff_base is 1 s: a forgotten breaker tries again within this
            assert auth_failed() == 1, daemon.log_tail()
        assert failed_logins(dovecot, bad) == 2, f"run {run}: {failed_logins(dovecot, bad)} failed logins"

    with daemon:  # the operator re-enables it: it may try again (and fails again, up to the limit)
        assert auth_failed() == 1
        daemon.ctl("account", "enable", "bad")
        wait_until(lambda: failed_logins(dovecot, bad) == 4, 20, 0.3, "two more tries after enable")
        wait_until(lambda: auth_failed() == 1, 10, 0.3, "auth_failed again")
    secret.write_text(dovecot.password + "\n")  # new credentials while the daemon is down
    with daemon:
        wait_until(lambda: dovecot.login_count(bad) >= 1, 20, 0.3, "the account with new credentials to log in")
        assert auth_failed() == 0 and failed_logins(dovecot, bad) == 4


# --- what the configuration lets in ---------------------------------------------------------------------
@pytest.mark.parametrize("account_id", ["has space", "naïve", "x" * 129, "tab\there", "a/b", ""])
def test_account_ids_sqs_refuses_as_message_group_id_are_refused(tmp_path, account_id: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[[accounts]]\nid = "{account_id}"\nhost = "h"\nusername = "u"\npassword_env = "P"\n'
                    .replace("\t", "\\t"))
    with pytest.raises(config.ConfigError, match="accounts\\[0\\].*id"):
        config.load(str(path), environ={})


@pytest.mark.parametrize("account_id", ["support@acme.example", "a" * 128, "Acme_Corp-01.(eu)!~"])
def test_account_ids_sqs_takes_are_accepted(tmp_path, account_id: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[[accounts]]\nid = "{account_id}"\nhost = "h"\nusername = "u"\npassword_env = "P"\n')
    assert config.load(str(path), environ={}).accounts[0].id == account_id


def test_imap_batch_messages_has_an_upper_bound(tmp_path) -> None:
    """A batch goes to PostgreSQL as one multi-row statement, which takes at most 65,535 parameters."""
    path = tmp_path / "c.toml"
    path.write_text("[imap]\nbatch_messages = 5000\n")
    with pytest.raises(config.ConfigError, match="imap.batch_messages"):
        config.load(str(path), environ={})
    path.write_text(f"[imap]\nbatch_messages = {config.MAX_BATCH_MESSAGES}\n")
    assert config.load(str(path), environ={}).imap.batch_messages == config.MAX_BATCH_MESSAGES


# --- silent or stuck folders ------------------------------------------------------------------------------
def metric(daemon: Daemon, name: str) -> float:
    path = daemon.metrics_dir / "mailingestd.prom"
    text = path.read_text() if path.exists() else ""
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


def test_a_message_over_the_size_limit_shows_its_stuck_folder_or_is_skipped(dovecot, tmp_path) -> None:
    """imap.oversize = "halt": the folder stops below it, shown as stuck with its UID in status and
    metrics and logged once; "skip": stored and announced with its header only, the folder goes on."""
    halted, skipped = dovecot.new_user(), dovecot.new_user()
    big = b"Message-ID: <big@t>\r\nSubject: big\r\n\r\n" + b"x" * 50_000 + b"\r\n"
    for user in (halted, skipped):
        dovecot.append(user, b"Message-ID: <small-1@t>\r\nSubject: small\r\n\r\nbody\r\n")
        dovecot.append(user, big)
        dovecot.append(user, b"Message-ID: <small-2@t>\r\nSubject: small\r\n\r\nbody\r\n")
    with Daemon(tmp_path / "halt", accounts=account_toml(halted, dovecot.host, dovecot.port),
                password=dovecot.password, sections='[imap]\nmax_message_size = "20KiB"\n') as daemon:
        daemon.wait_stored(1)
        status = wait_until(lambda: (s := daemon.status())["stuck_folders"] and s, 15, 0.3,
                            "the stuck folder in status\n" + daemon.log_tail())
        assert status["stuck_folders"] == [f"{halted}/INBOX uid=2 size={len(big)} limit=20480"], status
        wait_until(lambda: metric(daemon, "mailingestd_folders_stuck") == 1, 10, 0.3, "mailingestd_folders_stuck")
        time.sleep(3)  # several polls: one log line for the stuck folder, not one per poll
        assert daemon.log_path.read_text().count("event=folder_stuck") == 1, daemon.log_tail()
        assert len(daemon.stored_keys()) == 1
    with Daemon(tmp_path / "skip", accounts=account_toml(skipped, dovecot.host, dovecot.port),
                password=dovecot.password,
                sections='[imap]\nmax_message_size = "20KiB"\noversize = "skip"\n') as daemon:
        daemon.wait_stored(3)
        rows = daemon.query("SELECT message_id, size, length(raw) FROM messages ORDER BY uid")
        assert [r[0] for r in rows] == ["<small-1@t>", "<big@t>", "<small-2@t>"]
        assert rows[1][1] == len(big) and rows[1][2] < 100, "the metadata only: header, no body"
        wait_until(lambda: metric(daemon, "mailingestd_oversize_skipped_total") == 1, 10, 0.3, "the skip counted")
        assert daemon.status()["stuck_folders"] == []
        assert daemon.log_path.read_text().count("event=message_too_large") == 1


def nil_body(session: Session) -> None:
    """UID 1 answered with BODY[] NIL (no server we can run does that; a broken proxy does)."""
    session.greet()
    while True:
        tag, name, rest = session.read_command()
        if name == b"UID FETCH" and b"BODY" in rest:
            session.send(b"* 1 FETCH (UID 1 RFC822.SIZE 50 BODY[] NIL)\r\n" + tag + b" OK done\r\n")
        else:
            session.answer(tag, name, rest)


def test_a_uid_answered_without_a_body_is_logged_and_counted(tmp_path) -> None:
    with HostileServer(nil_body) as server, Daemon(
            tmp_path, accounts=account_toml("u", server.host, server.port, id="nil", idle=False), workers=1) as daemon:
        wait_until(lambda: metric(daemon, "mailingestd_uids_vanished_total") >= 1, 20, 0.3,
                   "the vanished UID counted\n" + daemon.log_tail())
        lines = [line for line in daemon.log_path.read_text().splitlines() if "event=uids_vanished" in line]
        assert lines and "account=nil" in lines[0] and "uids=1" in lines[0], daemon.log_tail()


def test_a_message_stored_without_its_body_says_so_in_its_envelope() -> None:
    header = b"Subject: big\r\n\r\n"
    message = StoredMessage(uid=2, raw=header, size=50_000, internaldate=None, message_id=None, from_=None,
                            to=None, cc=None, subject="big", date=None, in_reply_to=None, references=None,
                            body_omitted=True)
    envelope = json.loads(make_envelope("a", "INBOX", 7, message, 0.0, resync=False))
    assert envelope["body_omitted"] is True and envelope["size"] == 50_000
