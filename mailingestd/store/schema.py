"""The schema: every migration, in both dialects, and how a store applies them.

Each migration is (version, statements). Never edit one that has shipped: append a new version.
"""

from __future__ import annotations

import time
from typing import Any

from . import partitions
from .base import StoreBase
from .records import StoreError

# Columns whose change is an account change (state and last_error are the daemon's own bookkeeping).
_WATCHED_COLUMNS = "host, port, tls, username, auth, secret_ref, folders, priority, idle, enabled, options, secrets"

# Column types a shared script names in braces ({BLOB}), by dialect.
_TYPES = {
    "sqlite": {"BLOB": "BLOB", "SERIAL": "INTEGER PRIMARY KEY AUTOINCREMENT", "FLOAT": "REAL", "BIGINT": "INTEGER"},
    "postgresql": {"BLOB": "BYTEA", "SERIAL": "BIGSERIAL PRIMARY KEY", "FLOAT": "DOUBLE PRECISION", "BIGINT": "BIGINT"},
}
MIGRATIONS: list[tuple[int, str | dict[str, list[str]]]] = [
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
    # and the PGDG packages are): pglz made PostgreSQL's CPU the bottleneck of a backlog, for a
    # table of the same size (the measurement is in the commit that added this migration). Applies
    # to new rows; a server without lz4 keeps pglz.
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


LATEST = MIGRATIONS[-1][0]  # the schema this mailingestd migrates to


class Schema(StoreBase):
    """The migrations part of :class:`~mailingestd.store.store.Store`."""

    def migrate(self) -> int:
        """Apply every migration newer than the schema; returns the schema version."""
        with self.transaction() as cur:
            self._lock_for_migration(cur)
            self.execute(cur, "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                              "applied_at " + _TYPES[self.dialect]["FLOAT"] + " NOT NULL)")
            current = self.execute(cur, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
            latest = MIGRATIONS[-1][0]
            if current > latest:
                raise StoreError(f"store schema version {current} is newer than this mailingestd ({latest}); "
                                 "upgrade mailingestd")
            for version, sql in MIGRATIONS:
                if version > current:
                    for statement in _statements(sql, self.dialect):
                        self.execute(cur, statement)
                    self.execute(cur, "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                                 (version, time.time()))
            return latest

    def _lock_for_migration(self, cur: Any) -> None:
        """Serialise migrations between processes (SQLite: BEGIN IMMEDIATE already does)."""
