"""The durable store, as the roles import it: :func:`open_store` and the records it takes and gives.

Two backends share one SQL dialect subset and one interface (:class:`Store`, api.py): SQLite (the
embedded default, WAL mode, one connection per thread; sqlite.py) and PostgreSQL (psycopg_pool;
postgres.py). The invariant every caller relies on lives in :meth:`Store.commit_batch`
(messages.py): message rows, their outbox rows and the mailbox checkpoint move in ONE
transaction, and a key that is already stored is a no-op (no second row, no second announcement).

The parts: schema.py (migrations), accounts.py (settings, secrets, OAuth2 tokens, states),
messages.py (checkpoints, messages), outbox.py, records.py (what goes in and out), base.py (the
execution API the modules of store/ share).
"""

from __future__ import annotations

from .accounts import AccountRow
from .api import Store
from .postgres import PostgresStore
from .messages import OpenedMailbox
from .records import MailboxState, OutboxEntry, RecentMessage, StoredMessage, StoreError
from .sqlite import SqliteStore

__all__ = ["AccountRow", "MailboxState", "OpenedMailbox", "OutboxEntry", "PostgresStore", "RecentMessage",
           "SqliteStore", "Store", "StoreError", "StoredMessage", "open_store"]


def open_store(url: str, pool_min: int = 1, pool_max: int = 8) -> Store:
    """A store for ``sqlite:///PATH`` or ``postgresql://...``, migrated to the current schema."""
    if url.startswith("sqlite:///"):
        store: Store = SqliteStore(url[len("sqlite://"):])
    elif url.startswith(("postgresql://", "postgres://")):
        store = PostgresStore(url, pool_min, pool_max)
    else:
        raise StoreError(f"unsupported store url (expected sqlite:///PATH or postgresql://...): {url.split(':')[0]}")
    store.migrate()
    return store
