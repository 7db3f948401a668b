"""The throwaway servers really run: each answers a real client the way the daemon will use it."""

from __future__ import annotations

import email
import email.policy
import random
import ssl
import time
from pathlib import Path

import imapclient
import psycopg
import pytest

from devtools.devservers import Dovecot, MotoServer, Postgres, ServerStartError
from devtools.samplemail import corpus, make_large, random_message


def test_dovecot_append_and_fetch_back_byte_for_byte(dovecot: Dovecot, mailbox: str) -> None:
    messages = [raw for _, raw in corpus()]
    uids = [dovecot.append(mailbox, raw) for raw in messages]
    assert uids == list(range(1, len(messages) + 1))
    with dovecot.client(mailbox) as imap:
        assert imap.has_capability("IDLE")
        imap.select_folder("INBOX", readonly=True)
        fetched = imap.fetch(uids, ["BODY.PEEK[]", "FLAGS"])
    for uid, raw in zip(uids, messages, strict=True):
        assert fetched[uid][b"BODY[]"] == raw
        assert b"\\Seen" not in fetched[uid][b"FLAGS"]


def test_dovecot_folders_flags_expunge_and_uidvalidity(dovecot: Dovecot, mailbox: str) -> None:
    first = dovecot.append(mailbox, b"Subject: a\r\n\r\na\r\n", folder="Archive", flags=[b"\\Seen"])
    second = dovecot.append(mailbox, b"Subject: b\r\n\r\nb\r\n", folder="Archive")
    dovecot.expunge(mailbox, first, folder="Archive")
    with dovecot.client(mailbox) as imap:
        old_validity = imap.select_folder("Archive", readonly=True)[b"UIDVALIDITY"]
        assert imap.search("ALL") == [second]
    assert dovecot.recreate_folder(mailbox, "Archive") != old_validity
    assert dovecot.append(mailbox, b"Subject: c\r\n\r\nc\r\n", folder="Archive") == 1


def test_dovecot_counts_logins_and_sessions(dovecot: Dovecot, mailbox: str) -> None:
    assert dovecot.login_count(mailbox) == 0
    clients = [dovecot.client(mailbox) for _ in range(3)]
    try:
        # Dovecot's log process writes the login line after the client has its OK: wait for it.
        deadline = time.monotonic() + 5
        while dovecot.login_count(mailbox) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dovecot.login_count(mailbox) == 3
        assert dovecot.connected_sessions(mailbox) == 3
    finally:
        for client in clients:
            client.logout()
    deadline = time.monotonic() + 5
    while dovecot.connected_sessions(mailbox) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dovecot.connected_sessions(mailbox) == 0


def test_dovecot_wrong_password_is_refused_without_slowing_later_logins(
    dovecot: Dovecot, mailbox: str
) -> None:
    for _ in range(3):
        with pytest.raises(imapclient.exceptions.LoginError):
            imapclient.IMAPClient(dovecot.host, port=dovecot.port, ssl=False).login(mailbox, "wrong")
    started = time.monotonic()
    dovecot.client(mailbox).logout()
    assert time.monotonic() - started < 1.0, "Dovecot's per-IP auth penalty should be off"


def test_dovecot_noidle_does_not_offer_idle(dovecot_noidle: Dovecot) -> None:
    user = dovecot_noidle.new_user()
    with dovecot_noidle.client(user) as imap:
        assert not imap.has_capability("IDLE")
        assert imap.has_capability("UIDPLUS") and imap.has_capability("CONDSTORE")


def test_dovecot_pause_freezes_and_restart_keeps_mail(tmp_path: Path) -> None:
    with Dovecot(tmp_path / "dovecot", users=1) as server:
        uid = server.append("user1", b"Subject: kept\r\n\r\nkept\r\n")
        client = server.client("user1", timeout=0.5)
        server.pause()
        try:
            with pytest.raises((TimeoutError, OSError)):
                client.noop()
        finally:
            server.resume()
        server.restart()
        with server.client("user1") as imap:
            imap.select_folder("INBOX", readonly=True)
            assert imap.search("ALL") == [uid]
        master = server.master_pid
    assert master is not None and not Path(f"/proc/{master}").exists()


@pytest.mark.parametrize("kind", ["valid", "self_signed", "expired", "wrong_host"])
def test_dovecot_tls_certificates(tmp_path: Path, kind: str) -> None:
    with Dovecot(tmp_path / "dovecot", users=1, tls=True, tls_cert=kind) as server:
        context = ssl.create_default_context(cafile=str(server.ca_file))
        if kind == "valid":
            with server.client("user1") as imap:
                assert imap.select_folder("INBOX")[b"EXISTS"] == 0
            plain = imapclient.IMAPClient(server.host, port=server.starttls_port, ssl=False)
            plain.starttls(context)
            plain.login("user1", server.password)
            plain.logout()
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                imapclient.IMAPClient(server.host, port=server.port, ssl=True, ssl_context=context)


def test_start_failure_names_the_log(tmp_path: Path) -> None:
    broken = Dovecot(tmp_path / "dovecot", extra_conf="no_such_setting = 1\n")
    with pytest.raises(ServerStartError, match="no_such_setting"):
        broken.start()


def test_postgres_runs_sql_and_survives_a_crash(postgres: Postgres, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
        assert conn.execute("SELECT sum(n) FROM t").fetchone() == (3,)
    postgres.restart(mode="immediate")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_moto_sqs_send_and_receive(moto: MotoServer, sqs_queue: str, sqs_fifo_queue: str) -> None:
    sqs = moto.client("sqs")
    sqs.send_message(QueueUrl=sqs_queue, MessageBody="standard")
    sqs.send_message_batch(
        QueueUrl=sqs_fifo_queue,
        Entries=[
            {"Id": str(n), "MessageBody": f"fifo {n}", "MessageGroupId": "acct",
             "MessageDeduplicationId": f"key-{n % 2}"}
            for n in range(3)
        ],
    )
    standard = sqs.receive_message(QueueUrl=sqs_queue, WaitTimeSeconds=1)["Messages"]
    assert [m["Body"] for m in standard] == ["standard"]
    fifo = sqs.receive_message(QueueUrl=sqs_fifo_queue, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in fifo] == ["fifo 0", "fifo 1"], "third entry deduplicated"
    moto.create_bucket("claim-checks")  # the session's moto may hold other tests' buckets too
    assert "claim-checks" in {bucket["Name"] for bucket in moto.client("s3").list_buckets()["Buckets"]}


def test_node_exporter_and_prometheus_see_a_textfile_metric(
    tmp_path: Path, node_exporter, prometheus
) -> None:
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    (textfiles / "mailingestd.prom").write_text(
        "# HELP mailingestd_devservers_probe_total A probe.\n"
        "# TYPE mailingestd_devservers_probe_total counter\n"
        'mailingestd_devservers_probe_total{role="test"} 7\n'
    )
    exporter = node_exporter(textfiles)
    assert 'mailingestd_devservers_probe_total{role="test"} 7' in exporter.scrape()
    server = prometheus([exporter.target])
    (series,) = server.wait_for_series('mailingestd_devservers_probe_total{role="test"}', timeout=30)
    assert series["value"][1] == "7"


def test_samplemail_is_crlf_parseable_and_unique() -> None:
    rng = random.Random(7)
    generated = [random_message(rng) for _ in range(100)]
    named = dict(corpus())
    for raw in [*named.values(), *generated]:
        assert b"\n" not in raw.replace(b"\r\n", b"")
    ids = [email.message_from_bytes(raw)["Message-ID"] for raw in generated]
    assert len(set(ids)) == len(ids)
    assert all(2_000 <= len(raw) <= 50_000 or len(raw) >= 1_000_000 for raw in generated)
    assert email.message_from_bytes(named["no_message_id"])["Message-ID"] is None
    parsed = email.message_from_bytes(named["rfc2047_latin1"], policy=email.policy.default)
    assert parsed["Subject"] == "Crème brûlée à la carte"
    assert abs(len(make_large(2_000_000)) - 2_000_000) < 20_000
