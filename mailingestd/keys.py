"""The message key, ``account_id/folder/uidvalidity/uid``: the primary key of a stored message, the
``key`` of its queue envelope and, hashed, its FIFO deduplication id (docs/architecture.md, "The
message key"). Formatted and parsed here only, in Python and in SQL.

Account ids contain no ``/`` (config validation refuses it); folder names may, so a key is parsed
from both ends: the account id up to the first ``/``, UIDVALIDITY and UID after the last two.
"""

from __future__ import annotations

from typing import NamedTuple


class MessageKey(NamedTuple):
    account_id: str
    folder: str
    uidvalidity: int
    uid: int

    def __str__(self) -> str:
        return f"{self.account_id}/{self.folder}/{self.uidvalidity}/{self.uid}"

    @classmethod
    def parse(cls, key: str) -> MessageKey:
        account_id, rest = key.split("/", 1)
        folder, uidvalidity, uid = rest.rsplit("/", 2)
        return cls(account_id, folder, int(uidvalidity), int(uid))


def message_key(account_id: str, folder: str, uidvalidity: int, uid: int) -> str:
    return str(MessageKey(account_id, folder, uidvalidity, uid))


def sql_key(alias: str) -> str:
    """The same key computed in SQL from the columns of ``messages`` aliased ``alias`` (PostgreSQL
    and SQLite both concatenate with ``||``)."""
    return " || '/' || ".join(f"{alias}.{column}" for column in MessageKey._fields)
