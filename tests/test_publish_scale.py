"""The publisher at SQS speed: claims across nodes, concurrency that keeps FIFO order, full batches.

The queue is bench/sqs_sink.py (the SQS JSON protocol boto3 speaks, counting what arrives per
envelope key and in which order; moto_server is too slow for these amounts); the store is the
session PostgreSQL. Outbox rows are written directly: what is tested starts at the outbox.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from harness import Daemon, account_toml, wait_until

from bench.sqs_sink import SqsSink
from mailingestd.config import QueueConfig
from mailingestd.publish.publisher import Publisher
from mailingestd.store.store import PostgresStore, StoredMessage, open_store


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[SqsSink]:
    with SqsSink(record=True) as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        yield server


def fill_outbox(pg_url: str, accounts: int, per_account: int, body_bytes: int = 300) -> list[str]:
    """Outbox rows interleaved across accounts (as concurrent workers commit them); their keys in id order."""
    keys = [f"acct{a:03d}/INBOX/1/{uid}" for uid in range(1, per_account + 1) for a in range(accounts)]
    with psycopg.connect(pg_url) as conn, conn.cursor() as cur:
        with cur.copy("COPY outbox (key, account_id, envelope, raw_size, created_at) FROM STDIN") as copy:
            for key in keys:
                copy.write_row((key, key.split("/")[0], json.dumps({"key": key, "pad": "x" * body_bytes}), 100,
                                time.time()))
    return keys


def queue_config(url: str, sink: SqsSink, **extra: Any) -> QueueConfig:
    return QueueConfig(kind="sqs", url=url, endpoint_url=sink.endpoint_url, region=sink.region, poll_interval=0.05,
                       **extra)


def drain(publishers: list[Publisher], store: PostgresStore, timeout: float = 60) -> None:
    """Run every publisher in its own thread until the outbox is empty."""
    done = threading.Event()
    threads = [threading.Thread(target=p.run, args=(done.is_set,), daemon=True) for p in publishers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    try:
        while store.outbox_depth() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        done.set()
        for thread in threads:
            thread.join(15)
    assert store.outbox_depth() == 0, "the outbox was not drained"


def test_two_nodes_send_each_outbox_row_exactly_once(pg_url: str, sink: SqsSink) -> None:
    """Two publishers of two nodes on one store, at once: every row reaches the queue exactly once
    (before claims, each publisher read the oldest rows whoever else was sending them)."""
    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    keys = fill_outbox(pg_url, accounts=20, per_account=100)
    url = sink.create_queue(f"two-{uuid.uuid4().hex[:8]}")
    publishers = [Publisher(open_store(pg_url), queue_config(url, sink, concurrency=2), node=node, claim_seconds=30)
                  for node in ("node-a", "node-b")]
    drain(publishers, store)
    arrived = sink.stats(url)["keys"]
    assert sorted(arrived) == sorted(keys)
    assert [k for k, n in arrived.items() if n != 1] == []
    # Which publisher sent how many is timing: with no leases, a node that claimed rows of every
    # account keeps the other off them (one sender per account at a time) until it is done.
    assert sum(p.stats.sent for p in publishers) == len(keys)


def test_fifo_sends_message_groups_side_by_side_in_order(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO queue 50 ms away: several SendMessageBatch calls are in flight at once (for different
    message groups), and every group arrives in outbox order."""
    with SqsSink(record=True, delay=0.05) as slow:
        for name, value in slow.env.items():
            monkeypatch.setenv(name, value)
        store = open_store(pg_url)
        keys = fill_outbox(pg_url, accounts=16, per_account=40)
        url = slow.create_queue(f"groups-{uuid.uuid4().hex[:8]}.fifo")
        started = time.monotonic()
        drain([Publisher(store, queue_config(url, slow, concurrency=4))], store)
        seconds = time.monotonic() - started
        stats = slow.stats()
    order = stats[url.rsplit("/", 1)[1]]["order"]
    assert sorted(order) == sorted(keys)
    for account in {k.split("/")[0] for k in keys}:
        uids = [int(k.rsplit("/", 1)[1]) for k in order if k.startswith(account + "/")]
        assert uids == sorted(uids), f"{account} out of order: {uids[:20]}"
    assert stats["sink:"]["max_in_flight"] >= 3, stats["sink:"]
    # 64 requests of 10 one after the other would take 3.2 s at 50 ms each.
    assert seconds < 2.5, seconds


def test_batches_fill_to_ten_entries_and_one_mebibyte(pg_url: str, sink: SqsSink) -> None:
    """Envelopes of 200 KB go five to a request (SQS takes 1 MiB per message and per request since
    2025; 256 KiB was hard-coded), small ones ten to a request."""
    store = open_store(pg_url)
    url = sink.create_queue(f"big-{uuid.uuid4().hex[:8]}")
    big = fill_outbox(pg_url, accounts=1, per_account=10, body_bytes=200_000)
    drain([Publisher(store, queue_config(url, sink))], store)
    assert sink.stats(url)["requests"] == 2 and sink.stats(url)["entries"] == len(big)
    small = fill_outbox(pg_url, accounts=5, per_account=20)
    drain([Publisher(store, queue_config(url, sink))], store)
    assert sink.stats(url)["requests"] == 2 + len(small) // 10


def test_acknowledged_rows_are_deleted_in_one_statement_per_step(pg_url: str, sink: SqsSink) -> None:
    """A statement-level trigger counts DELETEs on the outbox: 1,000 rows go in a few statements,
    not one per row."""
    store = open_store(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE deletes (at TIMESTAMPTZ DEFAULT clock_timestamp())")
        conn.execute("""CREATE FUNCTION count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN INSERT INTO deletes DEFAULT VALUES; RETURN NULL; END $$""")
        conn.execute("CREATE TRIGGER count_delete AFTER DELETE ON outbox FOR EACH STATEMENT "
                     "EXECUTE FUNCTION count_delete()")
    fill_outbox(pg_url, accounts=10, per_account=100)
    url = sink.create_queue(f"del-{uuid.uuid4().hex[:8]}")
    drain([Publisher(store, queue_config(url, sink))], store)
    with psycopg.connect(pg_url) as conn:
        statements = conn.execute("SELECT count(*) FROM deletes").fetchone()[0]
    assert sink.stats(url)["entries"] == 1000
    assert statements <= 10, f"{statements} DELETE statements for 1,000 rows"


def test_claims_follow_leases_and_lapse_with_a_dead_node(pg_url: str) -> None:
    """Store.outbox_claim: a node claims the rows of accounts it leases and of accounts nobody
    leases, never those of another node's live lease; rows a node claimed and never sent (it died)
    are claimable by another node once the claim lapses, not before; a claim given back
    (a publisher's clean exit) frees the rows at once."""
    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    fill_outbox(pg_url, accounts=3, per_account=4)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for account, owner in (("acct000", "node-a"), ("acct001", "node-b")):
            conn.execute("INSERT INTO accounts (id, host, username, created_at, updated_at) VALUES (%s, 'h', 'u', 0, 0)",
                         (account,))
            conn.execute("INSERT INTO leases (account_id, owner, expires_at) VALUES (%s, %s, now() + interval '1 hour')",
                         (account, owner))

    def accounts(entries: list) -> set[str]:
        return {e.account_id for e in entries}

    # node-a: its own account and the unleased acct002; node-b's rows are not offered to it.
    claimed_a = store.outbox_claim("node-a", 100, 0, 2.0)
    assert accounts(claimed_a) == {"acct000", "acct002"} and len(claimed_a) == 8
    # node-b: its own account only; acct002's rows are node-a's while its claim lives.
    assert accounts(store.outbox_claim("node-b", 100, 0, 2.0)) == {"acct001"}
    # node-a dies holding its claims; its lease lapses too: node-b may take acct000 and acct002
    # only after the 2 s claim.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE leases SET expires_at = now() - interval '1 second' WHERE owner = 'node-a'")
    assert accounts(store.outbox_claim("node-b", 100, 0, 2.0)) == {"acct001"}
    time.sleep(2.2)
    assert accounts(store.outbox_claim("node-b", 100, 0, 30.0)) == {"acct000", "acct001", "acct002"}
    # A clean exit gives the claims back: node-c (leasing nothing) may take the unleased rows at once.
    assert accounts(store.outbox_claim("node-c", 100, 0, 30.0)) == set()
    store.outbox_release("node-b")
    assert accounts(store.outbox_claim("node-c", 100, 0, 30.0)) == {"acct000", "acct002"}
    store.close()


def test_a_fifo_group_waits_behind_its_failing_entry_until_it_is_parked(moto: Any, tmp_path: Any) -> None:
    """moto, a FIFO queue taking at most 1,024 bytes per message: group A's first entry is too big.
    A's later entries are not sent past it while it is retried (that would reorder the group), B's
    go at once; once the bad entry is parked (PARK_AFTER failures) A's entries follow, in order."""
    sqs = moto.client("sqs")
    url = sqs.create_queue(QueueName=f"hold-{time.monotonic_ns()}.fifo",
                           Attributes={"FifoQueue": "true", "MaximumMessageSize": "1024"})["QueueUrl"]
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    box_a, box_b = store.start_mailbox("acct-a", "INBOX", 1), store.start_mailbox("acct-b", "INBOX", 1)
    store.commit_batch(box_a, [_stored(1, "x" * 1500)], settled_uid=1)
    store.commit_batch(box_b, [_stored(uid, f"b{uid}") for uid in (1, 2)], settled_uid=2)
    store.commit_batch(box_a, [_stored(uid, f"a{uid}") for uid in (2, 3, 4)], settled_uid=4)
    clock = [0.0]
    publisher = Publisher(store, QueueConfig(kind="sqs", url=url, endpoint_url=moto.endpoint_url, retry_base=1,
                                             retry_max=20), clock=lambda: clock[0])
    arrived: list[tuple[str, str]] = []

    def receive() -> None:
        while True:
            reply = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["MessageGroupId"])
            if not reply.get("Messages"):
                return
            for message in reply["Messages"]:
                arrived.append((message["Attributes"]["MessageGroupId"], json.loads(message["Body"])["subject"]))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    for _ in range(3):  # the first three tries of the bad entry: A waits, B goes
        publisher.publish_once()
        clock[0] += 5.0
    receive()
    assert sorted(arrived) == [("acct-b", "b1"), ("acct-b", "b2")], arrived
    for _ in range(40):
        publisher.publish_once()
        clock[0] += 5.0
        if store.outbox_depth() == 1:
            break
    receive()
    assert [subject for group, subject in arrived if group == "acct-a"] == ["a2", "a3", "a4"]
    assert publisher.stats.parked == 1 and store.outbox_depth() == 1
    store.close()


def _stored(uid: int, subject: str) -> StoredMessage:
    raw = f"Subject: {subject}\r\nMessage-ID: <h{uid}.{subject[:8]}@t>\r\n\r\nbody\r\n".encode()
    return StoredMessage(uid=uid, raw=raw, size=len(raw), internaldate=None, message_id=f"<h{uid}@t>", from_=None,
                         to=None, cc=None, subject=subject, date=None, in_reply_to=None, references=None)


def test_an_idle_publisher_on_postgresql_is_woken_by_the_commit(dovecot, postgres, moto, sqs_queue, tmp_path):
    """With PostgreSQL the commit that queues an announcement NOTIFYs the publisher: a message
    reaches the queue within seconds although queue.poll_interval is 30 s (an idle publisher
    polling at that interval would take up to 30 s; it looks at most once a heartbeat)."""
    user = dovecot.new_user()
    store_url = postgres.create_database(f"wake_{uuid.uuid4().hex[:12]}")
    queue = (f'[queue]\nkind = "sqs"\nurl = "{sqs_queue}"\nendpoint_url = "{moto.endpoint_url}"\n'
             f'region = "{moto.region}"\npoll_interval = "30s"\n')
    sqs = moto.client("sqs")
    with Daemon(tmp_path, accounts=account_toml(user, dovecot.host, dovecot.port), store_url=store_url,
                password=dovecot.password, sections=queue, env=moto.env, heartbeat_timeout="60s") as daemon:
        wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == 1, 30, 0.2, "the account idling")
        time.sleep(2)  # the publisher has found the outbox empty and waits
        appended_at = time.monotonic()
        uid = dovecot.append(user, b"Subject: wake\r\nMessage-ID: <wake@t>\r\n\r\nbody\r\n")

        def envelope() -> list[dict[str, Any]]:
            reply = sqs.receive_message(QueueUrl=sqs_queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            return [json.loads(m["Body"]) for m in reply.get("Messages", [])]

        bodies = wait_until(envelope, 30, 0.1, "the envelope on the queue")
        waited = time.monotonic() - appended_at
        assert [(b["account_id"], b["uid"]) for b in bodies] == [(user, uid)]
        assert waited < 6.0, waited
        assert all(child["restarts"] == 0 for child in daemon.status()["children"])


def test_a_publisher_polling_less_often_than_the_heartbeat_timeout_stays_alive(dovecot, moto, sqs_queue, tmp_path):
    """SQLite has no commit NOTIFY: an idle publisher looks at the outbox every queue.poll_interval.
    An interval longer than daemon.heartbeat_timeout (7 s against 5 s here) must not get it killed
    as stuck: it heartbeats while it waits, publishes what comes, and stops when told."""
    user = dovecot.new_user()
    queue = (f'[queue]\nkind = "sqs"\nurl = "{sqs_queue}"\nendpoint_url = "{moto.endpoint_url}"\n'
             f'region = "{moto.region}"\npoll_interval = "7s"\n')
    sqs = moto.client("sqs")
    with Daemon(tmp_path, accounts=account_toml(user, dovecot.host, dovecot.port), password=dovecot.password,
                sections=queue, env=moto.env, heartbeat_timeout="5s") as daemon:
        wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == 1, 30, 0.2, "the account idling")
        time.sleep(8)  # more than a poll interval and a heartbeat timeout, found idle
        uid = dovecot.append(user, b"Subject: late\r\nMessage-ID: <late@t>\r\n\r\nbody\r\n")

        def envelope() -> list[dict[str, Any]]:
            reply = sqs.receive_message(QueueUrl=sqs_queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            return [json.loads(m["Body"]) for m in reply.get("Messages", [])]

        bodies = wait_until(envelope, 30, 0.1, "the envelope on the queue")
        assert [(b["account_id"], b["uid"]) for b in bodies] == [(user, uid)]
        publisher = next(c for c in daemon.status()["children"] if c["role"] == "publisher")
        assert publisher["restarts"] == 0, publisher
        stuck = [line for line in daemon.log_path.read_text().splitlines()
                 if "event=child_stuck" in line and "role=publisher" in line]
        assert stuck == []
        stopping = time.monotonic()
        assert daemon.stop(signal.SIGTERM, timeout=30) == 0
        assert time.monotonic() - stopping < 5.0  # its wait ends at the stop, not up to 7 s later
