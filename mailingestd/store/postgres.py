"""The PostgreSQL store (psycopg_pool), its SQL that has no SQLite counterpart (the batch commit in
one statement, outbox claims across nodes) and the LISTEN for account changes."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Iterator, Sequence

from .api import Store
from .messages import Batch
from .records import MESSAGE_COLUMNS, MessageRow, OutboxEntry, StoreError

# The batch statement (PostgresStore._write_batch). PostgreSQL only, so written with psycopg's
# placeholders: %b sends every parameter in binary (arrays of text without per-element quoting and
# escaping). The per-message values are arrays, so its text is the same for every batch.
_BATCH_SQL = """
    WITH s AS (SELECT %b::text AS account_id, %b::text AS folder, %b::bigint AS uidvalidity,
                      %b::double precision AS ingested_at, %b::bigint AS settled_uid, %b::bigint AS highestmodseq),
    mb AS (SELECT b.uidvalidity FROM mailboxes b, s WHERE b.account_id = s.account_id AND b.folder = s.folder
           FOR UPDATE OF b),
    v AS (SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::bigint[]) AS v(uid, key, envelope, raw_size)),
    k AS (INSERT INTO message_keys (account_id, folder, uidvalidity, uid, ingested_at)
          SELECT s.account_id, s.folder, s.uidvalidity, v.uid, s.ingested_at FROM v, s, mb
          WHERE mb.uidvalidity = s.uidvalidity
          ON CONFLICT DO NOTHING RETURNING uid),
    o AS (INSERT INTO outbox (key, account_id, envelope, raw_size, created_at)
          SELECT v.key, s.account_id, v.envelope, v.raw_size, s.ingested_at FROM v JOIN k USING (uid), s
          WHERE v.envelope IS NOT NULL
          ON CONFLICT (key) DO NOTHING),
    u AS (UPDATE mailboxes b SET last_uid = s.settled_uid, highestmodseq = COALESCE(s.highestmodseq, b.highestmodseq),
                                 updated_at = s.ingested_at
          FROM s, mb
          WHERE b.account_id = s.account_id AND b.folder = s.folder AND b.uidvalidity = s.uidvalidity
            AND mb.uidvalidity = s.uidvalidity AND b.last_uid < s.settled_uid)
    SELECT (SELECT uidvalidity FROM mb), (SELECT array_agg(uid) FROM k)"""
# The rows of the new keys, one short prepared statement per row: raw bytes are bound per row,
# never gathered into one array that the server would have to materialise. Not pipelined: a node
# paused in the middle of a pipeline leaves its transaction waiting for input without ever having
# been idle, so idle_in_transaction_session_timeout (the fence's, leases.py) never ends it and
# its lease row stays locked FOR KEY SHARE: no other node could take the account over.
_MESSAGE_SQL = f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES ({', '.join(['%b'] * len(MessageRow._fields))})"


OUTBOX_CHANNEL = "mailingestd_outbox"  # NOTIFYed by a commit that queued announcements


def listen_outbox(url: str) -> Any:
    """A connection of its own that LISTENs for the commits that queued announcements (the
    publisher's wake-up): poll its ``fileno()``, read ``notifies(timeout=0)``."""
    import psycopg

    conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
    return conn


def listen_account_changes(url: str) -> Any:
    """A connection of its own that LISTENs for the accounts trigger's NOTIFY (migration 2): poll its
    ``fileno()``, read ``notifies(timeout=0)``. Raises when PostgreSQL cannot be reached."""
    import psycopg

    conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    conn.execute("LISTEN mailingestd_accounts")
    return conn




# How long a caller waits for a pooled connection (and a new connection for its handshake). The
# scheduler and the publisher call the store from their main loops: while PostgreSQL is down they
# must get a StoreError back well within daemon.heartbeat_timeout (15 s by default), or the
# supervisor kills them as stuck and a database outage becomes a crash loop.
POOL_WAIT = 5.0


class PostgresStore(Store):
    """PostgreSQL through a psycopg_pool connection pool (opened lazily, after any fork)."""

    dialect = "postgresql"
    _for_update = " FOR UPDATE"

    def __init__(self, url: str, pool_min: int = 1, pool_max: int = 8, timeout: float = POOL_WAIT) -> None:
        self.url = url
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.timeout = timeout
        self._pool: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._unreachable_until = 0.0

    def _get_pool(self) -> Any:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                from psycopg_pool import ConnectionPool

                self._pid = os.getpid()
                # reconnect_timeout: the pool's reconnect backoff doubles without a cap until it
                # gives up; giving up early lets the next request start over at 1 s, so work
                # resumes within seconds of PostgreSQL's return, not a minute after it.
                self._pool = ConnectionPool(self.url, min_size=self.pool_min, max_size=self.pool_max,
                                            timeout=self.timeout, open=True, reconnect_timeout=2 * self.timeout,
                                            kwargs={"connect_timeout": int(self.timeout)})
            return self._pool

    def sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _write_batch(self, cur: Any, batch: Batch) -> set[int]:
        """A batch in two round trips (rule 5). First one statement: lock the checkpoint row and
        compare its UIDVALIDITY; only when it matches, insert the keys (``message_keys``:
        partitions.py says why the uniqueness lives there), the outbox rows of the keys that were
        new, and move the checkpoint. Then the message rows of the new keys, one statement each, and
        a NOTIFY that wakes the publisher when announcements were queued."""
        if not batch.rows:
            return super()._write_batch(cur, batch)
        mailbox = batch.mailbox
        found, new = self.execute(cur, _BATCH_SQL, (
            mailbox.account_id, mailbox.folder, mailbox.uidvalidity, batch.now, batch.settled_uid, batch.highestmodseq,
            [row.uid for row in batch.rows], [o.key if o else None for o in batch.outbox],
            [o.envelope if o else None for o in batch.outbox], [o.raw_size if o else None for o in batch.outbox],
        )).fetchone()
        if found != mailbox.uidvalidity:
            raise StoreError(f"mailbox {mailbox.account_id}/{mailbox.folder} changed UIDVALIDITY under a batch")
        new_uids = set(new or ())
        if new_uids:
            for row in batch.rows:
                if row.uid in new_uids:
                    self.execute(cur, _MESSAGE_SQL, row)
            if any(o is not None and row.uid in new_uids for row, o in zip(batch.rows, batch.outbox)):
                cur.execute(f"NOTIFY {OUTBOX_CHANNEL}")  # delivered at commit: the publisher wakes
        return new_uids

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        import psycopg
        import psycopg_pool

        # Once a wait for a connection has timed out, calls fail at once for the next POOL_WAIT
        # seconds: a loop making several store calls in a turn (scheduler: leases, accounts,
        # states) waits once per outage interval, not once per call, and keeps heartbeating.
        if time.monotonic() < self._unreachable_until:
            raise StoreError("PostgreSQL store unreachable (a connection wait just timed out)")
        try:
            with self._get_pool().connection() as conn:
                with conn.transaction():
                    with conn.cursor() as cur:
                        yield cur
        except psycopg_pool.PoolTimeout as exc:
            self._unreachable_until = time.monotonic() + self.timeout
            raise StoreError(f"PostgreSQL store unreachable: {exc}") from None
        except psycopg.OperationalError as exc:
            raise StoreError(f"PostgreSQL store: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def _lock_for_migration(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('mailingestd-migrate'))")

    def outbox_claim(self, node: str, limit: int, after_id: int, claim_seconds: float,
                     exclude: Sequence[int] = ()) -> list[OutboxEntry]:
        """Claim up to ``limit`` rows after ``after_id`` for ``node`` for ``claim_seconds`` (database
        clock), oldest first, leaving out ``exclude``; rows this node already claims are renewed and
        returned again.

        A row is this node's to send when nobody else holds a live claim on it, and its account's
        lease is this node's or no node's (a deleted account, a free or expired lease): each node
        announces the accounts it ingests, so a message group's rows go out from one node, in
        order. ``FOR UPDATE SKIP LOCKED``: nodes claiming at once never wait on each other and never
        take the same row. A row is also skipped while another node holds a live claim on any row
        of the same account (a lease that just moved: the old holder finishes first, or its claims
        lapse). A dead node's claims lapse after ``claim_seconds`` (cluster.lease_time), by when its
        leases have expired too: the survivors then send its rows (docs/scale-out.md).
        """
        with self.transaction() as cur:
            rows = self.execute(cur, """
                UPDATE outbox SET claimed_by = ?, claim_until = now() + make_interval(secs => ?)
                WHERE id IN (
                    SELECT o.id FROM outbox o
                    WHERE o.id > ? AND NOT (o.id = ANY(?))
                      AND (o.claimed_by = ? OR o.claim_until IS NULL OR o.claim_until <= now())
                      AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.account_id = o.account_id
                                      AND l.owner <> ? AND l.expires_at > now())
                      AND NOT EXISTS (SELECT 1 FROM outbox c WHERE c.account_id = o.account_id
                                      AND c.claimed_by IS NOT NULL AND c.claimed_by <> ?
                                      AND c.claim_until > now())
                    ORDER BY o.id LIMIT ? FOR UPDATE OF o SKIP LOCKED)
                RETURNING id, key, account_id, envelope, raw_size""",
                (node, claim_seconds, after_id, list(exclude), node, node, node, limit)).fetchall()
        return sorted((OutboxEntry(*r) for r in rows), key=lambda e: e.id)

    def outbox_delete(self, ids: Sequence[int]) -> None:
        """Forget acknowledged rows in one statement, however many (an array parameter)."""
        if ids:
            with self.transaction() as cur:
                self.execute(cur, "DELETE FROM outbox WHERE id = ANY(?)", (list(ids),))

    def set_publish_rate(self, node: str, rate: float) -> None:
        with self.transaction() as cur:
            self.execute(cur, "UPDATE nodes SET publish_rate = ? WHERE node_id = ?", (rate, node))

    def outbox_release(self, node: str) -> None:
        with self.transaction() as cur:
            self.execute(cur, "UPDATE outbox SET claimed_by = NULL, claim_until = NULL WHERE claimed_by = ?", (node,))

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None
