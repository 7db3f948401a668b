"""The outbox: announcements committed with their messages (rule 5), read, claimed and deleted by
the publisher once the queue acknowledged them."""

from __future__ import annotations

import time
from typing import Sequence

from .base import StoreBase
from .records import OutboxEntry

# Ids per DELETE of acknowledged outbox rows: within SQLite's bound parameters (32,766 since 3.32,
# 999 before) and a publisher step's 500 rows in one statement.
OUTBOX_DELETE_CHUNK = 500


class Outbox(StoreBase):
    """The outbox part of :class:`~mailingestd.store.store.Store` (PostgreSQL's claims across nodes
    are in postgres.py)."""

    def outbox_batch(self, limit: int, after_id: int = 0) -> list[OutboxEntry]:
        with self.transaction() as cur:
            rows = self.execute(cur, "SELECT id, key, account_id, envelope, raw_size FROM outbox WHERE id > ? "
                                   "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [OutboxEntry(*r) for r in rows]

    def outbox_claim(self, node: str, limit: int, after_id: int, claim_seconds: float,
                     exclude: Sequence[int] = ()) -> list[OutboxEntry]:
        """Up to ``limit`` rows after ``after_id``, oldest first, that this node may send now, leaving
        out ``exclude`` (rows it is sending or has just had acknowledged).

        SQLite has one publisher: every row. PostgreSQL overrides this with claims across nodes."""
        skip = set(exclude)
        rows = self.outbox_batch(limit + len(skip), after_id)
        return [e for e in rows if e.id not in skip][:limit]

    def outbox_release(self, node: str) -> None:
        """Give back this node's claims (the publisher's shutdown): other nodes may send them at once."""

    def set_publish_rate(self, node: str, rate: float) -> None:
        """This node's publish rate for the cluster's status (PostgreSQL: its ``nodes`` row)."""

    def outbox_delete(self, ids: Sequence[int]) -> None:
        """Forget acknowledged rows: one statement per call (up to OUTBOX_DELETE_CHUNK ids each)."""
        if not ids:
            return
        with self.transaction() as cur:
            for start in range(0, len(ids), OUTBOX_DELETE_CHUNK):
                chunk = list(ids[start:start + OUTBOX_DELETE_CHUNK])
                self.execute(cur, f"DELETE FROM outbox WHERE id IN ({', '.join('?' * len(chunk))})", chunk)

    def outbox_depth(self) -> int:
        with self.transaction() as cur:
            return self.execute(cur, "SELECT COUNT(*) FROM outbox").fetchone()[0]

    def outbox_summary(self) -> tuple[int, float]:
        """(rows in the outbox, age in seconds of the oldest one; 0 when empty), by the store's clock
        of ``created_at`` (Unix time written by the committing process)."""
        with self.transaction() as cur:
            depth, oldest = self.execute(cur, "SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone()
        return int(depth), max(0.0, time.time() - oldest) if oldest is not None else 0.0

