"""Data lifecycle against real servers: PostgreSQL partitions and retention, S3 blobs on moto_server.

What each test proves is in its name; docs/data-lifecycle.md explains the design.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid

import msgspec
import pytest

from mailingestd.store import blobs, partitions, retention, schema
from mailingestd.config import BlobsConfig, QueueConfig, StoreConfig
from mailingestd.fetch.message import parse_headers
from mailingestd.publish.publisher import Publisher
from devtools.samplemail import corpus, make_large
from mailingestd.store.store import StoredMessage, open_store

DAY = 86400


def stored(uid: int, raw: bytes) -> StoredMessage:
    h = parse_headers(raw)
    return StoredMessage(uid=uid, raw=raw, size=len(raw), internaldate=None, message_id=h.message_id,
                         from_=h.from_, to=h.to, cc=h.cc, subject=h.subject, date=h.date,
                         in_reply_to=h.in_reply_to, references=h.references)


def message(uid: int, size: int = 2000) -> StoredMessage:
    raw = f"Message-ID: <{uid}@lifecycle>\r\nSubject: m{uid}\r\n\r\n".encode() + b"y" * size + b"\r\n"
    return stored(uid, raw)


def commit(st, account: str, uids, announce: bool = True, size: int = 2000, uidvalidity: int = 7) -> int:
    mailbox = st.get_mailbox(account, "INBOX") or st.start_mailbox(account, "INBOX", uidvalidity)
    uids = list(uids)
    return st.commit_batch(mailbox, [message(u, size) for u in uids], settled_uid=uids[-1], announce=announce)


def rows(st, sql: str, params: tuple = ()) -> list[tuple]:
    with st.transaction() as cur:
        return st.execute(cur, sql, params).fetchall()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    st = open_store(url)
    yield st
    st.close()


# --- the commit of a batch, in both dialects ----------------------------------------------------
def test_batch_commit_is_exactly_once_and_refused_under_a_new_uidvalidity(any_store):
    st = any_store
    opened = st.open_mailbox("acct", "INBOX", 7, uidnext=1)
    assert opened.created and opened.previous_uidvalidity is None and opened.state.last_uid == 0
    box = opened.state
    assert st.commit_batch(box, [message(1), message(2)], settled_uid=2, highestmodseq=5) == 2
    assert st.commit_batch(box, [message(1), message(2), message(3)], settled_uid=3) == 1, "stored keys: no-ops"
    assert st.commit_batch(box, [message(4)], settled_uid=4, announce=False) == 1
    assert rows(st, "SELECT key FROM outbox ORDER BY id") == [(f"acct/INBOX/7/{u}",) for u in (1, 2, 3)]
    stored_rows = rows(st, 'SELECT uid, size, "from", subject, sha256, blob FROM messages ORDER BY uid')
    assert [(r[0], r[1], r[5]) for r in stored_rows] == [(u, message(u).size, None) for u in (1, 2, 3, 4)]
    assert stored_rows[0][2:5] == (message(1).from_, message(1).subject, hashlib.sha256(message(1).raw).hexdigest())
    st.commit_batch(box, [], settled_uid=1)
    again = st.open_mailbox("acct", "INBOX", 7, uidnext=9)
    assert not again.created and again.previous_uidvalidity is None
    assert (again.state.last_uid, again.state.highestmodseq) == (4, 5), "the checkpoint never moves back"
    changed = st.open_mailbox("acct", "INBOX", 8, uidnext=9)  # UIDVALIDITY changed under a batch in flight
    assert changed.previous_uidvalidity == 7 and changed.state.resync_below == 9 and changed.state.last_uid == 0
    assert rows(st, "SELECT old_uidvalidity, new_uidvalidity FROM uidvalidity_changes") == [(7, 8)]
    with pytest.raises(Exception, match="changed UIDVALIDITY"):
        st.commit_batch(box, [message(5)], settled_uid=5)
    assert st.counts()["messages"] == 4 and st.get_mailbox("acct", "INBOX").last_uid == 0


# --- PostgreSQL partitions --------------------------------------------------------------------------
def test_partitions_are_created_ahead_and_contiguous(pg_url):
    st = open_store(pg_url)
    now = time.time()
    created = partitions.ensure_partitions(st, "day", ahead=3, now=now)
    parts = [p for p in partitions.list_partitions(st) if p.start is not None]
    assert parts[-1].end >= partitions.period_start(now, "day") + 4 * DAY, created
    assert all(a.end == b.start for a, b in zip(parts, parts[1:])), "partitions leave no gap"
    assert partitions.ensure_partitions(st, "day", ahead=3, now=now) == [], "idempotent"
    # Switching to weekly partitions continues where the daily ones end, up to a Monday boundary.
    weekly = partitions.ensure_partitions(st, "week", ahead=2, now=now)
    parts = [p for p in partitions.list_partitions(st) if p.start is not None]
    assert weekly and all(a.end == b.start for a, b in zip(parts, parts[1:]))
    assert time.gmtime(parts[-1].end).tm_wday == 0 and parts[-1].end - parts[-1].start == 7 * DAY
    # Rows land in their partition, not in DEFAULT.
    commit(st, "acct", range(1, 4))
    assert rows(st, "SELECT COUNT(*) FROM messages_default") == [(0,)]
    # Raw bytes are compressed with lz4 (migration 5) in every partition, those made later included.
    compression = rows(st, "SELECT c.relname, a.attcompression FROM pg_attribute a JOIN pg_class c ON "
                           "c.oid = a.attrelid WHERE a.attname = 'raw' AND left(c.relname, 8) = 'messages' "
                           "AND c.relkind IN ('r', 'p')")
    assert len(compression) == len(parts) + 2 and all(method == "l" for _, method in compression), compression
    st.close()


def test_migration_moves_old_table_and_retention_drops_only_whole_announced_partitions(postgres, monkeypatch):
    url = postgres.create_database(f"test_{uuid.uuid4().hex}")
    # A store as it was before migration 3: the plain messages table, with rows on three old days.
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
    old = open_store(url)
    now = time.time()
    days = [partitions.period_start(now - d * DAY, "day") for d in (40, 39, 38)]
    old.start_mailbox("acct", "INBOX", 7)
    with old.transaction() as cur:
        for n, day in enumerate(days):
            for i in range(3):
                uid = n * 3 + i + 1
                old.execute(cur, "INSERT INTO messages (account_id, folder, uidvalidity, uid, size, raw, sha256, "
                               "ingested_at) VALUES ('acct', 'INBOX', 7, ?, 3, ?, 'x', ?)", (uid, b"raw", day + 60 * i))
        old.execute(cur, "UPDATE mailboxes SET last_uid = 9")
        # The message of day -39 with UID 4 was never announced.
        old.execute(cur, "INSERT INTO outbox (key, account_id, envelope, raw_size, created_at) "
                       "VALUES ('acct/INBOX/7/4', 'acct', '{}', 3, ?)", (now,))
    old.close()
    monkeypatch.undo()

    st = open_store(url)  # migration 3 runs here
    names = {p.name for p in partitions.list_partitions(st)}
    day_names = [partitions._name(d) for d in days]
    assert set(day_names) <= names and "messages_default" in names
    assert rows(st, "SELECT COUNT(*) FROM messages") == [(9,)]
    assert rows(st, "SELECT COUNT(*) FROM message_keys") == [(9,)]
    assert rows(st, f'SELECT COUNT(*) FROM "{day_names[1]}"') == [(3,)]
    # Exactly-once holds across the move: a migrated key is a no-op.
    assert commit(st, "acct", [5]) == 0
    assert commit(st, "acct", [10]) == 1

    cfg = StoreConfig(raw_retention=7 * DAY, metadata_retention=30 * DAY, retention_batch=2, retention_pause=0.0)
    result = retention.run_pass(st, cfg, now=now)
    assert sorted(result.partitions_dropped) == sorted([day_names[0], day_names[2]])
    names = {p.name for p in partitions.list_partitions(st)}
    assert day_names[1] in names, "a partition holding an unannounced row is never dropped"
    assert rows(st, "SELECT raw FROM messages WHERE uid = 4") == [(b"raw",)], "unannounced raw bytes stay"
    assert rows(st, "SELECT raw FROM messages WHERE uid = 5") == [(None,)], "announced old raw bytes go"
    assert ("acct/INBOX/7/4",) in rows(st, "SELECT key FROM outbox"), "the outbox is never pruned"
    # Keys of dropped rows go (they are below the checkpoint); the unannounced one's stays.
    keys = {r[0] for r in rows(st, "SELECT uid FROM message_keys")}
    assert 4 in keys and not {1, 2, 3, 7, 8, 9} & keys
    assert commit(st, "acct", [10]) == 0, "a recent key is still refused"
    # Once announced, its partition goes on the next pass.
    with st.transaction() as cur:
        st.execute(cur, "DELETE FROM outbox")
    assert retention.run_pass(st, cfg, now=now).partitions_dropped == [day_names[1]]
    st.close()


# --- retention while ingest runs (both backends) -----------------------------------------------------
def test_ingest_undisturbed_while_a_retention_pass_runs(any_store):
    st = any_store
    seeded = 4000
    for start in range(1, seeded + 1, 500):
        commit(st, "old", range(start, start + 500), announce=False, size=4000)
    cfg = StoreConfig(raw_retention=7 * DAY, metadata_retention=0, retention_batch=100, retention_pause=0.02)
    outcome: dict[str, object] = {}

    def run() -> None:
        outcome["started"] = time.monotonic()
        outcome["result"] = retention.run_pass(st, cfg, now=time.time() + 8 * DAY)
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    latencies = []
    uid = 0
    while thread.is_alive():
        uid += 1
        began = time.monotonic()
        assert commit(st, "new", [uid]) == 1
        latencies.append((began, time.monotonic() - began))
        time.sleep(0.05)
    thread.join()
    during = [lat for began, lat in latencies if outcome["started"] <= began <= outcome["ended"]]
    assert outcome["result"].raw_pruned == seeded
    assert len(during) >= 3, f"the pass ({outcome['ended'] - outcome['started']:.2f}s) overlapped too few commits"
    assert max(during) < 5.0, f"a new message waited {max(during):.2f}s for the store during retention"
    assert rows(st, "SELECT COUNT(*) FROM messages WHERE account_id = 'new' AND raw IS NOT NULL") == [(uid,)]


def test_sqlite_metadata_retention_deletes_only_checkpointed_rows(tmp_path):
    st = open_store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    commit(st, "acct", range(1, 11))
    mailbox = st.get_mailbox("acct", "INBOX")
    # UIDs 11..12 committed without moving the checkpoint past 10 (as a retried tail would be).
    st.commit_batch(mailbox, [message(11), message(12)], settled_uid=10)
    with st.transaction() as cur:
        st.execute(cur, "DELETE FROM outbox WHERE key != 'acct/INBOX/7/3'")
    cfg = StoreConfig(raw_retention=7 * DAY, metadata_retention=30 * DAY, retention_batch=3, retention_pause=0.0)
    result = retention.run_pass(st, cfg, now=time.time() + 31 * DAY)
    left = sorted(r[0] for r in rows(st, "SELECT uid FROM messages"))
    assert left == [3, 11, 12], "above the checkpoint or unannounced rows stay"
    assert result.rows_deleted == 9 and result.raw_pruned == 2
    st.close()


# --- S3 blobs on moto ----------------------------------------------------------------------------------
@pytest.fixture
def bucket(moto):
    name = f"raw-{uuid.uuid4().hex[:16]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


def s3_blobs(moto, bucket: str) -> blobs.S3Blobs:
    return blobs.S3Blobs(BlobsConfig(kind="s3", bucket=bucket, prefix="raw/", endpoint_url=moto.endpoint_url))


def test_raw_bytes_in_s3_byte_identical_and_pointer_envelope_followed_by_consumer(moto, bucket, sqs_queue, pg_url):
    st = open_store(pg_url)
    st.blobs = s3_blobs(moto, bucket)
    samples = [*corpus(), ("large-3MB", make_large(3 * 1024 * 1024))]
    mailbox = st.start_mailbox("acct", "INBOX", 9)
    msgs = [stored(uid, raw) for uid, (_, raw) in enumerate(samples, 1)]
    assert st.commit_batch(mailbox, msgs, settled_uid=len(msgs)) == len(msgs)
    s3 = moto.client("s3")
    for uid, (name, raw) in enumerate(samples, 1):
        key = f"acct/INBOX/9/{uid}"
        assert s3.get_object(Bucket=bucket, Key="raw/" + key)["Body"].read() == raw, name
        (row,) = rows(st, "SELECT raw, blob, sha256 FROM messages WHERE uid = %s", (uid,))
        assert row[0] is None and row[1] == f"s3://{bucket}/raw/{key}"
        assert blobs.read_raw(st, key, None, BlobsConfig(kind="s3", bucket=bucket,
                                                         endpoint_url=moto.endpoint_url)) == raw
    # Announce on SQS, then consume the way an SQS Extended Client user does: follow the pointer.
    publisher = Publisher(st, QueueConfig(kind="sqs", url=sqs_queue, endpoint_url=moto.endpoint_url))
    while st.outbox_depth():
        publisher.publish_once()
    sqs = moto.client("sqs")
    got = {}
    for _ in range(20):
        for m in sqs.receive_message(QueueUrl=sqs_queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            body = json.loads(m["Body"])
            cls, target = body["raw_pointer"]
            assert cls == "software.amazon.payloadoffloading.PayloadS3Pointer"
            raw = s3.get_object(Bucket=target["s3BucketName"], Key=target["s3Key"])["Body"].read()
            assert blobs.hashlib.sha256(raw).hexdigest() == body["sha256"]
            got[body["uid"]] = raw
        if len(got) == len(samples):
            break
    assert got == {uid: raw for uid, (_, raw) in enumerate(samples, 1)}
    st.close()


def test_crash_between_s3_write_and_commit_leaves_only_orphans(moto, bucket, pg_url):
    st = open_store(pg_url)
    mailbox = st.start_mailbox("acct", "INBOX", 9)
    batch = [message(uid, 5000) for uid in (1, 2, 3)]
    pid = os.fork()
    if pid == 0:  # the ingesting process: PUTs succeed, then it dies before its transaction commits
        try:
            child = open_store(pg_url)
            child.blobs = s3_blobs(moto, bucket)
            child.blobs.after_put = lambda: os._exit(137)
            child.commit_batch(child.get_mailbox("acct", "INBOX"), batch, settled_uid=3)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 137
    s3 = moto.client("s3")
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    assert listed == [f"raw/acct/INBOX/9/{u}" for u in (1, 2, 3)], "the objects were written first"
    assert rows(st, "SELECT COUNT(*) FROM messages") == [(0,)], "no row points at anything"
    assert st.get_mailbox("acct", "INBOX").last_uid == 0, "the checkpoint did not move: the batch is retried"
    # The retry adopts the orphans (same keys, same bytes): nothing dangles, nothing extra.
    st.blobs = s3_blobs(moto, bucket)
    assert st.commit_batch(mailbox, batch, settled_uid=3) == 3
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]) == listed
    for m in batch:
        (ref,) = rows(st, "SELECT blob FROM messages WHERE uid = %s", (m.uid,))[0]
        assert st.blobs.get(ref) == m.raw
    st.close()


def test_s3_unreachable_fails_the_batch_before_any_row(pg_url):
    st = open_store(pg_url)
    st.blobs = blobs.S3Blobs(BlobsConfig(kind="s3", bucket="nowhere", endpoint_url="http://127.0.0.1:9",
                                         timeout=2))
    mailbox = st.start_mailbox("acct", "INBOX", 9)
    with pytest.raises(blobs.BlobError):
        st.commit_batch(mailbox, [message(1)], settled_uid=1)
    assert rows(st, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert st.get_mailbox("acct", "INBOX").last_uid == 0
    st.close()


def test_config_refuses_metadata_retention_shorter_than_raw(tmp_path):
    from mailingestd import config

    path = tmp_path / "c.toml"
    path.write_text('[store]\nraw_retention = "7d"\nmetadata_retention = "2d"\n')
    with pytest.raises(config.ConfigError, match="metadata_retention"):
        config.load(str(path), environ={})
    path.write_text('[blobs]\nkind = "s3"\n')
    with pytest.raises(config.ConfigError, match="blobs.bucket"):
        config.load(str(path), environ={})
    assert msgspec.structs.replace(config.Config().store).metadata_retention == 30 * DAY
