"""Accounts in the store: their settings, encrypted secrets, rotated OAuth2 refresh tokens and the
daemon's state of each (``auth_failed``, ``reauth_required``); rows read by column name."""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple, Sequence

import msgspec

from ..config import AccountConfig, OAuth2Config
from .base import StoreBase


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


class Accounts(StoreBase):
    """The accounts part of :class:`~mailingestd.store.store.Store`."""

    def upsert_account(self, account: AccountConfig, source: str = "store",
                       secrets: dict[str, str] | None = None) -> bool:
        """Insert or update one account; returns True when anything changed.

        ``secrets`` are ciphertexts by field (password, client_secret, refresh_token); None keeps
        what the row has.
        """
        with self.transaction() as cur:
            old = self.execute(cur, f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account.id,)).fetchone()
            return self._write_accounts(cur, [(account, secrets, _AccountColumns(*old) if old else None)], source) > 0

    def upsert_accounts(self, accounts: Sequence[AccountConfig], source: str = "store") -> int:
        """:meth:`upsert_account` for many accounts (keeping their secrets): one read, and the
        changed rows written in multi-row statements, in one transaction (a large ``[[accounts]]``
        list at start is not one transaction per account); an unchanged file costs one SELECT.
        Returns how many changed."""
        with self.transaction() as cur:
            existing = {r[0]: _AccountColumns(*r)
                        for r in self.execute(cur, f"SELECT {_ACCOUNT_COLUMNS} FROM accounts").fetchall()}
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
        # statement; thousands of single-row statements updating one revisions row in one
        # transaction are slow on PostgreSQL (each update walks the row's growing version chain).
        rows = list(changed.values())
        for start in range(0, len(rows), ACCOUNTS_PER_STATEMENT):
            chunk = rows[start:start + ACCOUNTS_PER_STATEMENT]
            self.execute(cur, f"""
                INSERT INTO accounts ({_ACCOUNT_COLUMNS}, created_at, updated_at) VALUES """
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'new', NULL, ?, ?)"] * len(chunk)) + """
                ON CONFLICT (id) DO UPDATE SET host = excluded.host, port = excluded.port, tls = excluded.tls,
                    username = excluded.username, auth = excluded.auth, secret_ref = excluded.secret_ref,
                    folders = excluded.folders, priority = excluded.priority, idle = excluded.idle,
                    enabled = excluded.enabled, options = excluded.options, source = excluded.source,
                    secrets = excluded.secrets, updated_at = excluded.updated_at""",
                [value for row in chunk for value in row])
        if reset:
            self.executemany(cur, "UPDATE accounts SET state = 'new', last_error = NULL WHERE id = ?", reset)
        return len(rows)

    def list_accounts(self) -> list[AccountRow]:
        with self.transaction() as cur:
            rows = self.execute(cur, f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY id").fetchall()
        return [_row(r) for r in rows]

    def get_account(self, account_id: str) -> AccountRow | None:
        with self.transaction() as cur:
            r = self.execute(cur, f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return _row(r) if r else None

    def delete_account(self, account_id: str) -> bool:
        """Remove the account; its stored messages and its folders' checkpoints stay.

        A checkpoint is one small row per folder, and it is what keeps the account's old mail old:
        added again after store.metadata_retention pruned its rows, the account would otherwise
        store and announce every such message again as new. ``resync_account`` starts over on purpose.
        """
        with self.transaction() as cur:
            deleted = self.execute(cur, "DELETE FROM accounts WHERE id = ?", (account_id,)).rowcount
            self.execute(cur, "DELETE FROM oauth_tokens WHERE account_id = ?", (account_id,))
        return deleted > 0

    def resync_account(self, account_id: str) -> int:
        """Every folder of the account starts over at UID 1 under its UIDVALIDITY: keys still stored
        stay as they are; messages no longer in the store are stored and announced again, marked
        ``"resync": true`` (up to the old checkpoint). Returns how many folders start over."""
        with self.transaction() as cur:
            return self.execute(cur, """
                UPDATE mailboxes SET resync_below = CASE WHEN resync_below > last_uid + 1 THEN resync_below
                                                         ELSE last_uid + 1 END,
                                     last_uid = 0, highestmodseq = NULL, updated_at = ?
                WHERE account_id = ?""", (time.time(), account_id)).rowcount

    def set_enabled(self, account_id: str, enabled: bool) -> bool:
        with self.transaction() as cur:
            return self.execute(cur, "UPDATE accounts SET enabled = ?, state = 'new', last_error = NULL, "
                                   "updated_at = ? WHERE id = ?",
                              (int(enabled), time.time(), account_id)).rowcount > 0

    def set_account_state(self, account_id: str, state: str, last_error: str | None = None,
                          credentials: str | None = None) -> None:
        """The daemon's state of an account; ``credentials``: the version it was reached with."""
        with self.transaction() as cur:
            self.execute(cur, "UPDATE accounts SET state = ?, last_error = ?, state_credentials = ? WHERE id = ?",
                       (state, last_error, credentials, account_id))

    def parked_accounts(self) -> dict[str, tuple[str, str | None]]:
        """Accounts in ``auth_failed`` or ``reauth_required``: id -> (state, credentials version)."""
        with self.transaction() as cur:
            rows = self.execute(cur, "SELECT id, state, state_credentials FROM accounts "
                                   "WHERE state IN ('auth_failed', 'reauth_required')").fetchall()
        return {account_id: (state, credentials) for account_id, state, credentials in rows}

    def accounts_version(self) -> str:
        """Changes whenever any account's settings change, by any writer (triggers bump it)."""
        with self.transaction() as cur:
            (revision,) = self.execute(cur, "SELECT revision FROM revisions WHERE name = 'accounts'").fetchone()
        return str(revision)

    def set_secrets(self, account_id: str, secrets: dict[str, str], new_credentials: bool = True) -> bool:
        """Replace an account's encrypted secrets. A key rotation (``new_credentials`` False) keeps
        updated_at, so a refresh token the provider rotated since stays the newer one."""
        with self.transaction() as cur:
            if new_credentials:
                return self.execute(cur, "UPDATE accounts SET secrets = ?, updated_at = ? WHERE id = ?",
                                  (json.dumps(secrets, sort_keys=True), time.time(), account_id)).rowcount > 0
            return self.execute(cur, "UPDATE accounts SET secrets = ? WHERE id = ?",
                              (json.dumps(secrets, sort_keys=True), account_id)).rowcount > 0

    def rotated_refresh_token(self, account_id: str) -> tuple[str, float] | None:
        """A refresh token the provider rotated (ciphertext, when), kept apart from the account's
        settings so that saving it is not an account change."""
        with self.transaction() as cur:
            r = self.execute(cur, "SELECT refresh_token, updated_at FROM oauth_tokens WHERE account_id = ?",
                           (account_id,)).fetchone()
        return (r[0], r[1]) if r else None

    def save_rotated_refresh_token(self, account_id: str, ciphertext: str) -> None:
        with self.transaction() as cur:
            self.execute(cur, """INSERT INTO oauth_tokens (account_id, refresh_token, updated_at) VALUES (?, ?, ?)
                               ON CONFLICT (account_id) DO UPDATE SET refresh_token = excluded.refresh_token,
                               updated_at = excluded.updated_at""", (account_id, ciphertext, time.time()))

    def account_updated_at(self, account_id: str) -> float:
        with self.transaction() as cur:
            r = self.execute(cur, "SELECT updated_at FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return float(r[0]) if r else 0.0

