"""The durable store: accounts, mailbox checkpoints, messages and the outbox.

Two backends share one SQL dialect subset and one small interface: SQLite (the embedded
default, WAL mode, one connection per thread) and PostgreSQL (psycopg_pool). The invariant
every caller relies on lives in :meth:`Store.commit_batch`: message rows, their outbox rows and
the mailbox checkpoint move in ONE transaction, and a key that is already stored is a no-op
(no second row, no second announcement).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import msgspec

from . import blobs as blobs_mod, partitions
from ..config import AccountConfig, OAuth2Config
from .keys import MessageKey, message_key


# Ids per DELETE of acknowledged outbox rows: within SQLite's bound parameters (32,766 since 3.32,
# 999 before) and a publisher step's 500 rows in one statement.
OUTBOX_DELETE_CHUNK = 500


class StoreError(Exception):
    """The store cannot be used (unreachable, disk full, schema newer than this code)."""


class MailboxState(msgspec.Struct):
    account_id: str
    folder: str
    uidvalidity: int
    last_uid: int
    highestmodseq: int | None = None
    resync_below: int = 0


class StoredMessage(msgspec.Struct):
    """One fetched message ready to commit; ``raw`` is exactly what the server sent."""

    uid: int
    raw: bytes
    size: int
    internaldate: str | None
    message_id: str | None
    from_: str | None
    to: str | None
    cc: str | None
    subject: str | None
    date: str | None
    in_reply_to: str | None
    references: str | None
    body_omitted: bool = False  # over imap.max_message_size with imap.oversize = "skip": raw is the header


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


ENVELOPE_VERSION = 1


def make_envelope(account_id: str, folder: str, uidvalidity: int, msg: StoredMessage, ingested_at: float,
                  resync: bool, extra: dict[str, Any] | None = None) -> str:
    """The queue body (docs/envelope.schema.json) without the raw message: consumers claim it by key."""
    body = {
        "v": ENVELOPE_VERSION,
        "key": message_key(account_id, folder, uidvalidity, msg.uid),
        "account_id": account_id,
        "folder": folder,
        "uidvalidity": uidvalidity,
        "uid": msg.uid,
        "message_id": msg.message_id,
        "from": msg.from_,
        "to": msg.to,
        "cc": msg.cc,
        "subject": msg.subject,
        "date": msg.date,
        "in_reply_to": msg.in_reply_to,
        "references": msg.references,
        "size": msg.size,
        "ingested_at": ingested_at,
    }
    if resync:
        # Rule 1: a UIDVALIDITY change re-ingests the folder; say so instead of posing as new mail.
        body["resync"] = True
    if msg.body_omitted:
        body["body_omitted"] = True  # the store holds the header only; the body is on the server
    if extra:
        body.update(extra)  # raw bytes in S3: the payload pointer and sha256 (blobs.py)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


# Columns whose change is an account change (state and last_error are the daemon's own bookkeeping).
_WATCHED_COLUMNS = "host, port, tls, username, auth, secret_ref, folders, priority, idle, enabled, options, secrets"

# Each migration is (version, sqlite statements, postgresql statements). Never edit one that
# has shipped: append a new version.
_TYPES = {
    "sqlite": {"BLOB": "BLOB", "SERIAL": "INTEGER PRIMARY KEY AUTOINCREMENT", "FLOAT": "REAL", "BIGINT": "INTEGER"},
    "postgresql": {"BLOB": "BYTEA", "SERIAL": "BIGSERIAL PRIMARY KEY", "FLOAT": "DOUBLE PRECISION", "BIGINT": "BIGINT"},
}
_MIGRATIONS: list[tuple[int, str | dict[str, list[str]]]] = [
    (1, """
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    port INTEGER,
    tls TEXT NOT NULL DEFAULT 'implicit',
    username TEXT NOT NULL,
    auth TEXT NOT NULL DEFAULT 'password',
    secret_ref TEXT,
    folders TEXT NOT NULL DEFAULT '["INBOX"]',
    priority TEXT NOT NULL DEFAULT 'auto',
    idle INTEGER NOT NULL DEFAULT 1,
    enabled INTEGER NOT NULL DEFAULT 1,
    options TEXT NOT NULL DEFAULT '{}',
    source TEXT NOT NULL DEFAULT 'store',
    state TEXT NOT NULL DEFAULT 'new',
    last_error TEXT,
    created_at {FLOAT} NOT NULL,
    updated_at {FLOAT} NOT NULL
);
CREATE TABLE mailboxes (
    account_id TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity {BIGINT} NOT NULL,
    last_uid {BIGINT} NOT NULL DEFAULT 0,
    highestmodseq {BIGINT},
    resync_below {BIGINT} NOT NULL DEFAULT 0,
    updated_at {FLOAT} NOT NULL,
    PRIMARY KEY (account_id, folder)
);
CREATE TABLE messages (
    account_id TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity {BIGINT} NOT NULL,
    uid {BIGINT} NOT NULL,
    message_id TEXT,
    "from" TEXT,
    "to" TEXT,
    cc TEXT,
    subject TEXT,
    date TEXT,
    in_reply_to TEXT,
    "references" TEXT,
    size {BIGINT} NOT NULL,
    internaldate TEXT,
    raw {BLOB},
    sha256 TEXT NOT NULL,
    ingested_at {FLOAT} NOT NULL,
    PRIMARY KEY (account_id, folder, uidvalidity, uid)
);
CREATE INDEX messages_ingested_at ON messages (ingested_at);
CREATE TABLE outbox (
    id {SERIAL},
    key TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    raw_size {BIGINT} NOT NULL,
    created_at {FLOAT} NOT NULL
);
CREATE TABLE uidvalidity_changes (
    account_id TEXT NOT NULL,
    folder TEXT NOT NULL,
    old_uidvalidity {BIGINT} NOT NULL,
    new_uidvalidity {BIGINT} NOT NULL,
    changed_at {FLOAT} NOT NULL
);
"""),
    # 2: encrypted secrets, rotated OAuth2 refresh tokens, and a revision counter that triggers bump
    # on every change of an account's settings (plain SQL from a user's backend included), which
    # the scheduler watches (and, on PostgreSQL, LISTENs for).
    (2, {
        "sqlite": [
            "ALTER TABLE accounts ADD COLUMN secrets TEXT NOT NULL DEFAULT '{}'",
            "CREATE TABLE oauth_tokens (account_id TEXT PRIMARY KEY, refresh_token TEXT NOT NULL, "
            "updated_at REAL NOT NULL)",
            "CREATE TABLE revisions (name TEXT PRIMARY KEY, revision INTEGER NOT NULL)",
            "INSERT INTO revisions VALUES ('accounts', 1)",
            *[f"CREATE TRIGGER accounts_changed_{event.split()[0].lower()} AFTER {event} ON accounts BEGIN "
              "UPDATE revisions SET revision = revision + 1 WHERE name = 'accounts'; END"
              for event in ("INSERT", "DELETE", "UPDATE OF " + _WATCHED_COLUMNS)],
        ],
        "postgresql": [
            "ALTER TABLE accounts ADD COLUMN secrets TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE accounts ALTER COLUMN created_at SET DEFAULT extract(epoch from now())",
            "ALTER TABLE accounts ALTER COLUMN updated_at SET DEFAULT extract(epoch from now())",
            "CREATE TABLE oauth_tokens (account_id TEXT PRIMARY KEY, refresh_token TEXT NOT NULL, "
            "updated_at DOUBLE PRECISION NOT NULL)",
            "CREATE TABLE revisions (name TEXT PRIMARY KEY, revision BIGINT NOT NULL)",
            "INSERT INTO revisions VALUES ('accounts', 1)",
            """CREATE FUNCTION mailingestd_accounts_changed() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 UPDATE revisions SET revision = revision + 1 WHERE name = 'accounts';
                 PERFORM pg_notify('mailingestd_accounts', '');
                 RETURN NULL;
               END $$""",
            "CREATE TRIGGER accounts_changed AFTER INSERT OR DELETE OR UPDATE OF " + _WATCHED_COLUMNS +
            " ON accounts FOR EACH STATEMENT EXECUTE FUNCTION mailingestd_accounts_changed()",
        ],
    }),
    # 3: data lifecycle. PostgreSQL: messages range-partitioned by ingested_at, uniqueness of the
    # message key in message_keys (partitions.py explains why); both: a blob column for raw bytes
    # kept in S3 (blobs.py).
    (3, partitions.MIGRATION_3),
    # 4: scale-out (leases.py explains the design). Nodes heartbeat in ``nodes``; each account has
    # one narrow ``leases`` row, apart from ``accounts`` so that renewals never touch the settings
    # rows or their triggers. Times are the database clock. SQLite runs single-node: nothing to add.
    (4, {
        "sqlite": [],
        "postgresql": [
            """CREATE TABLE nodes (
                   node_id TEXT PRIMARY KEY,
                   capacity DOUBLE PRECISION NOT NULL DEFAULT 1,
                   state TEXT NOT NULL DEFAULT 'running',
                   host TEXT,
                   pid INTEGER,
                   lease_time DOUBLE PRECISION NOT NULL,
                   started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                   heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now())""",
            """CREATE TABLE leases (
                   account_id TEXT PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
                   owner TEXT,
                   expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
                   acquired_at TIMESTAMPTZ,
                   renewed_at TIMESTAMPTZ)""",
            "CREATE INDEX leases_owner ON leases (owner)",
        ],
    }),
    # 5: raw bytes compressed with lz4 instead of pglz (PostgreSQL 14+ built with lz4, as Debian's
    # and the PGDG packages are). pglz made PostgreSQL the bottleneck of a backlog: measured here,
    # 3,000 realistic messages stored at 301/s with pglz (9.3 s of server CPU) and 1,107/s with lz4
    # (2.1 s), the table the same size. Applies to new rows; a server without lz4 keeps pglz.
    # Partitions created later copy the column's compression (partitions.ensure_partitions).
    (5, {
        "sqlite": [],
        "postgresql": [
            """DO $$
               DECLARE part regclass;
               BEGIN
                   ALTER TABLE messages ALTER COLUMN raw SET COMPRESSION lz4;
                   -- not inherited by existing partitions: each its own
                   FOR part IN SELECT inhrelid::regclass FROM pg_inherits
                               WHERE inhparent = 'messages'::regclass LOOP
                       EXECUTE 'ALTER TABLE ' || part::text || ' ALTER COLUMN raw SET COMPRESSION lz4';
                   END LOOP;
               EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
                   RAISE NOTICE 'lz4 not available: raw stays compressed with pglz';
               END $$""",
        ],
    }),
    # 6: the credentials an auth_failed or reauth_required state was reached with (the scheduler's
    # credentials_version), so that the open circuit survives a restart unless they changed
    # meanwhile (a new password file). Not a watched column: writing it is no account change.
    (6, "ALTER TABLE accounts ADD COLUMN state_credentials TEXT"),
    # 7: outbox claims (PostgreSQL, scale-out): a publisher sends a row only while it holds the
    # row's claim (claimed_by, claim_until on the database clock), so several nodes never send the
    # same row at once; a dead node's claims lapse with its leases (Store.outbox_claim). The partial
    # index finds another node's claims on an account's rows (order within a FIFO message group);
    # claimed rows are few (in flight, or waiting for a retry). Each node's publish rate sits in
    # its ``nodes`` row, so any node's status shows every node's. SQLite has one publisher.
    (7, {
        "sqlite": [],
        "postgresql": [
            "ALTER TABLE outbox ADD COLUMN claimed_by TEXT",
            "ALTER TABLE outbox ADD COLUMN claim_until TIMESTAMPTZ",
            "CREATE INDEX outbox_claimed ON outbox (account_id) WHERE claimed_by IS NOT NULL",
            "ALTER TABLE nodes ADD COLUMN publish_rate DOUBLE PRECISION NOT NULL DEFAULT 0",
        ],
    }),
]


def _statements(sql: str | dict[str, list[str]], dialect: str) -> list[str]:
    """A migration's statements for one dialect: a shared script split on ';', or explicit lists
    (needed for trigger bodies, which contain ';' themselves)."""
    if isinstance(sql, dict):
        return sql[dialect]
    rendered = sql
    for name, value in _TYPES[dialect].items():
        rendered = rendered.replace("{" + name + "}", value)
    return [s.strip() for s in rendered.split(";") if s.strip()]


class _AccountColumns(NamedTuple):
    """One ``accounts`` row as read with ``SELECT {_ACCOUNT_COLUMNS}``: fields by name, not position."""

    id: str
    host: str
    port: int | None
    tls: str
    username: str
    auth: str
    secret_ref: str | None
    folders: str
    priority: str
    idle: int
    enabled: int
    options: str | None
    source: str
    secrets: str | None
    state: str
    last_error: str | None


_ACCOUNT_COLUMNS = ", ".join(_AccountColumns._fields)
ACCOUNTS_PER_STATEMENT = 1000  # 16 parameters each: within SQLite's and PostgreSQL's limits
# The leading columns an operator sets (id .. secrets, what _account_row writes); state and
# last_error are the daemon's.
_SETTINGS = _AccountColumns._fields.index("state")


def _secret_ref(account: AccountConfig) -> str | None:
    if account.password_env:
        return f"env:{account.password_env}"
    if account.password_file:
        return f"file:{account.password_file}"
    return None


def _account_row(account: AccountConfig, source: str, secrets: dict[str, str]) -> tuple:
    options = {"tls_ca_file": account.tls_ca_file, "tls_verify": account.tls_verify}
    if account.oauth2 is not None:
        options["oauth2"] = msgspec.to_builtins(account.oauth2)
    return (account.id, account.host, account.port, account.tls, account.username, account.auth,
            _secret_ref(account), json.dumps(account.folders), account.priority, int(account.idle),
            int(account.enabled), json.dumps(options), source, json.dumps(secrets, sort_keys=True))


def _account_from_row(row: _AccountColumns) -> AccountConfig:
    opts = json.loads(row.options or "{}")
    ref = row.secret_ref or ""
    return AccountConfig(
        id=row.id, host=row.host, port=row.port, tls=row.tls, username=row.username, auth=row.auth,
        password_env=ref[4:] if ref.startswith("env:") else None,
        password_file=ref[5:] if ref.startswith("file:") else None,
        folders=json.loads(row.folders), priority=row.priority, idle=bool(row.idle), enabled=bool(row.enabled),
        tls_ca_file=opts.get("tls_ca_file"), tls_verify=opts.get("tls_verify", True),
        oauth2=msgspec.convert(opts["oauth2"], OAuth2Config) if opts.get("oauth2") else None,
    )


class AccountRow(msgspec.Struct):
    account: AccountConfig
    source: str
    state: str
    last_error: str | None
    secrets: dict[str, str] = {}  # field -> ciphertext (see secrets.py); never plaintext


def _row(r: Sequence[Any]) -> AccountRow:
    row = _AccountColumns(*r)
    return AccountRow(_account_from_row(row), row.source, row.state, row.last_error, json.loads(row.secrets or "{}"))


class Store:
    """What the daemon and mailingestctl need from a store; subclasses supply connections."""

    dialect = ""

    # --- connection plumbing (per backend) ---------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def _exec(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._sql(sql), params)
        return cur

    # --- schema --------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply every migration newer than the schema; returns the schema version."""
        with self.transaction() as cur:
            self._lock_for_migration(cur)
            self._exec(cur, "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                            "applied_at " + _TYPES[self.dialect]["FLOAT"] + " NOT NULL)")
            current = self._exec(cur, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
            latest = _MIGRATIONS[-1][0]
            if current > latest:
                raise StoreError(f"store schema version {current} is newer than this mailingestd ({latest}); "
                                 "upgrade mailingestd")
            for version, sql in _MIGRATIONS:
                if version > current:
                    for statement in _statements(sql, self.dialect):
                        self._exec(cur, statement)
                    self._exec(cur, "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                               (version, time.time()))
            return latest

    def _lock_for_migration(self, cur: Any) -> None:
        """Serialise migrations between processes (SQLite: BEGIN IMMEDIATE already does)."""

    # --- accounts ------------------------------------------------------------------------
    def upsert_account(self, account: AccountConfig, source: str = "store",
                       secrets: dict[str, str] | None = None) -> bool:
        """Insert or update one account; returns True when anything changed.

        ``secrets`` are ciphertexts by field (password, client_secret, refresh_token); None keeps
        what the row has.
        """
        with self.transaction() as cur:
            old = self._exec(cur, f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account.id,)).fetchone()
            return self._write_accounts(cur, [(account, secrets, _AccountColumns(*old) if old else None)], source) > 0

    def upsert_accounts(self, accounts: Sequence[AccountConfig], source: str = "store") -> int:
        """:meth:`upsert_account` for many accounts (keeping their secrets): one read, and the
        changed rows written in multi-row statements, in one transaction. 10,000 ``[[accounts]]``
        took 8 s at start one transaction each; an unchanged file now costs one SELECT.
        Returns how many changed."""
        with self.transaction() as cur:
            existing = {r[0]: _AccountColumns(*r)
                        for r in self._exec(cur, f"SELECT {_ACCOUNT_COLUMNS} FROM accounts").fetchall()}
            return self._write_accounts(cur, [(account, None, existing.get(account.id)) for account in accounts],
                                        source)

    def _write_accounts(self, cur: Any, items: list[tuple[AccountConfig, dict[str, str] | None, _AccountColumns | None]],
                        source: str) -> int:
        """Insert or update each (account, secrets or None to keep the row's, existing row or None)
        whose settings differ; an account in auth_failed or reauth_required starts afresh."""
        now = time.time()
        changed: dict[str, tuple] = {}  # by id: one statement may not touch a row twice
        reset = []
        for account, secrets, old in items:
            if secrets is None:
                secrets = json.loads(old.secrets or "{}") if old is not None else {}
            row = _account_row(account, source, secrets)
            if old is not None and tuple(old[:_SETTINGS]) == row:
                continue
            changed[account.id] = (*row, now, now)
            if old is not None and old.state in ("auth_failed", "reauth_required"):
                reset.append((account.id,))
        # Multi-row statements: the accounts trigger (revision bump, NOTIFY) runs once per
        # statement, and 10,000 single-row statements updating one revisions row in one
        # transaction cost PostgreSQL 7 s (each update walks the row's growing version chain).
        rows = list(changed.values())
        for start in range(0, len(rows), ACCOUNTS_PER_STATEMENT):
            chunk = rows[start:start + ACCOUNTS_PER_STATEMENT]
            self._exec(cur, f"""
                INSERT INTO accounts ({_ACCOUNT_COLUMNS}, created_at, updated_at) VALUES """
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'new', NULL, ?, ?)"] * len(chunk)) + """
                ON CONFLICT (id) DO UPDATE SET host = excluded.host, port = excluded.port, tls = excluded.tls,
                    username = excluded.username, auth = excluded.auth, secret_ref = excluded.secret_ref,
                    folders = excluded.folders, priority = excluded.priority, idle = excluded.idle,
                    enabled = excluded.enabled, options = excluded.options, source = excluded.source,
                    secrets = excluded.secrets, updated_at = excluded.updated_at""",
                [value for row in chunk for value in row])
        if reset:
            cur.executemany(self._sql("UPDATE accounts SET state = 'new', last_error = NULL WHERE id = ?"), reset)
        return len(rows)

    def list_accounts(self) -> list[AccountRow]:
        with self.transaction() as cur:
            rows = self._exec(cur, f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY id").fetchall()
        return [_row(r) for r in rows]

    def get_account(self, account_id: str) -> AccountRow | None:
        with self.transaction() as cur:
            r = self._exec(cur, f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return _row(r) if r else None

    def delete_account(self, account_id: str) -> bool:
        """Remove the account; its stored messages and its folders' checkpoints stay.

        A checkpoint is one small row per folder, and it is what keeps the account's old mail old:
        added again after store.metadata_retention pruned its rows, the account would otherwise
        store and announce every such message again as new. ``resync_account`` starts over on purpose.
        """
        with self.transaction() as cur:
            deleted = self._exec(cur, "DELETE FROM accounts WHERE id = ?", (account_id,)).rowcount
            self._exec(cur, "DELETE FROM oauth_tokens WHERE account_id = ?", (account_id,))
        return deleted > 0

    def resync_account(self, account_id: str) -> int:
        """Every folder of the account starts over at UID 1 under its UIDVALIDITY: keys still stored
        stay as they are; messages no longer in the store are stored and announced again, marked
        ``"resync": true`` (up to the old checkpoint). Returns how many folders start over."""
        with self.transaction() as cur:
            return self._exec(cur, """
                UPDATE mailboxes SET resync_below = CASE WHEN resync_below > last_uid + 1 THEN resync_below
                                                         ELSE last_uid + 1 END,
                                     last_uid = 0, highestmodseq = NULL, updated_at = ?
                WHERE account_id = ?""", (time.time(), account_id)).rowcount

    def set_enabled(self, account_id: str, enabled: bool) -> bool:
        with self.transaction() as cur:
            return self._exec(cur, "UPDATE accounts SET enabled = ?, state = 'new', last_error = NULL, "
                                   "updated_at = ? WHERE id = ?",
                              (int(enabled), time.time(), account_id)).rowcount > 0

    def set_account_state(self, account_id: str, state: str, last_error: str | None = None,
                          credentials: str | None = None) -> None:
        """The daemon's state of an account; ``credentials``: the version it was reached with."""
        with self.transaction() as cur:
            self._exec(cur, "UPDATE accounts SET state = ?, last_error = ?, state_credentials = ? WHERE id = ?",
                       (state, last_error, credentials, account_id))

    def parked_accounts(self) -> dict[str, tuple[str, str | None]]:
        """Accounts in ``auth_failed`` or ``reauth_required``: id -> (state, credentials version)."""
        with self.transaction() as cur:
            rows = self._exec(cur, "SELECT id, state, state_credentials FROM accounts "
                                   "WHERE state IN ('auth_failed', 'reauth_required')").fetchall()
        return {account_id: (state, credentials) for account_id, state, credentials in rows}

    def accounts_version(self) -> str:
        """Changes whenever any account's settings change, by any writer (triggers bump it)."""
        with self.transaction() as cur:
            (revision,) = self._exec(cur, "SELECT revision FROM revisions WHERE name = 'accounts'").fetchone()
        return str(revision)

    def set_secrets(self, account_id: str, secrets: dict[str, str], new_credentials: bool = True) -> bool:
        """Replace an account's encrypted secrets. A key rotation (``new_credentials`` False) keeps
        updated_at, so a refresh token the provider rotated since stays the newer one."""
        with self.transaction() as cur:
            if new_credentials:
                return self._exec(cur, "UPDATE accounts SET secrets = ?, updated_at = ? WHERE id = ?",
                                  (json.dumps(secrets, sort_keys=True), time.time(), account_id)).rowcount > 0
            return self._exec(cur, "UPDATE accounts SET secrets = ? WHERE id = ?",
                              (json.dumps(secrets, sort_keys=True), account_id)).rowcount > 0

    def rotated_refresh_token(self, account_id: str) -> tuple[str, float] | None:
        """A refresh token the provider rotated (ciphertext, when), kept apart from the account's
        settings so that saving it is not an account change."""
        with self.transaction() as cur:
            r = self._exec(cur, "SELECT refresh_token, updated_at FROM oauth_tokens WHERE account_id = ?",
                           (account_id,)).fetchone()
        return (r[0], r[1]) if r else None

    def save_rotated_refresh_token(self, account_id: str, ciphertext: str) -> None:
        with self.transaction() as cur:
            self._exec(cur, """INSERT INTO oauth_tokens (account_id, refresh_token, updated_at) VALUES (?, ?, ?)
                               ON CONFLICT (account_id) DO UPDATE SET refresh_token = excluded.refresh_token,
                               updated_at = excluded.updated_at""", (account_id, ciphertext, time.time()))

    def account_updated_at(self, account_id: str) -> float:
        with self.transaction() as cur:
            r = self._exec(cur, "SELECT updated_at FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return float(r[0]) if r else 0.0

    # --- mailboxes and messages ------------------------------------------------------------
    def get_mailbox(self, account_id: str, folder: str) -> MailboxState | None:
        with self.transaction() as cur:
            r = self._exec(cur, "SELECT uidvalidity, last_uid, highestmodseq, resync_below FROM mailboxes "
                                "WHERE account_id = ? AND folder = ?", (account_id, folder)).fetchone()
        return MailboxState(account_id, folder, r[0], r[1], r[2], r[3]) if r else None

    def start_mailbox(self, account_id: str, folder: str, uidvalidity: int, resync_below: int = 0) -> MailboxState:
        """Begin (or begin again, after a UIDVALIDITY change) a folder at UID 0.

        The old UIDVALIDITY's rows stay; the change is recorded in ``uidvalidity_changes``.
        """
        now = time.time()
        with self.transaction() as cur:
            if self.fence is not None:
                self.fence.check(cur, account_id)
            old = self._exec(cur, "SELECT uidvalidity FROM mailboxes WHERE account_id = ? AND folder = ?",
                             (account_id, folder)).fetchone()
            if old is not None and old[0] != uidvalidity:
                self._exec(cur, "INSERT INTO uidvalidity_changes VALUES (?, ?, ?, ?, ?)",
                           (account_id, folder, old[0], uidvalidity, now))
            self._exec(cur, """
                INSERT INTO mailboxes (account_id, folder, uidvalidity, last_uid, highestmodseq, resync_below,
                                       updated_at)
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
        concurrent reset wins). Returns how many messages were new.
        """
        now = time.time()
        # Raw bytes to S3 first, outside the transaction: a row naming an object is committed only
        # after the object exists; a crash in between leaves an orphan object, never a dangling row.
        prepared = (self.blobs.put_batch([(message_key(mailbox.account_id, mailbox.folder, mailbox.uidvalidity,
                                                       m.uid), m.raw) for m in messages])
                    if self.blobs is not None else [blobs_mod.prepare_inline(m.raw) for m in messages])
        with self.transaction() as cur:
            if self.fence is not None:
                self.fence.check(cur, mailbox.account_id)  # a node that lost the lease commits nothing
            current = self._exec(cur, "SELECT uidvalidity, last_uid FROM mailboxes WHERE account_id = ? AND "
                                      "folder = ?" + self._for_update, (mailbox.account_id, mailbox.folder)).fetchone()
            if current is None or current[0] != mailbox.uidvalidity:
                raise StoreError(f"mailbox {mailbox.account_id}/{mailbox.folder} changed UIDVALIDITY under a batch")
            new_uids = self._insert_messages(cur, [(
                mailbox.account_id, mailbox.folder, mailbox.uidvalidity, msg.uid, msg.message_id, msg.from_,
                msg.to, msg.cc, msg.subject, msg.date, msg.in_reply_to, msg.references, msg.size,
                msg.internaldate, prep.raw, prep.sha256, now, prep.blob) for msg, prep in zip(messages, prepared)])
            inserted = len(new_uids)
            if announce and new_uids:
                outbox = [(message_key(mailbox.account_id, mailbox.folder, mailbox.uidvalidity, msg.uid),
                           mailbox.account_id,
                           make_envelope(mailbox.account_id, mailbox.folder, mailbox.uidvalidity, msg, now,
                                         resync=msg.uid < mailbox.resync_below, extra=prep.envelope_extra),
                           len(msg.raw), now)
                          for msg, prep in zip(messages, prepared) if msg.uid in new_uids]
                # One multi-row statement per batch, not one round trip per message.
                self._exec(cur, "INSERT INTO outbox (key, account_id, envelope, raw_size, created_at) VALUES "
                                + ", ".join(["(?, ?, ?, ?, ?)"] * len(outbox)) + " ON CONFLICT (key) DO NOTHING",
                           [value for row in outbox for value in row])
            self._exec(cur, """
                UPDATE mailboxes SET last_uid = ?, highestmodseq = COALESCE(?, highestmodseq), updated_at = ?
                WHERE account_id = ? AND folder = ? AND uidvalidity = ? AND last_uid < ?""",
                (settled_uid, highestmodseq, now, mailbox.account_id, mailbox.folder, mailbox.uidvalidity,
                 settled_uid))
        mailbox.last_uid = max(mailbox.last_uid, settled_uid)
        return inserted

    _for_update = ""
    blobs: Any = None  # blobs.S3Blobs when [blobs] kind = "s3" (set by the process that ingests)
    fence: Any = None  # leases.Fence in cluster mode (set by the process that ingests)

    def _insert_messages(self, cur: Any, rows: list[tuple]) -> set[int]:
        """Message rows (columns as in partitions._COLUMNS, then blob); the UIDs that were new."""
        return {values[3] for values in rows if self._insert_message(cur, values) > 0}

    def _insert_message(self, cur: Any, values: tuple) -> int:
        """One message row (columns as in partitions._COLUMNS, then blob); 1 if new, 0 if the key exists."""
        return self._exec(cur, f"""INSERT INTO messages ({partitions._COLUMNS}, blob)
            VALUES ({', '.join('?' * 18)}) ON CONFLICT (account_id, folder, uidvalidity, uid) DO NOTHING""",
                          values).rowcount

    def message_raw(self, key: str) -> bytes | None:
        account_id, folder, uidvalidity, uid = MessageKey.parse(key)
        with self.transaction() as cur:
            r = self._exec(cur, "SELECT raw FROM messages WHERE account_id = ? AND folder = ? AND uidvalidity = ? "
                                "AND uid = ?", (account_id, folder, uidvalidity, uid)).fetchone()
        return bytes(r[0]) if r and r[0] is not None else None

    def message_raw_or_ref(self, key: str) -> tuple[bytes | None, str | None] | None:
        """(raw bytes, S3 reference) of a stored message, either None when not there (pruned, or in
        S3); None for an unknown key. blobs.read_raw follows the reference."""
        account_id, folder, uidvalidity, uid = MessageKey.parse(key)
        with self.transaction() as cur:
            r = self._exec(cur, "SELECT raw, blob FROM messages WHERE account_id = ? AND folder = ? AND "
                                "uidvalidity = ? AND uid = ?", (account_id, folder, uidvalidity, uid)).fetchone()
        return None if r is None else (bytes(r[0]) if r[0] is not None else None, r[1] or None)

    def recent_messages(self, account_id: str | None = None, limit: int = 20) -> list[RecentMessage]:
        where, params = ("WHERE account_id = ?", (account_id,)) if account_id else ("", ())
        with self.transaction() as cur:
            rows = self._exec(cur, f"""SELECT account_id, folder, uidvalidity, uid, "from", subject, size, ingested_at
                                      FROM messages {where} ORDER BY ingested_at DESC, uid DESC LIMIT ?""",
                              (*params, limit)).fetchall()
        return [RecentMessage(message_key(r[0], r[1], r[2], r[3]), r[0], r[1], r[3], r[4], r[5], r[6], r[7])
                for r in rows]

    def counts(self) -> dict[str, int]:
        with self.transaction() as cur:
            messages = self._exec(cur, "SELECT COUNT(*) FROM messages").fetchone()[0]
            outbox = self._exec(cur, "SELECT COUNT(*) FROM outbox").fetchone()[0]
            accounts = self._exec(cur, "SELECT COUNT(*) FROM accounts").fetchone()[0]
        return {"messages": messages, "outbox": outbox, "accounts": accounts}

    # --- outbox -----------------------------------------------------------------------------
    def outbox_batch(self, limit: int, after_id: int = 0) -> list[OutboxEntry]:
        with self.transaction() as cur:
            rows = self._exec(cur, "SELECT id, key, account_id, envelope, raw_size FROM outbox WHERE id > ? "
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
                self._exec(cur, f"DELETE FROM outbox WHERE id IN ({', '.join('?' * len(chunk))})", chunk)

    def outbox_depth(self) -> int:
        with self.transaction() as cur:
            return self._exec(cur, "SELECT COUNT(*) FROM outbox").fetchone()[0]

    def outbox_summary(self) -> tuple[int, float]:
        """(rows in the outbox, age in seconds of the oldest one; 0 when empty), by the store's clock
        of ``created_at`` (Unix time written by the committing process)."""
        with self.transaction() as cur:
            depth, oldest = self._exec(cur, "SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone()
        return int(depth), max(0.0, time.time() - oldest) if oldest is not None else 0.0


class SqliteStore(Store):
    """The embedded store: one file, WAL mode, one connection per thread, writers serialised."""

    dialect = "sqlite"

    def __init__(self, path: str, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._pid = os.getpid()
        parent = Path(path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {parent}: {exc.strerror}") from None

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._pid != os.getpid():
            # A connection must never cross a fork: the child opens its own.
            self._pid = os.getpid()
            self._local = threading.local()
            try:
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                       check_same_thread=True)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from None
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from None
        cur = conn.cursor()
        try:
            yield cur
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StoreError(f"SQLite store {self.path}: commit failed: {exc}") from None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


# How long a caller waits for a pooled connection (and a new connection for its handshake). The
# scheduler and the publisher call the store from their main loops: while PostgreSQL is down they
# must get a StoreError back well within daemon.heartbeat_timeout (15 s by default), or the
# supervisor kills them as stuck and a database outage becomes a crash loop.
POOL_WAIT = 5.0


class PostgresStore(Store):
    """PostgreSQL through a psycopg_pool connection pool (opened lazily, after any fork)."""

    dialect = "postgresql"
    _for_update = " FOR UPDATE"

    def _insert_messages(self, cur: Any, rows: list[tuple]) -> set[int]:
        # messages is partitioned: uniqueness of the key lives in message_keys (partitions.py).
        return partitions.insert_messages(self, cur, rows)

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

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

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
            rows = self._exec(cur, """
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
                self._exec(cur, "DELETE FROM outbox WHERE id = ANY(?)", (list(ids),))

    def set_publish_rate(self, node: str, rate: float) -> None:
        with self.transaction() as cur:
            self._exec(cur, "UPDATE nodes SET publish_rate = ? WHERE node_id = ?", (rate, node))

    def outbox_release(self, node: str) -> None:
        with self.transaction() as cur:
            self._exec(cur, "UPDATE outbox SET claimed_by = NULL, claim_until = NULL WHERE claimed_by = ?", (node,))

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None


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
