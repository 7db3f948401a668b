"""The consumer contract: real envelopes (Dovecot -> store -> publisher -> moto SQS) validate against
docs/envelope.schema.json, and examples/consumer.py processes them once each and deletes them.

Three stores ingest the same mailbox under three account ids, one per way the raw bytes travel:
``claim`` (left in the store), ``s3`` (blobs.kind = "s3": raw_pointer and sha256) and ``inline``
(queue.inline_raw: raw_base64); ``claim`` also has an Archive folder whose UIDVALIDITY changed
(resync).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mailingestd.fetch import imap
from mailingestd.store.blobs import S3Blobs
from mailingestd.config import AccountConfig, BlobsConfig, ImapConfig, QueueConfig
from mailingestd.fetch.ingest import sync_folder
from mailingestd.publish.publisher import Publisher
from devtools.samplemail import corpus
from mailingestd.store.store import open_store

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "envelope.schema.json").read_text())
HEADERLESS = b"\r\nno headers at all\r\n"


def sync(dovecot, user: str, store, account_id: str, folder: str = "INBOX") -> None:
    account = AccountConfig(id=account_id, host=dovecot.host, port=dovecot.port, tls="none", username=user,
                            password_env="UNUSED")
    client = imap.connect(account, dovecot.password, timeout=30)
    try:
        sync_folder(client, store, account_id, folder, ImapConfig(), announce=True)
    finally:
        imap.logout(client)


def publish_everything(dovecot, moto, tmp_path: Path, queue_url: str) -> tuple[str, dict[str, bytes]]:
    """Ingest and publish; returns the claim store's URL and the raw bytes expected per key."""
    user = dovecot.new_user()
    raws = [raw for _, raw in corpus()] + [HEADERLESS]
    for raw in raws:
        dovecot.append(user, raw)
    dovecot.append(user, b"Subject: archived\r\n\r\nbefore\r\n", folder="Archive")
    bucket = f"raw-{uuid.uuid4().hex[:16]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    urls = {name: f"sqlite:///{tmp_path / f'{name}.sqlite3'}" for name in ("claim", "s3", "inline")}
    for name, url in urls.items():
        store = open_store(url)
        if name == "s3":
            store.blobs = S3Blobs(BlobsConfig(kind="s3", bucket=bucket, endpoint_url=moto.endpoint_url))
        sync(dovecot, user, store, name)
        if name == "claim":
            sync(dovecot, user, store, name, "Archive")
            dovecot.recreate_folder(user, "Archive")
            dovecot.append(user, b"Subject: archived again\r\n\r\nafter\r\n", folder="Archive")
            sync(dovecot, user, store, name, "Archive")
        publisher = Publisher(store, QueueConfig(kind="sqs", url=queue_url, endpoint_url=moto.endpoint_url,
                                                 inline_raw=name == "inline"))
        while store.outbox_depth():
            publisher.publish_once()
        store.close()
    expected = {}
    for name, url in urls.items():
        store = open_store(url)
        for row in store.recent_messages(None, 1000):
            expected[row.key] = store.message_raw(row.key) if name != "s3" else None
        store.close()
    return urls["claim"], expected


def receive_all(moto, queue_url: str, count: int) -> list[dict[str, Any]]:
    sqs = moto.client("sqs")
    bodies: list[dict[str, Any]] = []
    for _ in range(30):
        for m in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                     VisibilityTimeout=60).get("Messages", []):
            bodies.append(json.loads(m["Body"]))
        if len(bodies) >= count:
            break
    return bodies


def test_real_envelopes_validate_against_the_schema(dovecot, moto, sqs_queue, tmp_path: Path) -> None:
    _, expected = publish_everything(dovecot, moto, tmp_path, sqs_queue)
    bodies = receive_all(moto, sqs_queue, len(expected))
    assert sorted(b["key"] for b in bodies) == sorted(expected)
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    for body in bodies:
        problems = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(body)]
        assert not problems, f"{body['key']}: {problems}"
    by_account = {name: [b for b in bodies if b["account_id"] == name] for name in ("claim", "s3", "inline")}
    assert all("raw_pointer" in b and "sha256" in b for b in by_account["s3"])
    assert all("raw_base64" in b for b in by_account["inline"])
    assert not any({"raw_pointer", "raw_base64", "sha256"} & b.keys() for b in by_account["claim"])
    assert [b["subject"] for b in by_account["claim"] if b.get("resync")] == ["archived again"]
    assert any(b["subject"] is None and b["from"] is None for b in by_account["claim"])  # the headerless one
    # The schema is strict, so that a field added to the envelope without it fails here.
    sample = dict(by_account["claim"][0])
    assert not validator.is_valid({**sample, "new_field": 1})
    assert not validator.is_valid({k: v for k, v in sample.items() if k != "key"})


def run_consumer(moto, queue_url: str, store_url: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**moto.env, "PATH": "/usr/bin:/bin"}
    env.pop("AWS_ENDPOINT_URL", None)
    return subprocess.run([sys.executable, str(ROOT / "examples" / "consumer.py"), "--queue-url", queue_url,
                           "--store-url", store_url, "--endpoint-url", moto.endpoint_url, "--out", str(out),
                           "--wait", "1", "--once"], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def queue_count(moto, queue_url: str) -> int:
    attrs = moto.client("sqs").get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
    return sum(int(v) for v in attrs["Attributes"].values())


def test_example_consumer_processes_each_message_once(dovecot, moto, sqs_queue, tmp_path: Path) -> None:
    claim_url, expected = publish_everything(dovecot, moto, tmp_path, sqs_queue)
    out = tmp_path / "out"
    result = run_consumer(moto, sqs_queue, claim_url, out)
    assert result.returncode == 0, result.stderr
    files = {p.name: p.read_bytes() for p in out.glob("*.eml")}
    assert len(files) == len(expected)
    for key, raw in expected.items():
        stored = files[hashlib.sha256(key.encode()).hexdigest() + ".eml"]
        if raw is not None:
            assert stored == raw, key
    assert queue_count(moto, sqs_queue) == 0, "processed messages are deleted"

    # At least once: a repeated envelope is only deleted; a corrupted one stays on the queue.
    sqs = moto.client("sqs")
    s3_key = next(k for k in expected if k.startswith("s3/"))
    inline_key = next(k for k in expected if k.startswith("inline/"))
    repeat = {"v": 1, "key": inline_key, "raw_base64": base64.b64encode(b"other bytes").decode()}
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=json.dumps(repeat))
    account, folder, uidvalidity, _ = s3_key.split("/")
    corrupt = {"v": 1, "key": f"{account}/{folder}/{uidvalidity}/999", "account_id": account, "folder": folder,
               "uidvalidity": int(uidvalidity), "uid": 999, "subject": None, "size": 11,
               "raw_base64": base64.b64encode(b"other bytes").decode(), "sha256": "0" * 64}
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=json.dumps(corrupt))
    result = run_consumer(moto, sqs_queue, claim_url, out)
    assert result.returncode == 1
    assert f"duplicate key={inline_key}" in result.stderr
    assert "error=sha256 does not match" in result.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.eml")} == files
    assert queue_count(moto, sqs_queue) == 1, "only the corrupted message is left"


@pytest.mark.parametrize("path", ["docs/envelope.schema.json"])
def test_the_schema_is_a_valid_json_schema(path: str) -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads((ROOT / path).read_text()))
