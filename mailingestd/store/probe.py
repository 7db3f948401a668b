"""A read-only look at a store for ``mailingestd --check-config``: whether it exists, its schema
version and PostgreSQL's server version. Nothing is created, locked or migrated."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Literal

import msgspec

from .records import StoreError
from .schema import LATEST


class StoreProbe(msgspec.Struct, frozen=True, kw_only=True):
    """What a read-only look at the store found: nothing is created, locked or migrated."""

    backend: Literal["sqlite", "postgresql"]
    exists: bool
    schema_version: int  # 0: no schema yet
    server_version: int | None = None  # PostgreSQL's server_version_num (150004 = 15.4)

    @property
    def latest(self) -> int:
        return LATEST  # the schema this mailingestd migrates to

    def describe(self) -> str:
        if not self.exists:
            return f"store {self.backend} does not exist yet (created and migrated at start or by `mailingestd migrate`)"
        server = "" if self.server_version is None else f" {self.server_version // 10000}.{self.server_version % 10000}"
        pending = self.latest - self.schema_version
        state = ("up to date" if pending <= 0 else
                 f"{pending} migration{'s' if pending > 1 else ''} to apply at start or by `mailingestd migrate`")
        return f"store {self.backend}{server} schema {self.schema_version} of {self.latest}, {state}"


def probe_store(url: str) -> StoreProbe:
    """Look at the store read-only: whether it exists, its schema version and server version."""
    if url.startswith("sqlite:///"):
        return _probe_sqlite(Path(url[len("sqlite://"):]))
    return _probe_postgresql(url)


def _probe_sqlite(path: Path) -> StoreProbe:
    if not path.exists():
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise StoreError(f"cannot create the SQLite store {path}: {ancestor} is not writable by this user")
        return StoreProbe(backend="sqlite", exists=False, schema_version=0)
    try:
        # A stopped store has no -wal file: immutable=1 reads it without creating the -wal/-shm
        # pair (root-owned ones would lock the daemon's user out). With a -wal (a running or
        # crashed daemon) the schema may sit in it, so read through it, still read-only.
        wal = path.with_name(path.name + "-wal").exists()
        uri = "file:" + urllib.parse.quote("/" + str(path).lstrip("/")) + ("?mode=ro" if wal else "?immutable=1")
        with sqlite3.connect(uri, uri=True, timeout=5) as conn:
            has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone()
            version = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0] \
                if has_table else 0
        conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the SQLite store {path}: {exc}") from None
    return StoreProbe(backend="sqlite", exists=True, schema_version=version)


def _probe_postgresql(url: str) -> StoreProbe:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.read_only = True
            server_version, has_table = conn.execute(
                "SELECT current_setting('server_version_num')::int, "
                "to_regclass('schema_migrations') IS NOT NULL").fetchone()
            version = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0] \
                if has_table else 0
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL store: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return StoreProbe(backend="postgresql", exists=True, schema_version=version, server_version=server_version)
