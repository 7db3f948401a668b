"""What goes in and out of the store: the records the roles hand it and get back, and the one
place a ``messages`` row is built from a fetched message (:class:`MessageRow`, by column name)."""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from ..envelope import Announced


class StoreError(Exception):
    """The store cannot be used (unreachable, disk full, schema newer than this code)."""


class MailboxState(msgspec.Struct):
    account_id: str
    folder: str
    uidvalidity: int
    last_uid: int
    highestmodseq: int | None = None
    resync_below: int = 0


class StoredMessage(Announced, frozen=True, kw_only=True):
    """One fetched message ready to commit; ``raw`` is exactly what the server sent (the header
    only when ``body_omitted``)."""

    raw: bytes
    internaldate: str | None = None


class OutboxEntry(msgspec.Struct):
    id: int
    key: str
    account_id: str
    envelope: str
    raw_size: int


class RecentMessage(msgspec.Struct):
    key: str
    account_id: str
    folder: str
    uid: int
    from_: str | None
    subject: str | None
    size: int
    ingested_at: float


# The header fields a StoredMessage carries into its row (and its envelope), in column order.
HEADER_FIELDS = ("message_id", "from_", "to", "cc", "subject", "date", "in_reply_to", "references")

# One ``messages`` row, fields in the table's column order (:data:`MESSAGE_COLUMNS`), read by name.
MessageRow = NamedTuple("MessageRow", [
    ("account_id", str), ("folder", str), ("uidvalidity", int), ("uid", int),
    *((field, str | None) for field in HEADER_FIELDS),
    ("size", int), ("internaldate", str | None), ("raw", bytes | None), ("sha256", str), ("ingested_at", float),
    ("blob", str | None),
])


def message_row(mailbox: MailboxState, msg: StoredMessage, raw: bytes | None, sha256: str, blob: str | None,
                ingested_at: float) -> MessageRow:
    """The row of ``msg`` in ``mailbox``; ``raw`` None when its bytes are in S3 (``blob``)."""
    return MessageRow(mailbox.account_id, mailbox.folder, mailbox.uidvalidity, msg.uid,
                      *(getattr(msg, field) for field in HEADER_FIELDS), msg.size, msg.internaldate, raw, sha256,
                      ingested_at, blob)


# SQL names of MessageRow's fields: "from", "to" and "references" are reserved words.
_QUOTED = {"from_": '"from"', "to": '"to"', "references": '"references"'}
MESSAGE_COLUMNS = ", ".join(_QUOTED.get(field, field) for field in MessageRow._fields)
