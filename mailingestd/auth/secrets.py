"""Secrets at rest: passwords, OAuth2 client secrets and refresh tokens, encrypted in the store.

Cipher: AES-256-GCM from pyca/cryptography (``cryptography.hazmat.primitives.ciphers.aead``):
the most widely deployed and audited Python crypto library, with an authenticated cipher (a
tampered or misplaced ciphertext fails to decrypt instead of yielding garbage). Nothing here is a
hand-written primitive: only the envelope format is ours.

Envelope: ``v2:<key id>:<base64(nonce || ciphertext+tag)>``. The associated data binds each
ciphertext to its account id, its field name and where it may be sent (:class:`Destination`:
host, port, TLS mode, certificate verification, username and, for OAuth2, the token URL). Those
are plain columns of the store, which other software may write (plain SQL, a compromised
backend): a row changed to point at another server makes the secret fail to decrypt instead of
being sent there (docs/security.md). ``mailingestctl account add`` encrypts afresh whenever it
changes any of them.

``v1`` envelopes (written before binding: account id and field only) are not used: the daemon refuses them
with an error naming ``mailingestctl secrets rotate``, which re-binds them to the row's current
destination after showing it (:meth:`Keyring.decrypt_unbound` exists for that only).

The key file (``secrets.key_file``; under systemd ``LoadCredential=mailingestd.key:...`` puts it in
``$CREDENTIALS_DIRECTORY``) holds one key per line, ``<id>:<base64 of 32 bytes>``; the first line
encrypts, every line decrypts. Rotation: put a new key on the first line (``mailingestctl secrets
genkey``), run ``mailingestctl secrets rotate`` (re-encrypts every secret under it), then drop the
old line.
"""

from __future__ import annotations

import base64
import os
import secrets as pysecrets
import stat
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..config import ConfigError

PREFIX = "v2"
UNBOUND_PREFIX = "v1"
NONCE_BYTES = 12
CREDENTIAL_NAME = "mailingestd.key"


class SecretError(Exception):
    """A secret cannot be decrypted (wrong or missing key, tampered or misplaced ciphertext)."""


class SecretBindingError(SecretError):
    """A secret is not bound to the destination the account's row names now (or predates binding)."""


class Destination(msgspec.Struct, frozen=True, array_like=True):
    """Where a secret may be sent; part of every ciphertext's associated data."""

    host: str
    port: int
    tls: str
    tls_verify: bool
    username: str
    token_url: str = ""  # OAuth2 only: where the refresh token and client secret are POSTed

    def associated_data(self, account_id: str, field: str) -> bytes:
        # JSON array: unambiguous whatever the strings hold (no separator to smuggle).
        return msgspec.json.encode(["mailingestd-secret", PREFIX, account_id, field, self.host.lower(), self.port,
                                    self.tls, self.tls_verify, self.username, self.token_url])

    def describe(self) -> str:
        where = f"{self.username}@{self.host}:{self.port} tls={self.tls}" + ("" if self.tls_verify else " tls_verify=false")
        return where + (f" token_url={self.token_url}" if self.token_url else "")


def generate_key_line() -> str:
    return f"{pysecrets.token_hex(4)}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


def default_key_path(configured: str) -> str:
    """The configured path, else the systemd credential, else /etc/mailingestd/secrets.key."""
    if configured:
        return configured
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL_NAME).exists():
        return str(Path(credentials) / CREDENTIAL_NAME)
    return "/etc/mailingestd/secrets.key"


class Keyring:
    def __init__(self, keys: list[tuple[str, bytes]], path: str = "") -> None:
        if not keys:
            raise ConfigError(f"secrets.key_file: {path or 'the key file'} holds no key")
        self.keys = keys
        self.by_id = dict(keys)
        self.path = path

    @classmethod
    def load(cls, path: str) -> Keyring:
        try:
            with open(path, "rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    # Whoever reads the key reads every secret in the store.
                    raise ConfigError(f"secrets.key_file: {path} is readable or writable by group or others "
                                      f"(mode {stat.S_IMODE(mode):04o}); chmod 0600 it")
                text = handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            raise ConfigError(f"secrets.key_file: {path}: no such file (create one with "
                              f"`(umask 077; mailingestctl secrets genkey > {path})`)") from None
        except OSError as exc:
            raise ConfigError(f"secrets.key_file: {path}: {exc.strerror}") from None
        keys = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key_id, _, encoded = line.partition(":")
            try:
                key = base64.b64decode(encoded, validate=True)
            except ValueError:
                key = b""
            if not key_id or len(key) != 32:
                raise ConfigError(f"secrets.key_file: {path} line {number}: expected <id>:<base64 of 32 bytes>")
            keys.append((key_id, key))
        return cls(keys, path)

    @property
    def current_id(self) -> str:
        return self.keys[0][0]

    def encrypt(self, plaintext: str, account_id: str, field: str, destination: Destination) -> str:
        key_id, key = self.keys[0]
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), destination.associated_data(account_id, field))
        return f"{PREFIX}:{key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, envelope: str, account_id: str, field: str, destination: Destination) -> str:
        """The plaintext, only if ``envelope`` was sealed for this account, field and destination."""
        prefix, key, raw = self._open(envelope, account_id, field)
        if prefix == UNBOUND_PREFIX:
            raise SecretBindingError(f"account {account_id}: {field} was stored before secrets were bound to their "
                                     "server; check the account and run `mailingestctl secrets rotate` (or "
                                     "`mailingestctl account add` again) to bind it")
        try:
            return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:],
                                       destination.associated_data(account_id, field)).decode()
        except InvalidTag:
            raise SecretBindingError(
                f"account {account_id}: {field} is not bound to {destination.describe()}: the account's "
                "server, port, tls, tls_verify, username or token_url changed outside mailingestctl (or the "
                "ciphertext was altered or copied from another account); refusing to send it "
                "(`mailingestctl account add` with the secret binds it again)") from None

    def decrypt_unbound(self, envelope: str, account_id: str, field: str) -> str:
        """A ``v1`` secret (account id and field only): for re-binding by an operator, never for use."""
        prefix, key, raw = self._open(envelope, account_id, field)
        if prefix != UNBOUND_PREFIX:
            raise SecretError(f"account {account_id}: {field} is not a v1 secret")
        try:
            return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], f"{account_id}\0{field}".encode()).decode()
        except InvalidTag:
            raise SecretError(f"account {account_id}: {field} does not decrypt (altered, or copied from another "
                              "account)") from None

    def _open(self, envelope: str, account_id: str, field: str) -> tuple[str, bytes, bytes]:
        try:
            prefix, key_id, encoded = envelope.split(":", 2)
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise SecretError(f"account {account_id}: {field} is not an encrypted secret") from None
        key = self.by_id.get(key_id)
        if prefix not in (PREFIX, UNBOUND_PREFIX) or key is None:
            raise SecretError(f"account {account_id}: {field} is encrypted under key {key_id!r}, which is not in "
                              f"{self.path or 'the key file'}")
        return prefix, key, raw

    def is_current(self, envelope: str) -> bool:
        """Sealed under the first key with the current envelope (nothing for rotate to do)."""
        return envelope.startswith(f"{PREFIX}:{self.current_id}:")

    def key_of(self, envelope: str) -> str:
        parts = envelope.split(":", 2)
        return parts[1] if len(parts) == 3 else ""
