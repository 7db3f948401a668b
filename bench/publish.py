"""publish: a full outbox drained onto the queue by the daemon's publisher, beside a bare boto3 loop.

Both send into bench/sqs_sink.py (the SQS JSON protocol boto3 speaks, counting entries; moto_server
takes 55-130 msg/s here and would measure itself). For a standard and a FIFO queue in turn:

- publisher: the real daemon (``mailingestd --config``, PostgreSQL store, no accounts, so only the
  publisher works) is started on an empty outbox; then ``PUBLISH_MESSAGES`` envelopes, spread over
  ``PUBLISH_ACCOUNTS`` accounts (message groups) as a backlog's would be, are committed into the
  outbox in one transaction, and the clock runs from that commit until the sink has counted every
  entry. CPU is the publisher process's own (utime + stime from /proc) over that time; PostgreSQL's
  (claims and deletes) is reported beside it.
- bare loop: the same envelopes sent by one thread with boto3 ``send_message_batch`` in requests of
  10 (FIFO: group and deduplication ids as the publisher sets them), nothing else: the floor any
  Python client pays. CPU is that process's. Half the envelopes go right before the publisher's
  run and half right after, and the floor is their combined rate: the machine is shared, and a
  load that comes or goes during one of the runs weighs on both sides alike.

Targets (issue #19): >= 2,000 envelopes/s and >= 0.8x the bare loop, for both queue kinds.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

import psycopg

from bench import cpu as bench_cpu
from bench.common import BenchDaemon, cpu_seconds, process_tree, rnd
from bench.sqs_sink import SqsSink
from devtools.devservers import Postgres
from devtools.samplemail import random_message
from mailingestd.envelope import make_envelope
from mailingestd.fetch.message import parse_headers
from mailingestd.keys import message_key
from mailingestd.store.store import StoredMessage, open_store

PUBLISH_MESSAGES = 100_000
PUBLISH_ACCOUNTS = 100
TARGET_RATE = 2000.0
TARGET_RATIO = 0.8


def envelopes(count: int, accounts: int, seed: int = 19) -> list[tuple[str, str, str, int]]:
    """(key, account_id, envelope, raw_size) rows as the workers would commit them: realistic headers
    from a pool of generated messages, UIDs rising per account, accounts interleaved."""
    rng = random.Random(seed)
    pool = []
    for _ in range(200):
        raw = random_message(rng)
        headers = parse_headers(raw)
        pool.append((raw, headers))
    rows = []
    now = time.time()
    for index in range(count):
        account_id, uid = f"acct{index % accounts:04d}", index // accounts + 1
        raw, headers = pool[index % len(pool)]
        message = StoredMessage(uid=uid, raw=b"", size=len(raw), internaldate=None, message_id=headers.message_id,
                                from_=headers.from_, to=headers.to, cc=headers.cc, subject=headers.subject,
                                date=headers.date, in_reply_to=headers.in_reply_to, references=headers.references)
        rows.append((message_key(account_id, "INBOX", 1, uid), account_id,
                     make_envelope(account_id, "INBOX", 1, message, now, resync=False), len(raw)))
    return rows


def fill(store_url: str, rows: list[tuple[str, str, str, int]]) -> None:
    """Every row in one transaction: the publisher sees the whole backlog at once."""
    with psycopg.connect(store_url) as conn, conn.cursor() as cur:
        with cur.copy("COPY outbox (key, account_id, envelope, raw_size, created_at) FROM STDIN") as copy:
            now = time.time()
            for row in rows:
                copy.write_row((*row, now))


def wait_entries(sink: SqsSink, queue_url: str, count: int, timeout: float) -> float | None:
    """Monotonic time the sink had counted ``count`` entries on the queue, or None at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sink.stats(queue_url).get("entries", 0) >= count:
            return time.monotonic()
        time.sleep(0.05)
    return None


def run_publisher(root: Any, postgres: Postgres, sink: SqsSink, fifo: bool,
                  rows: list[tuple[str, str, str, int]]) -> dict[str, Any]:
    name = f"publish-{'fifo' if fifo else 'std'}-{int(time.time())}"
    store_url = postgres.create_database(name.replace("-", "_"))
    open_store(store_url).close()  # migrated before the daemon starts, so the fill can go at once
    queue_url = sink.create_queue(name + (".fifo" if fifo else ""))
    daemon = BenchDaemon(root / name, store_url=store_url, accounts="", env=sink.env, sections=f"""
[queue]
kind = "sqs"
url = "{queue_url}"
endpoint_url = "{sink.endpoint_url}"
region = "{sink.region}"
""")
    try:
        daemon.start()
        status = daemon.try_status() or {}
        pid = next(c["pid"] for c in status.get("children", []) if c["role"] == "publisher")
        store_pids = process_tree(int((postgres.data_dir / "postmaster.pid").read_text().split()[0]))
        cpu_before, store_cpu_before = cpu_seconds([pid]), cpu_seconds(store_pids)
        fill(store_url, rows)
        started = time.monotonic()
        window = bench_cpu.meter(daemon, postgres=postgres, queue=sink)
        finished = wait_entries(sink, queue_url, len(rows), timeout=max(120, len(rows) / 200))
        by_process = window.stop()
        cpu = cpu_seconds([pid]) - cpu_before
        store_cpu = cpu_seconds(process_tree(store_pids[0])) - store_cpu_before
        seconds = (finished or time.monotonic()) - started
        sent = sink.stats(queue_url)
        with psycopg.connect(store_url) as conn:
            left = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        status = daemon.try_status() or {}
        return {"queue": "fifo" if fifo else "standard", "messages": len(rows), "entries_received": sent["entries"],
                "requests": sent["requests"], "entries_per_request": rnd(sent["entries"] / max(1, sent["requests"]), 2),
                "seconds": rnd(seconds, 2), "messages_per_second": rnd(sent["entries"] / seconds, 1),
                "cpu_seconds": rnd(cpu, 2), "cpu_seconds_per_1000": rnd(cpu / max(1, sent["entries"]) * 1000, 3),
                "postgresql_cpu_seconds_per_1000": rnd(store_cpu / max(1, sent["entries"]) * 1000, 3),
                "cpu_by_process": {"drain": by_process},
                "outbox_left": left, "drained": finished is not None,
                "status_publish_rate": status.get("outbox", {}).get("publish_rate"),
                **daemon.errors_report(), "drain_and_exit": daemon.stop()}
    finally:
        daemon.kill()


def run_bare_loop(sink: SqsSink, fifo: bool, rows: list[tuple[str, str, str, int]]) -> dict[str, Any]:
    import boto3

    name = f"bare-{'fifo' if fifo else 'std'}-{int(time.time())}" + (".fifo" if fifo else "")
    queue_url = sink.create_queue(name)
    client = boto3.client("sqs", endpoint_url=sink.endpoint_url, region_name=sink.region,
                          aws_access_key_id="sink", aws_secret_access_key="sink")
    started, cpu_before = time.monotonic(), time.process_time()
    for start in range(0, len(rows), 10):
        entries = []
        for index, (key, account_id, envelope, _) in enumerate(rows[start:start + 10]):
            entry = {"Id": str(index), "MessageBody": envelope}
            if fifo:
                entry["MessageGroupId"] = account_id
                entry["MessageDeduplicationId"] = hashlib.sha256(key.encode()).hexdigest()
            entries.append(entry)
        client.send_message_batch(QueueUrl=queue_url, Entries=entries)
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu_before
    received = sink.stats(queue_url)["entries"]
    return {"queue": "fifo" if fifo else "standard", "messages": len(rows), "entries_received": received,
            "seconds": rnd(seconds, 2), "messages_per_second": rnd(received / seconds, 1), "cpu_seconds": rnd(cpu, 2),
            "cpu_seconds_per_1000": rnd(cpu / max(1, received) * 1000, 3)}


def combined(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Two bare-loop runs as one: their entries over their seconds, their CPU over their entries."""
    entries = before["entries_received"] + after["entries_received"]
    seconds = before["seconds"] + after["seconds"]
    cpu = before["cpu_seconds"] + after["cpu_seconds"]
    return {"queue": before["queue"], "messages": entries, "seconds": rnd(seconds, 2),
            "messages_per_second": rnd(entries / seconds, 1), "cpu_seconds": rnd(cpu, 2),
            "cpu_seconds_per_1000": rnd(cpu / max(1, entries) * 1000, 3),
            "before_messages_per_second": before["messages_per_second"],
            "after_messages_per_second": after["messages_per_second"]}


def run_publish(root: Any, postgres: Postgres, messages: int = PUBLISH_MESSAGES) -> dict[str, Any]:
    rows = envelopes(messages, PUBLISH_ACCOUNTS)
    result: dict[str, Any] = {"messages": messages, "accounts": PUBLISH_ACCOUNTS, "queue": "bench/sqs_sink.py",
                              "envelope_bytes_mean": rnd(sum(len(r[2]) for r in rows) / len(rows), 0),
                              "target": f">= {TARGET_RATE:.0f} msg/s and >= {TARGET_RATIO}x the bare boto3 loop, "
                                        "standard and FIFO"}
    met = True
    with SqsSink() as sink:
        for fifo in (False, True):
            kind = "fifo" if fifo else "standard"
            half = len(rows) // 2
            before = run_bare_loop(sink, fifo, rows[:half])
            daemon = run_publisher(root, postgres, sink, fifo, rows)
            after = run_bare_loop(sink, fifo, rows[half:])
            bare = combined(before, after)
            ratio = daemon["messages_per_second"] / bare["messages_per_second"] if bare["messages_per_second"] else 0
            ok = daemon["drained"] and daemon["messages_per_second"] >= TARGET_RATE and ratio >= TARGET_RATIO
            met = met and ok
            result[kind] = {"publisher": daemon, "bare_loop": bare, "ratio_to_bare_loop": rnd(ratio, 2), "met": ok}
            print(f"publish {kind}: publisher {daemon['messages_per_second']} msg/s "
                  f"({daemon['cpu_seconds_per_1000']} CPU-s per 1,000, {daemon['entries_per_request']} per request) | "
                  f"bare boto3 loop {bare['messages_per_second']} msg/s ({bare['cpu_seconds_per_1000']} CPU-s per "
                  f"1,000) | ratio {rnd(ratio, 2)} -> {'met' if ok else 'MISSED'}", flush=True)
    result["meets_target"] = met
    return result
