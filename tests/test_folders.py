"""Folders and push, on every path: only configured folders are named to the server, INBOX in any
spelling is one folder, NOTIFY pushes every configured folder, IDLE runs on the right folder
without NOTIFY, and results of jobs the worker starts on its own (a push, a renewal) are
classified like ordered ones (``reauth_required``, a suggested backoff).

Dovecot records every client command (``rawlog_dir``, see test_worker_engine.py), so the tests
check what the server received. The scripted server (tests/hostile_imap.py) only answers a fetch
after an IDLE notification with a throttling reply, which Dovecot does not do on demand.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Daemon, account_toml, wait_until
from hostile_imap import Session
from test_credentials import add_oauth, keyed_daemon
from test_worker_engine import (
    commands,
    daemon_sessions,
    idling,
    message,
    no_restarts,
    rawlog_conf,
    recorded_user,
    stored_at,
)

from devtools.devservers import _CAPABILITIES_WITHOUT_IDLE, Cyrus, Dovecot
from oauth2_server import OAuth2Server, provider_and_dovecot

# Dovecot's post-login capabilities with IDLE but without NOTIFY: a server that can only push
# the selected folder (Cyrus 3.6 behaves so).
CAPABILITIES_WITHOUT_NOTIFY = _CAPABILITIES_WITHOUT_IDLE.replace(" NOTIFY", "") + " IDLE"


@pytest.fixture(scope="module")
def notify_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """Dovecot 2.3 as shipped: IDLE and NOTIFY after login; sessions recorded."""
    root = tmp_path_factory.mktemp("dovecot-notify")
    server = Dovecot(root, users=0, extra_conf=rawlog_conf(root))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idle_only_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """Dovecot with NOTIFY left out of its capabilities (IDLE kept); sessions recorded."""
    root = tmp_path_factory.mktemp("dovecot-idle-only")
    server = Dovecot(root, users=0,
                     extra_conf=rawlog_conf(root) + f"imap_capability = {CAPABILITIES_WITHOUT_NOTIFY}\n")
    server.start()
    yield server
    server.stop()


def scheduler_env(interval: str | None = None, **keys: str) -> dict[str, str]:
    """[scheduler] settings as environment overrides (the harness writes that table already)."""
    if interval is not None:
        keys.update(high_interval=interval, medium_interval=interval, low_interval=interval)
    return {f"MAILINGESTD_SCHEDULER_{key.upper()}": value for key, value in keys.items()}


def sent_lines(server: Dovecot, user: str) -> list[str]:
    return [line for session in daemon_sessions(server, user) for _, line in session]


def stored_folders(daemon: Daemon) -> dict[str, str]:
    return dict(daemon.query("SELECT message_id, folder FROM messages"))


def test_only_configured_folders_are_named_to_the_server(notify_dovecot, tmp_path):
    user = recorded_user(notify_dovecot)
    notify_dovecot.append(user, message("inbox-old"))
    notify_dovecot.append(user, message("archive-old"), folder="Archive")
    accounts = account_toml(user, notify_dovecot.host, notify_dovecot.port, folders=["Archive"])
    with Daemon(tmp_path, accounts=accounts, password=notify_dovecot.password) as daemon:
        stored_at(daemon, "archive-old", 15)
        idling(daemon, 1)
        appended_at = time.time()
        notify_dovecot.append(user, message("archive-new"), folder="Archive")
        notify_dovecot.append(user, message("inbox-new"))
        # The only folder idles: its new mail is pushed, not found by a poll.
        assert stored_at(daemon, "archive-new", 10) - appended_at < 1.5
        time.sleep(1.0)
        assert stored_folders(daemon) == {"<archive-old@t>": "Archive", "<archive-new@t>": "Archive"}
        lines = sent_lines(notify_dovecot, user)
        assert lines and not [line for line in lines if "inbox" in line.lower()], lines
        assert any(line.split(" ")[1:3] == ["EXAMINE", '"Archive"'] for line in lines), lines
        no_restarts(daemon)


def received(moto, queue_url: str) -> list[dict]:
    """Every envelope on the queue (read until empty; moto needs no visibility wait here)."""
    sqs, bodies = moto.client("sqs"), []
    while batch := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        bodies += [json.loads(m["Body"]) for m in batch]
        sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(batch)])
    return bodies


def test_inbox_in_any_case_is_one_folder_keyed_INBOX(notify_dovecot, tmp_path, sqs_queue, moto):
    user = recorded_user(notify_dovecot)
    notify_dovecot.append(user, message("spelled-1"))
    accounts = account_toml(user, notify_dovecot.host, notify_dovecot.port, folders=["Inbox", "inbox"])
    queue = f'[queue]\nkind = "sqs"\nurl = "{sqs_queue}"\nendpoint_url = "{moto.endpoint_url}"\n'
    with Daemon(tmp_path, accounts=accounts, password=notify_dovecot.password, sections=queue,
                env=moto.env) as daemon:
        stored_at(daemon, "spelled-1", 15)
        idling(daemon, 1)
        notify_dovecot.append(user, message("spelled-2"))
        stored_at(daemon, "spelled-2", 5)
        wait_until(lambda: daemon.status()["outbox"]["depth"] == 0, 30, 0.2, "the outbox published")
        time.sleep(1.0)
        rows = daemon.query("SELECT folder, message_id FROM messages ORDER BY message_id")
        assert rows == [("INBOX", "<spelled-1@t>"), ("INBOX", "<spelled-2@t>")], rows
        announced = received(moto, sqs_queue)
        assert sorted(m["message_id"] for m in announced) == ["<spelled-1@t>", "<spelled-2@t>"], announced
        assert {m["folder"] for m in announced} == {"INBOX"}


def test_notify_pushes_new_mail_in_every_configured_folder(notify_dovecot, tmp_path):
    user = recorded_user(notify_dovecot)
    for folder in ("Work", "Archive"):
        notify_dovecot.append(user, message(f"{folder}-old"), folder=folder)
    accounts = account_toml(user, notify_dovecot.host, notify_dovecot.port, folders=["INBOX", "Work", "Archive"])
    # Tier intervals and safety poll far longer than the test: anything stored in time was pushed.
    with Daemon(tmp_path, accounts=accounts, password=notify_dovecot.password,
                env=scheduler_env(interval="120s", idle_safety_interval="120s")) as daemon:
        stored_at(daemon, "Archive-old", 15)
        idling(daemon, 1)
        latency = {}
        for folder in ("Work", "INBOX", "Archive", "Work"):
            tag = f"{folder}-{len(latency)}"
            appended_at = time.time()
            notify_dovecot.append(user, message(tag), folder=folder)
            latency[tag] = stored_at(daemon, tag, 10) - appended_at
        assert max(latency.values()) < 1.5, latency
        [session] = daemon_sessions(notify_dovecot, user)  # one connection watches every folder
        notify = [line for _, line in session if line.split(" ")[1:2] == ["NOTIFY"]]
        assert notify and all('"Work"' in line and '"Archive"' in line and '"INBOX"' in line
                              for line in notify if " SET " in line), notify
        assert stored_folders(daemon)["<Work-3@t>"] == "Work"


def test_without_notify_the_only_folder_idles_and_a_second_is_checked_at_the_tier_interval(
        idle_only_dovecot, tmp_path):
    user = recorded_user(idle_only_dovecot)
    only_folder_pushed(idle_only_dovecot, user, tmp_path / "one", "dovecot")
    lines = sent_lines(idle_only_dovecot, user)
    assert not [line for line in lines if "NOTIFY" in line or "inbox" in line.lower()], lines

    second_folder_checked_at_the_tier_interval(idle_only_dovecot, recorded_user(idle_only_dovecot), daemon_sessions,
                                               tmp_path / "two", "dovecot", gaps=(2.0, 5.0))


def only_folder_pushed(server: Dovecot | Cyrus, user: str, root: Path, tag: str) -> None:
    """An account whose only folder is Work, on a server without NOTIFY: it idles on Work and a
    message appended there is stored within 1.5 s (pushed, not found by a poll)."""
    server.append(user, message(f"{tag}-only-old"), folder="Work")
    accounts = account_toml(user, server.host, server.port, folders=["Work"], id=f"{user}-work")
    with Daemon(root, accounts=accounts, password=server.password) as daemon:
        stored_at(daemon, f"{tag}-only-old", 15)
        idling(daemon, 1)
        appended_at = time.time()
        server.append(user, message(f"{tag}-only-new"), folder="Work")
        assert stored_at(daemon, f"{tag}-only-new", 10) - appended_at < 1.5


def second_folder_checked_at_the_tier_interval(server: Dovecot | Cyrus, user: str, sessions_of: Callable[..., list],
                                               root: Path, tag: str, gaps: tuple[float, float]) -> None:
    """An account listing Work and Other on a server without NOTIFY: IDLE on Work (pushed within
    1.5 s), Other checked by STATUS on the same connection at the tier interval (3 s here, the
    safety poll far away), IDLE re-entered after each check. ``gaps``: the STATUS spacing allowed
    by the resolution of the server's command log."""
    server.append(user, message(f"{tag}-other-old"), folder="Other")
    server.append(user, message(f"{tag}-work-old"), folder="Work")
    accounts = account_toml(user, server.host, server.port, folders=["Work", "Other"])
    with Daemon(root, accounts=accounts, password=server.password,
                env=scheduler_env(interval="3s", idle_safety_interval="120s")) as daemon:
        stored_at(daemon, f"{tag}-other-old", 15)
        idling(daemon, 1)
        appended_at = time.time()
        server.append(user, message(f"{tag}-work-new"), folder="Work")
        assert stored_at(daemon, f"{tag}-work-new", 10) - appended_at < 1.5  # IDLE on Work, the first listed
        appended_at = time.time()
        server.append(user, message(f"{tag}-other-new"), folder="Other")
        assert stored_at(daemon, f"{tag}-other-new", 15) - appended_at < 3 * 1.25 + 1.5
        time.sleep(7)
        [session] = sessions_of(server, user)  # DONE, STATUS, IDLE on one connection
        statuses = [t for t, line in session if line.split(" ")[1:3] == ["STATUS", '"Other"']]
        spacing = [b - a for a, b in zip(statuses, statuses[1:])]
        assert len(statuses) >= 3 and all(gaps[0] <= gap <= gaps[1] for gap in spacing), spacing
        assert all(any(line.endswith(" IDLE") for t, line in session if t >= at) for at in statuses)
        idling(daemon, 1)
        no_restarts(daemon)


def test_a_configured_folder_the_server_lacks_is_an_account_error_and_the_others_go_on(notify_dovecot, tmp_path):
    user = recorded_user(notify_dovecot)
    notify_dovecot.append(user, message("present"), folder="Work")
    accounts = account_toml(user, notify_dovecot.host, notify_dovecot.port, folders=["Work", "Nowhere"])
    with Daemon(tmp_path, accounts=accounts, password=notify_dovecot.password) as daemon:
        stored_at(daemon, "present", 15)
        errors = wait_until(lambda: [e for e in daemon.status()["errors"] if "Nowhere" in e], 10, 0.2,
                            "the missing folder in status")
        assert any(f"account={user}" in e and "mailbox" in e for e in errors), errors
        metrics = (tmp_path / "metrics" / "mailingestd.prom")
        wait_until(lambda: metrics.exists() and 'result="missing_folder"' in metrics.read_text(), 10, 0.2,
                   "the missing folder in the metrics")
        idling(daemon, 1)
        notify_dovecot.append(user, message("present-2"), folder="Work")
        stored_at(daemon, "present-2", 5)
        logged = [line for line in daemon.log_path.read_text().splitlines() if "event=folder_missing" in line]
        assert len(logged) == 1, logged  # once, not at every check


@pytest.fixture(scope="module")
def oauth_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OAuth2Server, Dovecot]]:
    with provider_and_dovecot(tmp_path_factory.mktemp("oauth2-push"), expires_in=4) as both:
        yield both


def test_refresh_token_revoked_while_idling_becomes_reauth_required(oauth_dovecot, tmp_path):
    server, dovecot = oauth_dovecot
    daemon = keyed_daemon(tmp_path, workers=1, sections='[imap]\nidle_renew = "2s"\n')
    refresh = server.new_refresh_token("frank")
    add_oauth(daemon, server, dovecot, "frank", refresh)
    with daemon:
        idling(daemon, 1)
        server.revoke(refresh)
        revoked_at, before = time.monotonic(), server.token_requests[refresh]
        wait_until(lambda: daemon.status()["accounts"]["by_state"].get("reauth_required"), 4 + 2, 0.1,
                   "reauth_required within one token lifetime\n" + daemon.log_tail())
        assert time.monotonic() - revoked_at < 4 + 2
        metrics = tmp_path / "d" / "metrics" / "mailingestd.prom"
        wait_until(lambda: re.search(r'mailingestd_accounts\{priority="\w+",state="reauth_required"\} 1', metrics.read_text()),
                   5, 0.2, "reauth_required in the metrics")
        time.sleep(3)
        assert server.token_requests[refresh] - before == 1, "exactly one token request after the revocation"


def throttled_after_notification(refused_at: list[float]) -> Callable[[Session], None]:
    """Serve normally until IDLE; announce a message during IDLE, then refuse every fetch with
    Office 365's throttling reply and its suggested backoff (the monotonic time of each refusal
    goes to ``refused_at``, the clock of HostileServer.accepted_at)."""
    def scenario(session: Session) -> None:
        session.greet()
        announced = False
        while True:
            tag, name, rest = session.read_command()
            if name == b"IDLE" and not announced:
                announced = True
                session.send(b"+ idling\r\n")
                time.sleep(0.3)
                session.send(b"* 2 EXISTS\r\n")
                session.read_line()  # DONE
                session.send(tag + b" OK Idle completed\r\n")
            elif name in (b"SELECT", b"EXAMINE") and announced:
                session.send(b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 3] next\r\n"
                             + tag + b" OK [READ-ONLY] done\r\n")
            elif name in (b"UID SEARCH", b"UID FETCH") and announced:
                refused_at.append(time.monotonic())
                session.send(tag + b" NO [THROTTLED] Request is throttled. "
                             b"Suggested Backoff Time: 20000 milliseconds\r\n")
            else:
                session.answer(tag, name, rest)

    return scenario


@pytest.mark.timeout(90)
def test_backoff_suggested_after_an_idle_notification_is_honoured(hostile, tmp_path):
    refused_at: list[float] = []
    server = hostile(throttled_after_notification(refused_at))
    with Daemon(tmp_path, accounts=account_toml("o365", server.host, server.port, id="o365"), password="pw",
                env=scheduler_env(backoff_max="60s")) as daemon:
        wait_until(lambda: any("error_kind=throttled" in line for line in daemon.status()["errors"]), 30, 0.2,
                   "the throttling reply seen\n" + daemon.log_tail())
        connections = len(server.accepted_at)
        assert connections == 1 and len(refused_at) == 1
        time.sleep(max(0.0, refused_at[0] + 19.5 - time.monotonic()))
        assert len(server.accepted_at) == connections, "a new connection before the suggested 20 s"
        wait_until(lambda: len(server.accepted_at) > connections, 15, 0.2, "the retry after the backoff")
        assert server.accepted_at[connections] - refused_at[0] >= 20.0
        no_restarts(daemon)


def notify_advertised_but_refused(session: Session) -> None:
    """A server that lists NOTIFY and answers ``NOTIFY SET`` with NO; everything else well-behaved."""
    session.send(b"* OK [CAPABILITY IMAP4rev1 IDLE NOTIFY LITERAL+ AUTH=PLAIN] ready\r\n")
    while True:
        tag, name, rest = session.read_command()
        if name == b"NOTIFY":
            session.send(tag + b" NO [CANNOT] NOTIFY is not available now\r\n")
        elif name == b"CAPABILITY":
            session.send(b"* CAPABILITY IMAP4rev1 IDLE NOTIFY LITERAL+ AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
        else:
            session.answer(tag, name, rest)


@pytest.mark.timeout(60)
def test_a_refused_notify_falls_back_to_idle_on_the_primary_folder(hostile, tmp_path):
    server = hostile(notify_advertised_but_refused)
    accounts = account_toml("refuser", server.host, server.port, id="refuser", folders=["Work", "INBOX"])
    with Daemon(tmp_path, accounts=accounts, password="pw") as daemon:
        idling(daemon, 1)
        time.sleep(3)  # Work is checked at the tier interval (2-5 s here): IDLE is re-entered after each
        idling(daemon, 1)
        assert server.connections == 1, "one connection: the refusal cost no reconnect"
        logged = [line for line in daemon.log_path.read_text().splitlines() if "event=notify_refused" in line]
        assert len(logged) == 1 and "server=127.0.0.1" in logged[0], logged
        no_restarts(daemon)


def daemon_sessions_on_cyrus(server: Cyrus, user: str) -> list[list[tuple[int, str]]]:
    """The daemon's sessions in Cyrus's telemetry (it sends ENABLE CONDSTORE first; the test's
    APPENDs do not)."""
    return [session for session in server.sessions(user)
            if any(line.endswith("ENABLE CONDSTORE") for _, line in session)]


def test_cyrus_the_only_folder_idles_and_a_second_is_checked_at_the_tier_interval(cyrus, tmp_path):
    """Cyrus 3.6 offers IDLE but not NOTIFY: IDLE on the primary folder, the others by STATUS.

    Folder names are what the server LISTs. This server has Cyrus 3's default namespace
    (altnamespace: yes), where a user's folder is ``Work``, beside INBOX; a Cyrus with
    ``altnamespace: no`` (Debian's packaged imapd.conf) lists it as ``INBOX.Work`` (``INBOX/Work``
    with unixhierarchysep), and that is the name the account must list.
    """
    with cyrus.client(cyrus.new_user()) as probe:
        assert b"IDLE" in probe.capabilities() and b"NOTIFY" not in probe.capabilities()
    user = cyrus.new_user()
    only_folder_pushed(cyrus, user, tmp_path / "one", "cyrus")
    [session] = daemon_sessions_on_cyrus(cyrus, user)
    assert any(line.endswith(' IDLE') for _, line in session), session
    assert not [line for _, line in session if "inbox" in line.lower()], session

    # Cyrus's command log has whole seconds: the 2..5 s of the Dovecot test read as 1..6 here.
    second_folder_checked_at_the_tier_interval(cyrus, cyrus.new_user(), daemon_sessions_on_cyrus, tmp_path / "two",
                                               "cyrus", gaps=(1, 6))


def test_a_folder_unchanged_since_its_last_complete_check_costs_no_store_round_trip(dovecot, mailbox, tmp_path):
    """The EXAMINE of the folder IDLE runs on (each renewal, each reconnect) asks the store only when
    the folder's (UIDVALIDITY, UIDNEXT) moved since the last check that found it complete; new
    mail is still fetched at once, as an arrival."""
    from mailingestd import frames
    from mailingestd.config import AccountConfig, ImapConfig
    from mailingestd.fetch import imap
    from mailingestd.fetch.folder_sync import FolderChecks, JobOutcome
    from mailingestd.store.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    calls: list[str] = []
    for name in ("get_mailbox", "start_mailbox", "open_mailbox"):
        def counted(*args, _method=getattr(store, name), _name=name, **kwargs):
            calls.append(_name)
            return _method(*args, **kwargs)
        setattr(store, name, counted)
    checks = FolderChecks(store, ImapConfig(), announce=True, stopping=lambda: False, fast_stop=lambda: False)
    account = AccountConfig(id=mailbox, host=dovecot.host, port=dovecot.port, tls="none", username=mailbox,
                            password_env="UNUSED")

    def check(client) -> JobOutcome:
        calls.clear()
        outcome = JobOutcome(result=frames.Result(slot=0, account_id=mailbox, order_id=0, ok=False, connected=False,
                                                  idling=False))
        checks.check(client, account, outcome, account.folders, examine_primary=True)
        assert outcome.primary_current == (outcome.stored == 0)  # IDLE may follow at once
        return outcome

    dovecot.append(mailbox, b"Message-ID: <first@test>\r\n\r\nfirst\r\n")
    client = imap.connect(account, dovecot.password, timeout=30)
    try:
        first = check(client)
        assert (first.backlog, first.result.new_messages) == (1, 0) and calls == ["open_mailbox"]  # one transaction
        again = check(client)
        assert again.stored == 0 and calls == []
        dovecot.append(mailbox, b"Message-ID: <second@test>\r\n\r\nsecond\r\n")
        arrival = check(client)
        assert arrival.result.new_messages == 1 and calls == ["open_mailbox"]
    finally:
        imap.logout(client)
    client = imap.connect(account, dovecot.password, timeout=30)  # a reconnect: the worker remembers
    try:
        assert check(client).stored == 0 and calls == []
    finally:
        imap.logout(client)
    assert store.counts()["messages"] == 2
    store.close()


def test_mail_still_arriving_after_the_last_catch_up_is_announced_as_pushed(dovecot, mailbox, tmp_path):
    """The catch-up before IDLE syncs at most three times; when mail arrives during every one of
    them, the EXISTS of the last arrivals went by unread (IDLE does not repeat it), so the folder
    is marked behind and the job announces it as pushed instead of idling past it."""
    from mailingestd import frames
    from mailingestd.config import AccountConfig, ImapConfig
    from mailingestd.fetch import imap
    from mailingestd.fetch.folder_sync import FolderChecks, JobOutcome
    from mailingestd.store.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    checks = FolderChecks(store, ImapConfig(), announce=True, stopping=lambda: False, fast_stop=lambda: False)
    account = AccountConfig(id=mailbox, host=dovecot.host, port=dovecot.port, tls="none", username=mailbox,
                            password_env="UNUSED")
    sync, arriving = checks.sync, [True]

    def sync_while_mail_arrives(client, account, folder, outcome):
        synced = sync(client, account, folder, outcome)
        if arriving[0]:  # a message lands during every sync's FETCH, after its SEARCH
            dovecot.append(mailbox, f"Message-ID: <{time.monotonic()}@test>\r\n\r\nx\r\n".encode())
        return synced

    checks.sync = sync_while_mail_arrives

    def outcome() -> JobOutcome:
        return JobOutcome(result=frames.Result(slot=0, account_id=mailbox, order_id=0, ok=False, connected=False,
                                               idling=False))

    client = imap.connect(account, dovecot.password, timeout=30)
    try:
        checks.check(client, account, outcome(), account.folders, examine_primary=True)
        busy = outcome()
        assert checks.catch_up_idle_folder(client, account, busy) == "INBOX"
        assert busy.idle_folder_behind, "mail arrived during every catch-up: the folder must be checked again"
        arriving[0] = False
        quiet = outcome()
        checks.check(client, account, quiet, account.folders, examine_primary=True)
        assert checks.catch_up_idle_folder(client, account, quiet) == "INBOX"
        assert not quiet.idle_folder_behind
    finally:
        imap.logout(client)
    store.close()
