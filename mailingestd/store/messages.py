"""Mailbox checkpoints and messages: the commit of a batch (rule 5) and the reads of stored mail."""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Sequence

from ..envelope import make_envelope
from . import blobs as blobs_mod
from .base import StoreBase
from ..keys import MessageKey, message_key
from .records import (MESSAGE_COLUMNS, MailboxState, MessageRow, RecentMessage, StoredMessage, StoreError,
                      message_row)


class OutboxRow(NamedTuple):
    """One ``outbox`` row as a commit writes it."""

    key: str
    account_id: str
    envelope: str
    raw_size: int
    created_at: float


class OpenedMailbox(NamedTuple):
    """What :meth:`Messages.open_mailbox` found: the checkpoint to sync from, the UIDVALIDITY the
    folder had when it changed (None when it did not), and whether the folder is new to the store."""

    state: MailboxState
    previous_uidvalidity: int | None
    created: bool


class Batch(NamedTuple):
    """What :meth:`Messages.commit_batch` writes for one batch, built before the transaction opens."""

    mailbox: MailboxState
    rows: list[MessageRow]
    outbox: list[OutboxRow | None]  # one per row: None when the message is not announced
    settled_uid: int
    highestmodseq: int | None
    now: float


class Messages(StoreBase):
    """The checkpoints-and-messages part of :class:`~mailingestd.store.store.Store`."""

    _for_update = ""  # PostgreSQL: the checkpoint row is locked for the batch

    def get_mailbox(self, account_id: str, folder: str) -> MailboxState | None:
        with self.transaction() as cur:
            r = self.execute(cur, "SELECT uidvalidity, last_uid, highestmodseq, resync_below FROM mailboxes "
                                  "WHERE account_id = ? AND folder = ?", (account_id, folder)).fetchone()
        return MailboxState(account_id, folder, r[0], r[1], r[2], r[3]) if r else None

    def start_mailbox(self, account_id: str, folder: str, uidvalidity: int, resync_below: int = 0) -> MailboxState:
        """Begin (or begin again, after a UIDVALIDITY change) a folder at UID 0.

        The old UIDVALIDITY's rows stay; the change is recorded in ``uidvalidity_changes``.
        """
        with self.transaction() as cur:
            old = self.execute(cur, "SELECT uidvalidity FROM mailboxes WHERE account_id = ? AND folder = ?",
                               (account_id, folder)).fetchone()
            return self._start(cur, account_id, folder, uidvalidity, old[0] if old else None, resync_below)

    def open_mailbox(self, account_id: str, folder: str, uidvalidity: int, uidnext: int | None) -> OpenedMailbox:
        """The folder's checkpoint under the server's current ``uidvalidity``, in one transaction
        (where get_mailbox then start_mailbox took two): as stored when UIDVALIDITY matches (one
        SELECT); else started at UID 0 like :meth:`start_mailbox`, after a change with the UIDs
        below ``uidnext`` to be announced as a resync (rule 1)."""
        with self.transaction() as cur:
            r = self.execute(cur, "SELECT uidvalidity, last_uid, highestmodseq, resync_below FROM mailboxes "
                                  "WHERE account_id = ? AND folder = ?", (account_id, folder)).fetchone()
            if r is not None and r[0] == uidvalidity:
                return OpenedMailbox(MailboxState(account_id, folder, *r), None, False)
            resync_below = (uidnext or 0) if r is not None else 0
            state = self._start(cur, account_id, folder, uidvalidity, r[0] if r else None, resync_below)
        return OpenedMailbox(state, r[0] if r else None, r is None)

    def _start(self, cur: Any, account_id: str, folder: str, uidvalidity: int, old: int | None,
               resync_below: int) -> MailboxState:
        now = time.time()
        if self.fence is not None:
            self.fence.check(self, cur, account_id)
        if old is not None and old != uidvalidity:
            self.execute(cur, "INSERT INTO uidvalidity_changes VALUES (?, ?, ?, ?, ?)",
                         (account_id, folder, old, uidvalidity, now))
        self.execute(cur, """
            INSERT INTO mailboxes (account_id, folder, uidvalidity, last_uid, highestmodseq, resync_below, updated_at)
            VALUES (?, ?, ?, 0, NULL, ?, ?)
            ON CONFLICT (account_id, folder) DO UPDATE SET uidvalidity = excluded.uidvalidity, last_uid = 0,
                highestmodseq = NULL, resync_below = excluded.resync_below, updated_at = excluded.updated_at
            """, (account_id, folder, uidvalidity, resync_below, now))
        return MailboxState(account_id, folder, uidvalidity, 0, None, resync_below)

    def commit_batch(self, mailbox: MailboxState, messages: Sequence[StoredMessage], settled_uid: int,
                     highestmodseq: int | None = None, announce: bool = True) -> int:
        """Store messages, queue their announcements and advance the checkpoint, atomically.

        ``settled_uid`` is the highest UID below which every UID is stored or known gone; the
        checkpoint never moves backwards and never moves under a different UIDVALIDITY (a
        concurrent reset wins). A key already stored is a no-op: no second row, no second
        announcement. Returns how many messages were new.
        """
        now = time.time()
        account_id, folder, uidvalidity = mailbox.account_id, mailbox.folder, mailbox.uidvalidity
        keys = [message_key(account_id, folder, uidvalidity, m.uid) for m in messages]
        # Raw bytes to S3 first, outside the transaction: a row naming an object is committed only
        # after the object exists; a crash in between leaves an orphan object, never a dangling row.
        prepared = (self.blobs.put_batch(list(zip(keys, (m.raw for m in messages)))) if self.blobs is not None
                    else [blobs_mod.prepare_inline(m.raw) for m in messages])
        # Rows and envelopes are built before the transaction opens, so that it holds its locks
        # only for the statements; the envelopes of keys already stored are dropped unused.
        batch = Batch(mailbox, [message_row(mailbox, m, p.raw, p.sha256, p.blob, now)
                                for m, p in zip(messages, prepared)],
                      [OutboxRow(key, account_id, make_envelope(account_id, folder, uidvalidity, m, now,
                                                                resync=m.uid < mailbox.resync_below,
                                                                extra=p.envelope_extra), len(m.raw), now)
                       if announce else None for key, m, p in zip(keys, messages, prepared)],
                      settled_uid, highestmodseq, now)
        with self.transaction() as cur:
            if self.fence is not None:
                self.fence.check(self, cur, account_id)  # a node that lost the lease commits nothing
            inserted = len(self._write_batch(cur, batch))
        mailbox.last_uid = max(mailbox.last_uid, settled_uid)
        return inserted

    def _write_batch(self, cur: Any, batch: Batch) -> set[int]:
        """The statements of one batch inside its transaction: check the checkpoint's UIDVALIDITY,
        insert the rows whose key is new and their outbox rows, move the checkpoint. Returns the new
        UIDs. PostgreSQL overrides this with fewer round trips (postgres.py)."""
        mailbox = batch.mailbox
        self._check_uidvalidity(cur, mailbox)
        new_uids = {row.uid for row in batch.rows if self._insert_message(cur, row)}
        outbox = [o for row, o in zip(batch.rows, batch.outbox) if o is not None and row.uid in new_uids]
        if outbox:
            # One multi-row statement per batch, not one round trip per message.
            self.execute(cur, "INSERT INTO outbox (key, account_id, envelope, raw_size, created_at) VALUES "
                              + ", ".join(["(?, ?, ?, ?, ?)"] * len(outbox)) + " ON CONFLICT (key) DO NOTHING",
                         [value for row in outbox for value in row])
        self.execute(cur, """
            UPDATE mailboxes SET last_uid = ?, highestmodseq = COALESCE(?, highestmodseq), updated_at = ?
            WHERE account_id = ? AND folder = ? AND uidvalidity = ? AND last_uid < ?""",
            (batch.settled_uid, batch.highestmodseq, batch.now, mailbox.account_id, mailbox.folder,
             mailbox.uidvalidity, batch.settled_uid))
        return new_uids

    def _check_uidvalidity(self, cur: Any, mailbox: MailboxState) -> None:
        current = self.execute(cur, "SELECT uidvalidity FROM mailboxes WHERE account_id = ? AND folder = ?"
                                    + self._for_update, (mailbox.account_id, mailbox.folder)).fetchone()
        if current is None or current[0] != mailbox.uidvalidity:
            raise StoreError(f"mailbox {mailbox.account_id}/{mailbox.folder} changed UIDVALIDITY under a batch")

    def _insert_message(self, cur: Any, row: MessageRow) -> bool:
        """One message row; True if new, False if its key is already stored."""
        return self.execute(cur, f"""INSERT INTO messages ({MESSAGE_COLUMNS})
            VALUES ({', '.join('?' * len(row))}) ON CONFLICT (account_id, folder, uidvalidity, uid) DO NOTHING""",
                            row).rowcount > 0

    # --- reads ----------------------------------------------------------------------------------
    def message_raw(self, key: str) -> bytes | None:
        r = self._message_columns(key, "raw")
        return bytes(r[0]) if r and r[0] is not None else None

    def message_raw_or_ref(self, key: str) -> tuple[bytes | None, str | None] | None:
        """(raw bytes, S3 reference) of a stored message, either None when not there (pruned, or in
        S3); None for an unknown key. blobs.read_raw follows the reference."""
        r = self._message_columns(key, "raw, blob")
        return None if r is None else (bytes(r[0]) if r[0] is not None else None, r[1] or None)

    def _message_columns(self, key: str, columns: str) -> Any:
        with self.transaction() as cur:
            return self.execute(cur, f"SELECT {columns} FROM messages WHERE account_id = ? AND folder = ? AND "
                                     "uidvalidity = ? AND uid = ?", MessageKey.parse(key)).fetchone()

    def recent_messages(self, account_id: str | None = None, limit: int = 20) -> list[RecentMessage]:
        where, params = ("WHERE account_id = ?", (account_id,)) if account_id else ("", ())
        with self.transaction() as cur:
            rows = self.execute(cur, f"""SELECT account_id, folder, uidvalidity, uid, "from", subject, size,
                                                ingested_at
                                         FROM messages {where} ORDER BY ingested_at DESC, uid DESC LIMIT ?""",
                                (*params, limit)).fetchall()
        return [RecentMessage(message_key(r[0], r[1], r[2], r[3]), r[0], r[1], r[3], r[4], r[5], r[6], r[7])
                for r in rows]

    def counts(self) -> dict[str, int]:
        with self.transaction() as cur:
            messages = self.execute(cur, "SELECT COUNT(*) FROM messages").fetchone()[0]
            outbox = self.execute(cur, "SELECT COUNT(*) FROM outbox").fetchone()[0]
            accounts = self.execute(cur, "SELECT COUNT(*) FROM accounts").fetchone()[0]
        return {"messages": messages, "outbox": outbox, "accounts": accounts}
