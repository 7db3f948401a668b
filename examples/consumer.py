#!/usr/bin/env python3
"""An example consumer of mailingestd's queue: receive, get the raw bytes, verify, process once, delete.

Every SQS message is one envelope (docs/envelope.schema.json). The raw message comes from, in
this order: ``raw_base64`` (queue.inline_raw), ``raw_pointer`` (blobs.kind = "s3": the SQS
Extended Client's S3 pointer), or the store itself (the claim check: the ``messages`` row of the
key, whose raw bytes are in the row or in S3). The bytes are checked against ``size`` and, when
sent, ``sha256``. Delivery is at least once, so processing is idempotent by ``key``: the keys
done are kept in a SQLite file, recorded in the same transaction as the work's own bookkeeping,
and a repeated envelope is only deleted. A message is deleted from the queue only after its
processing committed; one that fails stays and comes back after the visibility timeout (give the
queue a redrive policy so that a poison message ends in a dead-letter queue).

Here "processing" writes each message to ``--out`` as ``<sha256 of key>.eml``; replace
``process`` with your own. Needs boto3, and psycopg for a PostgreSQL store.

    python examples/consumer.py --queue-url URL --store-url postgresql://... --out /srv/mail [--once]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import boto3

POINTER_CLASS = "software.amazon.payloadoffloading.PayloadS3Pointer"
log = logging.getLogger("consumer")


class Unusable(Exception):
    """This envelope cannot be processed now (bytes missing or not matching): leave it on the queue."""


class ClaimCheck:
    """Raw bytes of a key from mailingestd's store (read-only), for envelopes that carry none."""

    def __init__(self, url: str | None, s3: Any) -> None:
        self.url = url
        self.s3 = s3
        self.conn: Any = None
        if url and url.startswith("sqlite:///"):
            path = "/" + url[len("sqlite://"):].lstrip("/")
            self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            self.param = "?"
        elif url:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
            self.param = "%s"

    def raw(self, envelope: dict[str, Any]) -> bytes:
        if self.conn is None:
            raise Unusable("the envelope carries no raw bytes and no --store-url was given")
        p = self.param
        row = self.conn.execute(
            f"SELECT raw, blob FROM messages WHERE account_id = {p} AND folder = {p} AND uidvalidity = {p} AND uid = {p}",
            (envelope["account_id"], envelope["folder"], envelope["uidvalidity"], envelope["uid"])).fetchone()
        if row is None:
            raise Unusable("no such message in the store")
        raw, blob = row
        if raw is not None:
            return bytes(raw)
        if blob:  # s3://bucket/key
            bucket, _, key = blob[len("s3://"):].partition("/")
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        raise Unusable("raw bytes pruned by store.raw_retention: consume faster than the retention")


def raw_of(envelope: dict[str, Any], s3: Any, store: ClaimCheck) -> bytes:
    if "raw_base64" in envelope:
        raw = base64.b64decode(envelope["raw_base64"], validate=True)
    elif "raw_pointer" in envelope:
        cls, target = envelope["raw_pointer"]
        if cls != POINTER_CLASS:
            raise Unusable(f"unknown pointer class {cls}")
        raw = s3.get_object(Bucket=target["s3BucketName"], Key=target["s3Key"])["Body"].read()
    else:
        raw = store.raw(envelope)
    if len(raw) != envelope["size"]:
        raise Unusable(f"{len(raw)} bytes, the envelope says {envelope['size']}")
    if "sha256" in envelope and hashlib.sha256(raw).hexdigest() != envelope["sha256"]:
        raise Unusable("sha256 does not match")
    return raw


class Done:
    """The keys already processed (a SQLite file): the idempotency record."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("CREATE TABLE IF NOT EXISTS processed (key TEXT PRIMARY KEY, processed_at REAL NOT NULL)")

    def seen(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM processed WHERE key = ?", (key,)).fetchone() is not None

    def record(self, key: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO processed (key, processed_at) VALUES (?, ?)", (key, time.time()))


def process(envelope: dict[str, Any], raw: bytes, out: Path) -> None:
    """The application's work; here: keep the message as a file named after its key.

    Writing to a temporary name and renaming makes a repeat after a crash harmless too."""
    name = hashlib.sha256(envelope["key"].encode()).hexdigest()
    tmp = out / f".{name}.tmp"
    tmp.write_bytes(raw)
    tmp.rename(out / f"{name}.eml")
    log.info("processed key=%s size=%d resync=%s subject=%r", envelope["key"], len(raw),
             envelope.get("resync", False), envelope["subject"])


def consume(args: argparse.Namespace) -> int:
    session = boto3.session.Session(region_name=args.region)
    sqs = session.client("sqs", endpoint_url=args.endpoint_url)
    s3 = session.client("s3", endpoint_url=args.endpoint_url)
    store = ClaimCheck(args.store_url, s3)
    args.out.mkdir(parents=True, exist_ok=True)
    done = Done(args.out / "processed.sqlite3")
    failures = 0
    while True:
        messages = sqs.receive_message(QueueUrl=args.queue_url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=args.wait).get("Messages", [])
        if not messages and args.once:
            return 1 if failures else 0
        for message in messages:
            envelope = json.loads(message["Body"])
            key = envelope["key"]
            if envelope.get("v") != 1:
                log.error("skipped key=%s error=unknown envelope version %r", key, envelope.get("v"))
                failures += 1
                continue
            if done.seen(key):
                log.info("duplicate key=%s (already processed): deleted", key)
            else:
                try:
                    raw = raw_of(envelope, s3, store)
                except Unusable as exc:
                    log.error("left on the queue key=%s error=%s", key, exc)
                    failures += 1
                    continue
                done.db.execute("BEGIN")
                try:
                    process(envelope, raw, args.out)
                    done.record(key)
                    done.db.execute("COMMIT")
                except BaseException:
                    done.db.execute("ROLLBACK")
                    raise
            sqs.delete_message(QueueUrl=args.queue_url, ReceiptHandle=message["ReceiptHandle"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-url", required=True)
    parser.add_argument("--store-url", help="mailingestd's store (store.url), for envelopes without raw bytes")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--endpoint-url", help="another SQS/S3 endpoint (tests, LocalStack)")
    parser.add_argument("--out", type=Path, required=True, help="where processed messages go")
    parser.add_argument("--wait", type=int, default=20, help="long-poll seconds per receive (SQS allows 0..20)")
    parser.add_argument("--once", action="store_true", help="stop when the queue is empty (exit 1 if any failed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return consume(args)


if __name__ == "__main__":
    sys.exit(main())
