"""Secrets at rest: passwords, OAuth2 client secrets and refresh tokens, encrypted in the store.

Cipher: AES-256-GCM from pyca/cryptography (``cryptography.hazmat.primitives.ciphers.aead``):
the most widely deployed and audited Python crypto library, with an authenticated cipher (a
tampered or misplaced ciphertext fails to decrypt instead of yielding garbage). Nothing here is a
hand-written primitive: only the envelope format is ours.

Envelope: ``v1:<key id>:<base64(nonce || ciphertext+tag)>``. The associated data binds each
ciphertext to its account id and field name, so a ciphertext copied onto another account (or into
another field) does not decrypt.

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
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .config import ConfigError

PREFIX = "v1"
NONCE_BYTES = 12
CREDENTIAL_NAME = "mailingestd.key"


class SecretError(Exception):
    """A secret cannot be decrypted (wrong or missing key, tampered or misplaced ciphertext)."""


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
    def load(cls, path: str) -> "Keyring":
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"secrets.key_file: {path}: no such file (create one with "
                              f"`mailingestctl secrets genkey > {path}`)") from None
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

    def encrypt(self, plaintext: str, account_id: str, field: str) -> str:
        key_id, key = self.keys[0]
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), f"{account_id}\0{field}".encode())
        return f"{PREFIX}:{key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, envelope: str, account_id: str, field: str) -> str:
        try:
            prefix, key_id, encoded = envelope.split(":", 2)
        except ValueError:
            raise SecretError(f"account {account_id}: {field} is not an encrypted secret") from None
        key = self.by_id.get(key_id)
        if prefix != PREFIX or key is None:
            raise SecretError(f"account {account_id}: {field} is encrypted under key {key_id!r}, which is not in "
                              f"{self.path or 'the key file'}")
        raw = base64.b64decode(encoded)
        try:
            return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:],
                                       f"{account_id}\0{field}".encode()).decode()
        except InvalidTag:
            raise SecretError(f"account {account_id}: {field} does not decrypt with key {key_id!r} "
                              "(wrong key, or a ciphertext that was altered or copied from another account)") from None

    def key_of(self, envelope: str) -> str:
        parts = envelope.split(":", 2)
        return parts[1] if len(parts) == 3 else ""
