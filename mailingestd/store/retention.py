"""Retention: raw bytes go after ``store.raw_retention``, rows and keys after ``metadata_retention``.

What may be removed, and why exactly-once survives it:

- Raw bytes of a message that was announced (no outbox row) and is older than
  ``store.raw_retention`` (default 7 days): consumers claim a message's bytes soon after the
  announcement. The row (headers, size, sha256) and its key stay. The outbox is never pruned: a
  message still in it keeps its bytes, its row and its key, however old it is.
- Rows (SQLite) and keys (PostgreSQL ``message_keys``) older than ``store.metadata_retention``
  (default 30 days; 0 keeps them forever) and only where the mailbox checkpoint already protects
  them: the key of a UID at or below its mailbox's ``last_uid`` under the same UIDVALIDITY, or of
  a UIDVALIDITY the mailbox has left. Ingest never asks for such a UID again (it fetches from
  ``last_uid + 1`` under the current UIDVALIDITY, and the checkpoint never moves back), so the key
  is not needed to refuse a second copy. The only writer that could still present one is a batch
  fetched before the checkpoint moved and committed after; it lives for seconds (bounded by
  ``imap.timeout``), hence metadata_retention of at least a day. Keys of a mailbox without a
  checkpoint row (an account removed, which may come back) are kept.
- PostgreSQL: whole partitions of ``messages`` whose range ended before ``metadata_retention`` and
  that hold no unannounced row are detached and dropped (partitions.py); the keys outlive them in
  ``message_keys``. Raw bytes in younger partitions are nulled like on SQLite. With
  ``metadata_retention`` equal to ``raw_retention`` (or raw bytes in S3), PostgreSQL does no row
  work at all: retention is dropping tables.

Never blocking ingest: every step is a short transaction over at most ``store.retention_batch``
rows, followed by ``store.retention_pause``; on SQLite that releases the single writer lock between
batches, on PostgreSQL row locks are held for one batch and DDL waits at most ``lock_timeout``.

Who runs it: a thread of the scheduler process (:func:`start_thread`). The scheduler is the one
process that always runs exactly once (the publisher only exists with a queue; workers are many),
it already holds a store pool, and a thread keeps the batches and their pauses off its timing
wheel. A crash of the pass loses nothing: each batch is its own transaction and the next pass
continues where the last one stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import msgspec

from . import partitions
from .base import StoreBase
from ..keys import sql_key
from ..config import StoreConfig

log = logging.getLogger(__name__)

_KEY = sql_key("m")
_ANNOUNCED = f"NOT EXISTS (SELECT 1 FROM outbox o WHERE o.key = {_KEY})"
_SETTLED = ("EXISTS (SELECT 1 FROM mailboxes b WHERE b.account_id = m.account_id AND b.folder = m.folder "
            "AND (b.uidvalidity != m.uidvalidity OR m.uid <= b.last_uid))")


class PassResult(msgspec.Struct):
    raw_pruned: int = 0
    rows_deleted: int = 0
    keys_deleted: int = 0
    partitions_created: list[str] = []
    partitions_dropped: list[str] = []
    seconds: float = 0.0


def _batched(store: StoreBase, sql: str, params: tuple, batch: int, pause: float,
             should_stop: Callable[[], bool]) -> int:
    """Run a bounded UPDATE/DELETE until it touches nothing; one short transaction per batch."""
    total = 0
    while not should_stop():
        with store.transaction() as cur:
            done = store.execute(cur, sql, (*params, batch)).rowcount
        total += max(done, 0)
        if done < batch:
            break
        time.sleep(pause)
    return total


def _prune_raw(store: StoreBase, cutoff: float, batch: int, pause: float, stop: Callable[[], bool]) -> int:
    pick = (f"SELECT {{id}} FROM messages m WHERE m.ingested_at < ? AND m.raw IS NOT NULL AND {_ANNOUNCED} "
            "LIMIT ?")
    if store.dialect == "sqlite":
        sql = f"UPDATE messages SET raw = NULL WHERE rowid IN ({pick.format(id='m.rowid')})"
    else:
        # tableoid + ctid address one row version in one partition without a second index probe.
        sql = (f"UPDATE messages SET raw = NULL WHERE (tableoid, ctid) IN "
               f"({pick.format(id='m.tableoid, m.ctid')})")
    return _batched(store, sql, (cutoff,), batch, pause, stop)


def _delete_rows(store: StoreBase, cutoff: float, batch: int, pause: float, stop: Callable[[], bool]) -> int:
    """SQLite: rows (and with them their keys) past metadata_retention, where the checkpoint protects."""
    sql = (f"DELETE FROM messages WHERE rowid IN (SELECT m.rowid FROM messages m WHERE m.ingested_at < ? "
           f"AND {_SETTLED} AND {_ANNOUNCED} LIMIT ?)")
    return _batched(store, sql, (cutoff,), batch, pause, stop)


def _delete_keys(store: StoreBase, cutoff: float, batch: int, pause: float, stop: Callable[[], bool]) -> int:
    """PostgreSQL: message_keys past metadata_retention whose message row is gone or settled."""
    sql = (f"DELETE FROM message_keys WHERE ctid IN (SELECT m.ctid FROM message_keys m WHERE m.ingested_at < ? "
           f"AND {_SETTLED} AND {_ANNOUNCED} LIMIT ?)")
    return _batched(store, sql, (cutoff,), batch, pause, stop)


def run_pass(store: StoreBase, cfg: StoreConfig, now: float | None = None,
             should_stop: Callable[[], bool] = lambda: False) -> PassResult:
    """One retention pass (and, on PostgreSQL, partitions created ahead first)."""
    started = time.monotonic()
    now = time.time() if now is None else now
    result = PassResult()
    batch, pause = cfg.retention_batch, float(cfg.retention_pause)
    if store.dialect == "postgresql":
        result.partitions_created = partitions.ensure_partitions(store, cfg.partition_interval,
                                                                 cfg.partitions_ahead, now)
    if cfg.metadata_retention:
        meta_cutoff = now - cfg.metadata_retention
        if store.dialect == "postgresql":
            for part in partitions.droppable_partitions(store, meta_cutoff):
                if should_stop():
                    break
                if partitions.drop_partition(store, part):
                    result.partitions_dropped.append(part.name)
            result.keys_deleted = _delete_keys(store, meta_cutoff, batch, pause, should_stop)
        else:
            result.rows_deleted = _delete_rows(store, meta_cutoff, batch, pause, should_stop)
    result.raw_pruned = _prune_raw(store, now - cfg.raw_retention, batch, pause, should_stop)
    result.seconds = time.monotonic() - started
    log.info("event=retention_pass raw_pruned=%d rows_deleted=%d keys_deleted=%d partitions_created=%d "
             "partitions_dropped=%d seconds=%.2f", result.raw_pruned, result.rows_deleted, result.keys_deleted,
             len(result.partitions_created), len(result.partitions_dropped), result.seconds)
    return result


def start_thread(store_url: str, cfg: StoreConfig, should_stop: Callable[[], bool],
                 pool: tuple[int, int] = (1, 1)) -> threading.Thread:
    """Run :func:`run_pass` now and every ``retention_interval``, on its own store connection."""

    def loop() -> None:
        from .store import open_store

        store = None
        while not should_stop():
            try:
                if store is None:
                    store = open_store(store_url, *pool)
                run_pass(store, cfg, should_stop=should_stop)
            except Exception as exc:  # the store is down or DDL failed: try again next interval
                log.error("event=retention_error error=%s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            deadline = time.monotonic() + cfg.retention_interval
            while not should_stop() and time.monotonic() < deadline:
                time.sleep(min(1.0, cfg.retention_interval))

    thread = threading.Thread(target=loop, name="retention", daemon=True)
    thread.start()
    return thread


def store_stats(store: StoreBase) -> dict[str, Any]:
    """Sizes, row counts, partitions and the oldest raw message (``mailingestctl store stats``)."""
    out: dict[str, Any] = {"backend": store.dialect}
    with store.transaction() as cur:
        q = lambda sql: store.execute(cur, sql).fetchone()  # noqa: E731
        total, with_raw, in_s3, raw_bytes = q("SELECT COUNT(*), COUNT(raw), COUNT(blob), "
                                              "COALESCE(SUM(LENGTH(raw)), 0) FROM messages")
        out["messages"] = {"rows": total, "raw_in_store": with_raw, "raw_in_s3": in_s3,
                           "raw_pruned": total - with_raw - in_s3, "raw_bytes": int(raw_bytes)}
        out["outbox"] = {"rows": q("SELECT COUNT(*) FROM outbox")[0]}
        oldest = q(f"SELECT {_KEY}, m.ingested_at FROM messages m WHERE m.raw IS NOT NULL OR m.blob IS NOT NULL "
                   "ORDER BY m.ingested_at LIMIT 1")
        out["oldest_raw"] = {"key": oldest[0], "ingested_at": oldest[1]} if oldest else None
        if store.dialect == "postgresql":
            out["message_keys"] = {"rows": q("SELECT COUNT(*) FROM message_keys")[0]}
            out["database_bytes"] = q("SELECT pg_database_size(current_database())")[0]
            out["tables_bytes"] = {name: q(f"SELECT pg_total_relation_size('{name}')")[0]
                                   for name in ("message_keys", "outbox", "accounts", "mailboxes")}
        else:
            page_size, pages, free = (q("PRAGMA page_size")[0], q("PRAGMA page_count")[0], q("PRAGMA freelist_count")[0])
            out["database_bytes"] = page_size * pages
            out["free_bytes"] = page_size * free
    if store.dialect == "postgresql":
        parts = partitions.list_partitions(store, with_sizes=True)
        out["partitions"] = [msgspec.to_builtins(p) for p in parts]
        out["tables_bytes"]["messages"] = sum(p.bytes for p in parts)
    return out
