"""Ingest of real mailboxes (Dovecot) into real stores (SQLite and PostgreSQL), and the publisher (moto)."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import time
from pathlib import Path

import pytest

from harness import Daemon, account_toml, wait_until
from mailingestd.fetch import imap
from mailingestd.config import AccountConfig, ImapConfig, QueueConfig
from mailingestd.fetch.ingest import sync_folder
from mailingestd.publish import publisher as publisher_mod
from mailingestd.publish.publisher import Publisher, make_sqs_client
from devtools.samplemail import corpus, make_large
from mailingestd.store.store import StoredMessage, open_store


def account_for(dovecot, user: str) -> AccountConfig:
    return AccountConfig(id=user, host=dovecot.host, port=dovecot.port, tls="none", username=user,
                         password_env="UNUSED")


def mixed_messages() -> list[tuple[str, bytes]]:
    return [*corpus(), ("large-20MB", make_large(20 * 1024 * 1024))]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        st = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    else:
        st = open_store(request.getfixturevalue("pg_url"))
    yield st
    st.close()


def ingest(dovecot, user, store, folder="INBOX", announce=True, settings=None):
    client = imap.connect(account_for(dovecot, user), dovecot.password, timeout=30)
    try:
        return sync_folder(client, store, user, folder, settings or ImapConfig(), announce=announce)
    finally:
        imap.logout(client)


def test_mixed_mailbox_stored_byte_for_byte_once_and_unchanged(dovecot, mailbox, store):
    messages = mixed_messages()
    uids = [dovecot.append(mailbox, raw) for _, raw in messages]
    result = ingest(dovecot, mailbox, store)
    assert result.new_messages == len(messages)
    state = store.get_mailbox(mailbox, "INBOX")
    assert state.last_uid == max(uids)
    for (name, raw), uid in zip(messages, uids):
        stored = store.message_raw(f"{mailbox}/INBOX/{state.uidvalidity}/{uid}")
        assert stored == raw, f"{name}: stored bytes differ from what was appended"
    # The mailbox was not changed: no \Seen anywhere (EXAMINE + BODY.PEEK[]).
    client = dovecot.client(mailbox)
    client.select_folder("INBOX", readonly=True)
    flags = client.get_flags(uids)
    client.logout()
    assert all(b"\\Seen" not in f for f in flags.values()), flags
    # Ingesting again stores nothing new and announces nothing twice.
    outbox_before = store.outbox_depth()
    again = ingest(dovecot, mailbox, store)
    assert again.new_messages == 0
    assert store.outbox_depth() == outbox_before == len(messages)


def test_headers_parsed_best_effort(dovecot, mailbox, store):
    for _, raw in corpus():
        dovecot.append(mailbox, raw)
    ingest(dovecot, mailbox, store)
    recent = store.recent_messages(mailbox, 100)
    assert len(recent) == len(corpus())
    subjects = " ".join(r.subject or "" for r in recent)
    assert "?=" not in subjects, "RFC 2047 encoded words should be decoded"


def test_new_mail_only_above_checkpoint(dovecot, mailbox, store):
    dovecot.append(mailbox, b"Subject: one\r\n\r\n1\r\n")
    assert ingest(dovecot, mailbox, store).new_messages == 1
    # UID FETCH n:* answers with the highest message when nothing is newer (rule 3): nothing new.
    assert ingest(dovecot, mailbox, store).new_messages == 0
    dovecot.append(mailbox, b"Subject: two\r\n\r\n2\r\n")
    assert ingest(dovecot, mailbox, store).new_messages == 1


def test_uidvalidity_change_starts_folder_over_and_says_so(dovecot, mailbox, store):
    dovecot.append(mailbox, b"Subject: a\r\n\r\nbefore\r\n", folder="Archive")
    ingest(dovecot, mailbox, store, folder="Archive")
    old = store.get_mailbox(mailbox, "Archive")
    new_validity = dovecot.recreate_folder(mailbox, "Archive")
    assert new_validity != old.uidvalidity
    dovecot.append(mailbox, b"Subject: b\r\n\r\nafter 1\r\n", folder="Archive")
    dovecot.append(mailbox, b"Subject: c\r\n\r\nafter 2\r\n", folder="Archive")
    result = ingest(dovecot, mailbox, store, folder="Archive")
    assert result.uidvalidity_changed and result.new_messages == 2
    now = store.get_mailbox(mailbox, "Archive")
    assert now.uidvalidity == new_validity and now.last_uid == 2
    with store.transaction() as cur:
        cur.execute(store.sql("SELECT uidvalidity, COUNT(*) FROM messages WHERE account_id = ? GROUP BY uidvalidity"),
                    (mailbox,))
        by_validity = dict(cur.fetchall())
        cur.execute(store.sql("SELECT old_uidvalidity, new_uidvalidity FROM uidvalidity_changes WHERE account_id = ?"),
                    (mailbox,))
        changes = cur.fetchall()
    assert by_validity == {old.uidvalidity: 1, new_validity: 2}, "old rows are kept"
    assert [tuple(c) for c in changes] == [(old.uidvalidity, new_validity)]
    envelopes = [json.loads(e.envelope) for e in store.outbox_batch(100) if e.key.startswith(f"{mailbox}/Archive/{new_validity}")]
    assert len(envelopes) == 2 and all(e.get("resync") is True for e in envelopes)


def test_batches_respect_count_and_byte_caps(dovecot, mailbox, store):
    for n in range(7):
        dovecot.append(mailbox, f"Subject: {n}\r\n\r\n".encode() + b"x" * 100_000 + b"\r\n")
    settings = ImapConfig(batch_messages=3, batch_bytes=250_000)
    commits = []
    original = store.commit_batch

    def spy(mailbox_state, messages, **kw):
        commits.append(len(messages))
        return original(mailbox_state, messages, **kw)

    store.commit_batch = spy
    assert ingest(dovecot, mailbox, store, settings=settings).new_messages == 7
    assert max(commits) <= 2 and sum(commits) == 7  # 2 x 100 KB fit under 250 KB, 3 would not


def test_publish_fifo_each_key_exactly_once_with_claim_check(dovecot, mailbox, pg_url, moto, sqs_fifo_queue):
    store = open_store(pg_url)
    big = make_large(800 * 1024)  # over SQS's 1 MiB once base64-encoded (4/3): announced by claim check
    messages = [raw for _, raw in corpus()] + [big]
    for raw in messages:
        dovecot.append(mailbox, raw)
    ingest(dovecot, mailbox, store)
    queue = QueueConfig(kind="sqs", url=sqs_fifo_queue, endpoint_url=moto.endpoint_url, inline_raw=True)
    publisher = Publisher(store, queue)
    resent = store.outbox_batch(1)[0]
    deadline = time.monotonic() + 30
    while store.outbox_depth() and time.monotonic() < deadline:
        publisher.publish_once()
    assert store.outbox_depth() == 0
    # Announcing a real key again (as a crash between send and outbox delete does), with the same
    # deduplication id: the FIFO queue drops it (its five-minute window; the original is still queued).
    publisher.client.send_message(QueueUrl=sqs_fifo_queue, MessageBody=resent.envelope, MessageGroupId=mailbox,
                                  MessageDeduplicationId=hashlib.sha256(resent.key.encode()).hexdigest())
    sqs = make_sqs_client(queue)
    keys = []
    bodies = []
    for _ in range(20):
        reply = sqs.receive_message(QueueUrl=sqs_fifo_queue, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                    AttributeNames=["MessageGroupId"])
        for m in reply.get("Messages", []):
            body = json.loads(m["Body"])
            keys.append(body["key"])
            bodies.append(body)
            assert m["Attributes"]["MessageGroupId"] == mailbox
            sqs.delete_message(QueueUrl=sqs_fifo_queue, ReceiptHandle=m["ReceiptHandle"])
        if len(keys) >= len(messages) and not reply.get("Messages"):
            break
    assert keys.count(resent.key) == 1, "the same key announced twice with one deduplication id"
    assert len(keys) == len(set(keys)) == len(messages)
    # Claim check with inline_raw on: what fits in an SQS message carries the raw bytes, byte for byte;
    # the 800 KiB one carries only its key, and the store holds its bytes.
    large = [b for b in bodies if b["size"] == len(big)]
    assert len(large) == 1 and "raw_base64" not in large[0], "a message over 1 MiB inlined is announced by claim check"
    assert store.message_raw(large[0]["key"]) == big
    inlined = [b for b in bodies if b["size"] != len(big)]
    assert inlined and all(base64.b64decode(b["raw_base64"]) == store.message_raw(b["key"]) for b in inlined)
    for body in bodies:
        assert {"v", "key", "account_id", "folder", "uidvalidity", "uid", "message_id", "from", "to", "cc",
                "subject", "date", "in_reply_to", "references", "size", "ingested_at"} <= set(body)
    store.close()


def test_sigkill_inside_a_commit_loses_and_duplicates_nothing(dovecot, mailbox, pg_url, tmp_path):
    """The whole daemon SIGKILLed while a worker's batch transaction is open (proven: PostgreSQL shows
    its INSERT INTO messages waiting, after the batch's message_keys rows went in), then started
    again: every message stored exactly once, nothing of the killed transaction left behind."""
    import psycopg

    expected = 150
    for n in range(expected):
        dovecot.append(mailbox, f"Message-ID: <kill-{n}@test>\r\nSubject: {n}\r\n\r\n".encode() + b"x" * 20_000
                       + b"\r\n")
    daemon = Daemon(tmp_path / "d", accounts=account_toml(mailbox, dovecot.host, dovecot.port), store_url=pg_url,
                    password=dovecot.password, workers=1, sections="[imap]\nbatch_messages = 25\n")

    def scalar(conn, sql: str) -> object:
        return conn.execute(sql).fetchone()[0]

    def stuck_in_commit(conn) -> bool:
        return bool(scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO messages %'"))

    with psycopg.connect(pg_url, autocommit=True) as observer, psycopg.connect(pg_url) as blocker:
        daemon.start(wait=False)
        wait_until(lambda: scalar(observer, "SELECT to_regclass('messages') IS NOT NULL"), 30, 0.05,
                   "the store migrated\n" + daemon.log_tail())
        blocker.execute("LOCK TABLE messages IN EXCLUSIVE MODE")  # the next batch's INSERT waits here
        wait_until(lambda: stuck_in_commit(observer), 30, 0.05, "a batch inside its transaction\n" + daemon.log_tail())
        committed = scalar(observer, "SELECT count(*) FROM message_keys")
        daemon.kill()  # SIGKILL the supervisor and every child: no drain, no cleanup
        blocker.rollback()
        wait_until(lambda: not stuck_in_commit(observer), 30, 0.1, "the killed transaction to end")
        assert scalar(observer, "SELECT count(*) FROM message_keys") == committed < expected
        assert scalar(observer, "SELECT count(*) FROM messages") == committed, "a half batch survived the kill"
    daemon.start()
    daemon.wait_stored(expected, timeout=60)
    keys = daemon.stored_keys()
    assert len(keys) == len(set(keys)) == expected
    ids = {r[0] for r in daemon.query("SELECT message_id FROM messages")}
    assert ids == {f"<kill-{n}@test>" for n in range(expected)}
    (last_uid,) = daemon.query("SELECT last_uid FROM mailboxes WHERE account_id = ?", (mailbox,))[0]
    assert last_uid == max(k[3] for k in keys)
    assert daemon.stop(signal.SIGTERM) == 0


def test_configuration_error_is_one_line_exit_78(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text('[scheduler]\nhigh_interval = "soon"\n')
    result = subprocess.run([str(Path(sys.executable).parent / "mailingestd"), "--config", str(bad), "--check-config"],
                            capture_output=True, text=True)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "scheduler.high_interval" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_one_clear_line_no_password(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    daemon = Daemon(tmp_path / "d", password="hunter2-secret")
    daemon.ctl("account", "add", "acme", "--host", "127.0.0.1", "--port", str(port), "--tls", "none",
               "--username", "bob", "--password-env", "TEST_IMAP_PASSWORD")
    result = daemon.ctl("account", "test", "acme", check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "account=acme" in lines[0] and f"127.0.0.1:{port}" in lines[0], result.stderr
    assert "error_kind=network" in lines[0]
    assert "hunter2" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_account_commands_against_the_store(dovecot, mailbox, tmp_path):
    daemon = Daemon(tmp_path / "d", password=dovecot.password)
    daemon.ctl("account", "add", "a1", "--host", dovecot.host, "--port", str(dovecot.port), "--tls", "none",
               "--username", mailbox, "--password-env", "TEST_IMAP_PASSWORD", "--folder", "INBOX")
    listed = json.loads(daemon.ctl("account", "list", "--json").stdout)
    assert [a["id"] for a in listed] == ["a1"] and listed[0]["state"] == "new"
    dovecot.append(mailbox, b"Subject: t\r\n\r\nhello\r\n")
    tested = daemon.ctl("account", "test", "a1").stdout
    assert "logged in" in tested and "IDLE" in tested and "messages 1" in tested
    assert daemon.stored_keys() == [], "account test stores nothing"
    shown = json.loads(daemon.ctl("account", "show", "a1", "--json").stdout)
    assert shown["username"] == mailbox and "secret" not in json.dumps(shown)
    daemon.ctl("account", "remove", "a1")
    assert json.loads(daemon.ctl("account", "list", "--json").stdout) == []
    assert daemon.ctl("account", "remove", "a1", check=False).returncode == 1


def _stored(uid: int, subject: str) -> StoredMessage:
    raw = f"Subject: {subject}\r\nMessage-ID: <p{uid}@t>\r\n\r\nbody\r\n".encode()
    return StoredMessage(uid=uid, raw=raw, size=len(raw), internaldate=None, message_id=f"<p{uid}@t>", from_=None,
                         to=None, cc=None, subject=subject, date=None, in_reply_to=None, references=None)


def test_the_publisher_moves_past_rows_that_always_fail(moto, tmp_path, monkeypatch):
    """More outbox rows than one scan window that SQS always refuses (here: bodies over the queue's
    MaximumMessageSize; 500 rows in production, a window of 50 here to keep the test short) ahead
    of good ones: the good ones are announced anyway, the bad ones parked with a visible count."""
    monkeypatch.setattr(publisher_mod, "SCAN_WINDOW", 50)
    sqs = moto.client("sqs")
    url = sqs.create_queue(QueueName=f"poison-{time.monotonic_ns()}",
                           Attributes={"MaximumMessageSize": "1024"})["QueueUrl"]
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    mailbox = store.start_mailbox("acct", "INBOX", 1)
    poison = [_stored(uid, "x" * 1500) for uid in range(1, 61)]
    store.commit_batch(mailbox, poison, settled_uid=60)
    store.commit_batch(mailbox, [_stored(uid, f"good {uid}") for uid in range(61, 64)], settled_uid=63)
    clock = [0.0]
    publisher = Publisher(store, QueueConfig(kind="sqs", url=url, endpoint_url=moto.endpoint_url, retry_base=1,
                                             retry_max=60), clock=lambda: clock[0])
    for _ in range(40):  # each step at a later (fake) time: every backoff comes due in turn
        publisher.publish_once()
        clock[0] += 5.0
        if store.outbox_depth() == 60 and publisher.stats.parked == 60:
            break
    assert store.outbox_depth() == 60, "the good rows behind the failing ones were never announced"
    assert publisher.stats.parked == 60
    received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    assert sorted(json.loads(m["Body"])["subject"] for m in received) == ["good 61", "good 62", "good 63"]
    store.close()


def _prune_rows_as_retention_does(store_path: Path) -> None:
    """metadata_retention has run: the message rows (and so their keys) are gone, announcements done."""
    import sqlite3

    with sqlite3.connect(store_path) as conn:
        conn.execute("DELETE FROM messages")
        conn.execute("DELETE FROM outbox")
    conn.close()


def test_an_account_removed_and_added_again_after_retention_announces_nothing_old(dovecot, mailbox, tmp_path):
    """Removing an account keeps its folders' checkpoints (they are small): added again after
    retention pruned its rows, its old mail is not stored and announced again as new."""
    path = tmp_path / "store.sqlite3"
    store = open_store(f"sqlite:///{path}")
    for n in range(3):
        dovecot.append(mailbox, f"Message-ID: <old-{n}@t>\r\n\r\nbody\r\n".encode())
    store.upsert_account(account_for(dovecot, mailbox))
    assert ingest(dovecot, mailbox, store).new_messages == 3
    assert store.delete_account(mailbox)
    _prune_rows_as_retention_does(path)
    store.upsert_account(account_for(dovecot, mailbox))
    dovecot.append(mailbox, b"Message-ID: <new@t>\r\n\r\nbody\r\n")
    assert ingest(dovecot, mailbox, store).new_messages == 1
    announced = [json.loads(e.envelope) for e in store.outbox_batch(10)]
    assert [a["message_id"] for a in announced] == ["<new@t>"] and "resync" not in announced[0]
    store.close()


def test_account_resync_re_ingests_on_purpose_and_says_resync(dovecot, mailbox, tmp_path):
    """``mailingestctl account resync ID``: every folder starts over; what retention pruned is stored
    and announced again with "resync": true, what is still stored stays as it is (no duplicate)."""
    daemon = Daemon(tmp_path / "d", password=dovecot.password)
    daemon.ctl("account", "add", mailbox, "--host", dovecot.host, "--port", str(dovecot.port), "--tls", "none",
               "--username", mailbox, "--password-env", "TEST_IMAP_PASSWORD")
    store = open_store(daemon.store_url)
    for n in range(3):
        dovecot.append(mailbox, f"Message-ID: <r-{n}@t>\r\n\r\nbody\r\n".encode())
    assert ingest(dovecot, mailbox, store).new_messages == 3
    with store.transaction() as cur:
        cur.execute("DELETE FROM messages WHERE uid = 1")  # one pruned by retention, two still stored
        cur.execute("DELETE FROM outbox")
    daemon.ctl("account", "resync", mailbox)
    assert store.get_mailbox(mailbox, "INBOX").last_uid == 0
    assert ingest(dovecot, mailbox, store).new_messages == 1
    announced = [json.loads(e.envelope) for e in store.outbox_batch(10)]
    assert [(a["message_id"], a.get("resync")) for a in announced] == [("<r-0@t>", True)]
    assert sorted(daemon.stored_keys()) == sorted(set(daemon.stored_keys())) and len(daemon.stored_keys()) == 3
    assert daemon.ctl("account", "resync", "nobody-such", check=False).returncode == 1
    store.close()


def _set_uidvalidity(dovecot, user: str, value: int) -> None:
    """What a restore from backup does to a folder: its UIDVALIDITY becomes an older value again."""
    import subprocess

    subprocess.run([dovecot._doveadm, "-c", str(dovecot.config_path), "mailbox", "update", "-u", user,
                    "--uid-validity", str(value), "INBOX"], check=True, capture_output=True, timeout=30)


def test_uidvalidity_back_to_a_known_value_announces_re_ingested_mail_as_resync(dovecot, mailbox, tmp_path):
    """A, B, A (a restore): what comes again under a UIDVALIDITY already seen says "resync": true."""
    path = tmp_path / "store.sqlite3"
    store = open_store(f"sqlite:///{path}")
    for n in range(3):
        dovecot.append(mailbox, f"Message-ID: <aba-{n}@t>\r\n\r\nbody\r\n".encode())
    assert ingest(dovecot, mailbox, store).new_messages == 3
    first = store.get_mailbox(mailbox, "INBOX").uidvalidity
    _set_uidvalidity(dovecot, mailbox, first + 1)
    assert ingest(dovecot, mailbox, store).uidvalidity_changed
    _prune_rows_as_retention_does(path)
    _set_uidvalidity(dovecot, mailbox, first)
    result = ingest(dovecot, mailbox, store)
    assert result.uidvalidity_changed and result.new_messages == 3
    announced = [json.loads(e.envelope) for e in store.outbox_batch(10)]
    assert len(announced) == 3 and all(a.get("resync") is True and a["uidvalidity"] == first for a in announced)
    store.close()
