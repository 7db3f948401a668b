"""PostgreSQL: the messages table range-partitioned by ``ingested_at``, and exactly-once over it.

Why a second table. A partitioned table's primary key must contain the partition key, so on
PostgreSQL ``messages`` is keyed ``(account_id, folder, uidvalidity, uid, ingested_at)`` and can
no longer refuse a second row for the same message by itself (two commits of one UID carry two
different ``ingested_at``). Uniqueness moves to ``message_keys``, a plain (non-partitioned) table
whose primary key is the message key. The batch statement (``PostgresStore._write_batch`` in
postgres.py) runs inside the batch transaction:

1. ``INSERT INTO message_keys ... ON CONFLICT DO NOTHING``; a concurrent committer of the same
   key blocks on the unique index until the first one commits or rolls back, then sees the
   conflict; a key already there is a no-op (docs/architecture.md, "The message key");
2. only for the keys that were inserted, ``INSERT INTO messages`` and the outbox rows.

Both happen in the one transaction that also moves the checkpoint, so a key exists if and only if
its message row was committed with it. Dropping a ``messages`` partition (retention) leaves the
keys behind; keys are pruned separately and only where the checkpoint already protects them
(see retention.py).

Partitions are named ``messages_pYYYYMMDD`` after the UTC start of their range and cover a day or
an ISO week (``store.partition_interval``); the daemon creates ``store.partitions_ahead`` of them
ahead of now (:func:`ensure_partitions`). A DEFAULT partition catches a row that would arrive
when none was created (daemon stopped for longer than the lead); :func:`ensure_partitions` moves
such rows into the proper partition when it creates it, and retention never drops DEFAULT.
DDL here runs with a short ``lock_timeout``: it waits for an ingest transaction at most that long
and otherwise gives up until the next pass, so ingest never queues behind it for long.
"""

from __future__ import annotations

import datetime
import logging
import re
import time

import msgspec

from .base import StoreBase
from ..keys import sql_key

log = logging.getLogger(__name__)

DAY = 86400
LOCK_TIMEOUT = "2s"
# The columns of migration 3's copy of the rows (a shipped migration: never edited).
_COLUMNS = ('account_id, folder, uidvalidity, uid, message_id, "from", "to", cc, subject, date, in_reply_to, '
            '"references", size, internaldate, raw, sha256, ingested_at')

# Migration 3 (schema.MIGRATIONS). PostgreSQL: message_keys filled from the old table, a
# partitioned copy with one daily partition per day that has rows (plus today and two days ahead),
# rows moved one day per statement, then the names swapped. SQLite: the blob column only.
MIGRATION_3 = {
    "sqlite": [
        "ALTER TABLE messages ADD COLUMN blob TEXT",
    ],
    "postgresql": [
        "CREATE TABLE message_keys (account_id TEXT NOT NULL, folder TEXT NOT NULL, uidvalidity BIGINT NOT NULL, "
        "uid BIGINT NOT NULL, ingested_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (account_id, folder, uidvalidity, uid))",
        "INSERT INTO message_keys SELECT account_id, folder, uidvalidity, uid, ingested_at FROM messages",
        "CREATE INDEX message_keys_ingested_at ON message_keys (ingested_at)",
        """CREATE TABLE messages_partitioned (
            account_id TEXT NOT NULL, folder TEXT NOT NULL, uidvalidity BIGINT NOT NULL, uid BIGINT NOT NULL,
            message_id TEXT, "from" TEXT, "to" TEXT, cc TEXT, subject TEXT, date TEXT, in_reply_to TEXT,
            "references" TEXT, size BIGINT NOT NULL, internaldate TEXT, raw BYTEA, sha256 TEXT NOT NULL,
            ingested_at DOUBLE PRECISION NOT NULL, blob TEXT,
            PRIMARY KEY (account_id, folder, uidvalidity, uid, ingested_at)
        ) PARTITION BY RANGE (ingested_at)""",
        "CREATE TABLE messages_default PARTITION OF messages_partitioned DEFAULT",
        f"""DO $$
        DECLARE day_start DOUBLE PRECISION;
        BEGIN
          FOR day_start IN
              SELECT DISTINCT floor(ingested_at / {DAY}) * {DAY} FROM messages
              UNION SELECT floor(extract(epoch FROM now()) / {DAY}) * {DAY} + k * {DAY} FROM generate_series(0, 2) k
              ORDER BY 1
          LOOP
            -- no format(): its placeholders would clash with the driver's parameter syntax
            EXECUTE 'CREATE TABLE ' || quote_ident('messages_p' || to_char(to_timestamp(day_start) AT TIME ZONE 'UTC',
                    'YYYYMMDD')) || ' PARTITION OF messages_partitioned FOR VALUES FROM (' || day_start || ') TO ('
                    || (day_start + {DAY}) || ')';
            EXECUTE 'INSERT INTO messages_partitioned ({_COLUMNS}) SELECT {_COLUMNS} FROM messages '
                    || 'WHERE ingested_at >= ' || day_start || ' AND ingested_at < ' || (day_start + {DAY});
          END LOOP;
        END $$""",
        "DROP TABLE messages",
        "ALTER TABLE messages_partitioned RENAME TO messages",
        "ALTER INDEX messages_partitioned_pkey RENAME TO messages_pkey",
        "CREATE INDEX messages_ingested_at ON messages (ingested_at)",
    ],
}


class Partition(msgspec.Struct):
    name: str
    start: float | None  # None for DEFAULT
    end: float | None
    rows: int = 0
    bytes: int = 0


_BOUND = re.compile(r"FROM \('?([-\d.e+]+)'?\) TO \('?([-\d.e+]+)'?\)")


def list_partitions(store: StoreBase, with_sizes: bool = False) -> list[Partition]:
    """Every partition of ``messages``, oldest first, DEFAULT last."""
    with store.transaction() as cur:
        rows = store.execute(cur, """
            SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), pg_total_relation_size(c.oid),
                   c.reltuples::BIGINT
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'messages'::regclass""").fetchall()
        out = []
        for name, bound, size, estimate in rows:
            match = _BOUND.search(bound or "")
            part = Partition(name, float(match.group(1)) if match else None, float(match.group(2)) if match else None)
            if with_sizes:
                part.bytes = int(size)
                part.rows = store.execute(cur, f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]
            out.append(part)
    return sorted(out, key=lambda p: (p.start is None, p.start or 0))


def period_start(ts: float, interval: str) -> float:
    """UTC midnight of ``ts``'s day, or of the Monday of its ISO week."""
    day = int(ts // DAY) * DAY
    if interval == "week":
        weekday = datetime.datetime.fromtimestamp(day, datetime.timezone.utc).weekday()
        day -= weekday * DAY
    return float(day)


def _name(start: float) -> str:
    return "messages_p" + datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime("%Y%m%d")


def ensure_partitions(store: StoreBase, interval: str = "day", ahead: int = 3, now: float | None = None) -> list[str]:
    """Create partitions from the newest existing one up to ``ahead`` periods past now.

    A new partition starts where the newest ends (so a change from day to week leaves no gap) and
    ends at the next period boundary. Rows the DEFAULT partition caught in that range are moved
    into it in the same transaction. Returns the names created.
    """
    now = time.time() if now is None else now
    step = 7 * DAY if interval == "week" else DAY
    horizon = period_start(now, interval) + (ahead + 1) * step
    existing = [p for p in list_partitions(store) if p.start is not None]
    start = max((p.end for p in existing if p.end is not None), default=period_start(now, interval))
    created = []
    while start < horizon:
        end = period_start(start, interval) + step
        name = _name(start)
        with store.transaction() as cur:
            store.execute(cur, f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            store.execute(cur, f'CREATE TABLE "{name}" (LIKE messages INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                             f'INCLUDING COMPRESSION)')
            store.execute(cur, f'INSERT INTO "{name}" SELECT * FROM messages_default WHERE ingested_at >= ? '
                             f'AND ingested_at < ?', (start, end))
            store.execute(cur, "DELETE FROM messages_default WHERE ingested_at >= ? AND ingested_at < ?", (start, end))
            store.execute(cur, f'ALTER TABLE messages ATTACH PARTITION "{name}" FOR VALUES FROM ({start!r}) '
                             f'TO ({end!r})')
        created.append(name)
        log.info("event=partition_created name=%s from=%s to=%s", name, start, end)
        start = end
    return created


def droppable_partitions(store: StoreBase, cutoff: float) -> list[Partition]:
    """Partitions whose whole range ends before ``cutoff`` and none of whose rows is still in the
    outbox (unannounced); DEFAULT never."""
    out = []
    for part in list_partitions(store):
        if part.end is None or part.end > cutoff:
            continue
        with store.transaction() as cur:
            pending = store.execute(cur, f"""
                SELECT 1 FROM "{part.name}" m JOIN outbox o
                  ON o.key = {sql_key('m')}
                LIMIT 1""").fetchone()
        if pending is None:
            out.append(part)
    return out


def drop_partition(store: StoreBase, part: Partition) -> bool:
    """Detach and drop one partition, re-checking the outbox under the detach lock; False if it
    had to be skipped (lock not granted in time, or a row was still unannounced)."""
    try:
        with store.transaction() as cur:
            store.execute(cur, f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            store.execute(cur, f'ALTER TABLE messages DETACH PARTITION "{part.name}"')
            pending = store.execute(cur, f"""
                SELECT 1 FROM "{part.name}" m JOIN outbox o
                  ON o.key = {sql_key('m')}
                LIMIT 1""").fetchone()
            if pending is not None:
                raise _Skip()
            store.execute(cur, f'DROP TABLE "{part.name}"')
    except _Skip:
        return False
    except Exception as exc:  # lock_timeout: ingest held the table; try again next pass
        log.warning("event=partition_drop_skipped name=%s error=%s", part.name, str(exc).splitlines()[0])
        return False
    log.info("event=partition_dropped name=%s from=%s to=%s", part.name, part.start, part.end)
    return True


class _Skip(Exception):
    pass
