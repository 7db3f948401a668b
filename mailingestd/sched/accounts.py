"""What the scheduler derives from an account's row: the worker slot that owns it, and a version
of its credentials (a change lifts ``auth_failed``)."""

from __future__ import annotations

import hashlib
import os

import msgspec

from ..config import AccountConfig


def owner_slot(account_id: str, workers: int) -> int:
    """Rendezvous (highest random weight) hashing: stable per account, minimal moves on resize."""
    def weight(slot: int) -> bytes:
        return hashlib.blake2b(f"{slot}\0{account_id}".encode(), digest_size=8).digest()

    return max(range(workers), key=weight)


def credentials_version(account: AccountConfig, secrets: dict[str, str] | None = None) -> str:
    """Changes when anything about the credentials changes: settings, stored secrets, the file's mtime."""
    mtime = 0.0
    if account.password_file:
        try:
            mtime = os.stat(account.password_file).st_mtime
        except OSError:
            pass
    parts = (account.host, account.username, account.auth, account.password_file, account.password_env,
             msgspec.json.encode(account.oauth2).decode() if account.oauth2 else "", str(mtime),
             msgspec.json.encode(secrets or {}).decode())
    return hashlib.blake2b("\0".join(p or "" for p in parts).encode(), digest_size=8).hexdigest()
