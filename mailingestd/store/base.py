"""The store's internal execution API, shared by every module of ``store/`` (and only by them).

One transaction, one cursor: :meth:`StoreBase.transaction` opens it, and :meth:`StoreBase.execute`
and :meth:`StoreBase.executemany` run SQL on it. SQL is written once for both dialects with ``?``
placeholders; ``execute`` renders them for the backend (``%s`` for psycopg). A module of
``store/`` that needs SQL (partitions, retention, leases) calls these on the store it is given;
nothing outside ``store/`` writes SQL.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence


class StoreBase:
    """Connections and the execution API; the backends (sqlite.py, postgres.py) supply the first."""

    dialect = ""
    blobs: Any = None  # blobs.S3Blobs when [blobs] kind = "s3" (set by the process that ingests)
    fence: Any = None  # leases.Fence in cluster mode (set by the process that ingests)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """One transaction: committed when the block ends, rolled back when it raises. Yields the
        cursor to pass to :meth:`execute`."""
        raise NotImplementedError
        yield

    def close(self) -> None:
        raise NotImplementedError

    def sql(self, sql: str) -> str:
        """``sql`` with its ``?`` placeholders in the backend's syntax."""
        return sql

    def execute(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement on ``cur`` (from :meth:`transaction`); returns the cursor for fetching."""
        cur.execute(self.sql(sql), params)
        return cur

    def executemany(self, cur: Any, sql: str, params: Sequence[Sequence[Any]]) -> Any:
        """Run one statement once per parameter tuple on ``cur``."""
        cur.executemany(self.sql(sql), params)
        return cur
