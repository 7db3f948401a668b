"""Ingest throughput with raw bytes in S3 beside the PostgreSQL-only path.

Measures the store side of ingest, the part ``[blobs]`` changes: ``Store.commit_batch`` of batches
of realistic random messages (samplemail, ``imap.batch_messages`` = 10) from a few threads, as
workers commit. Path A keeps raw bytes in PostgreSQL; path B PUTs them to S3 first (moto_server
on loopback, so S3 latency is far below real S3's ~20-50 ms per PUT: the figure shows the code
path's overhead, not AWS). Both start their own PostgreSQL 15 and moto_server (devtools.devservers).

    .venv/bin/python -m bench.blobs_bench [--messages 3000] [--threads 4]

Prints one line and writes bench/results/<date>/blobs.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import random
import tempfile
import time
import uuid
from pathlib import Path

from mailingestd.store import blobs
from mailingestd.config import BlobsConfig
from devtools.devservers import MotoServer, Postgres
from mailingestd.fetch.message import parse_headers
from devtools.samplemail import random_message
from mailingestd.store.store import StoredMessage, open_store

BATCH = 10


def make_messages(count: int, seed: int = 12) -> list[bytes]:
    rng = random.Random(seed)
    return [random_message(rng) for _ in range(count)]


def stored(uid: int, raw: bytes) -> StoredMessage:
    h = parse_headers(raw)
    return StoredMessage(uid=uid, raw=raw, size=len(raw), internaldate=None, message_id=h.message_id, from_=h.from_,
                         to=h.to, cc=h.cc, subject=h.subject, date=h.date, in_reply_to=h.in_reply_to,
                         references=h.references)


def run_path(url: str, raws: list[bytes], threads: int, blob_cfg: BlobsConfig | None) -> dict:
    st = open_store(url, 1, threads + 1)
    if blob_cfg is not None:
        st.blobs = blobs.S3Blobs(blob_cfg)
    # One mailbox per thread, like workers committing different accounts concurrently.
    per_thread = [raws[i::threads] for i in range(threads)]

    def work(slot: int) -> None:
        mailbox = st.start_mailbox(f"bench{slot}", "INBOX", 1)
        mine = per_thread[slot]
        for start in range(0, len(mine), BATCH):
            batch = [stored(start + i + 1, raw) for i, raw in enumerate(mine[start:start + BATCH])]
            st.commit_batch(mailbox, batch, settled_uid=start + len(batch))

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    seconds = time.monotonic() - started
    st.close()
    total = sum(len(r) for r in raws)
    return {"messages": len(raws), "bytes": total, "seconds": round(seconds, 3),
            "messages_per_second": round(len(raws) / seconds, 1), "mib_per_second": round(total / seconds / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    raws = make_messages(args.messages)
    with tempfile.TemporaryDirectory(prefix="blobs-bench-") as tmp:
        pg = Postgres(Path(tmp) / "pg")
        moto = MotoServer(Path(tmp) / "moto")
        pg.start()
        moto.start()
        try:
            for name, value in moto.env.items():
                if name != "AWS_ENDPOINT_URL":
                    os.environ.setdefault(name, value)
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            moto.client("s3").create_bucket(Bucket=bucket)
            pg_only = run_path(pg.create_database("bench_pg"), raws, args.threads, None)
            with_s3 = run_path(pg.create_database("bench_s3"), raws, args.threads,
                               BlobsConfig(kind="s3", bucket=bucket, endpoint_url=moto.endpoint_url))
        finally:
            moto.stop()
            pg.stop(mode="immediate")
    result = {
        "bench": "blobs", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "threads": args.threads, "batch_messages": BATCH, "s3": "moto_server on loopback",
        "postgresql_only": pg_only, "postgresql_plus_s3": with_s3,
        "s3_vs_pg_ratio": round(with_s3["messages_per_second"] / pg_only["messages_per_second"], 2),
    }
    out = Path(__file__).resolve().parent / "results" / datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    (out / "blobs.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"blobs: {args.messages} messages ({pg_only['bytes'] / 2**20:.0f} MiB), {args.threads} threads: "
          f"PostgreSQL only {pg_only['messages_per_second']:.0f} msg/s ({pg_only['mib_per_second']:.1f} MiB/s), "
          f"PostgreSQL + S3 {with_s3['messages_per_second']:.0f} msg/s ({with_s3['mib_per_second']:.1f} MiB/s), "
          f"ratio {result['s3_vs_pg_ratio']:.2f} -> {out / 'blobs.json'}")


if __name__ == "__main__":
    main()
