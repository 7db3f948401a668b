"""Credentials of an account: passwords and OAuth2 access tokens, resolved in the process that uses them.

Secrets come from where the account says: encrypted in the store (``AccountRow.secrets``, see
secrets.py), a file, or an environment variable. OAuth2 access tokens are obtained with the
refresh-token grant and cached with their expiry in the worker that owns the account (an account
belongs to exactly one worker slot, so no two processes refresh the same token); they are refreshed
ahead of expiry, and a token the server rejects is refreshed once and retried once by the caller.
A refresh refused with ``invalid_grant`` means a person must grant access again: the account goes
to ``reauth_required``, which is not retried until its credentials change. A refresh token the
provider rotates is saved (encrypted) so the next refresh uses it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Mapping

import msgspec

from .config import AccountConfig, ConfigError, OAuth2Config
from .secrets import Keyring, SecretError, default_key_path
from .store import Store

log = logging.getLogger(__name__)

PRESETS: dict[str, tuple[str, list[str]]] = {
    "google": ("https://oauth2.googleapis.com/token", ["https://mail.google.com/"]),
    "microsoft": ("https://login.microsoftonline.com/common/oauth2/v2.0/token",
                  ["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"]),
}
REFRESH_AHEAD = 120.0  # seconds before expiry a cached token counts as expired
HTTP_TIMEOUT = 15.0
MAX_TOKEN_REPLY = 64 * 1024


class ReauthRequired(Exception):
    """The provider refused the refresh token (invalid_grant): a person must grant access again."""


class TokenEndpointError(Exception):
    """The token endpoint could not be reached or answered nonsense (retried with backoff)."""


class AccessToken(msgspec.Struct):
    token: str
    expires_at: float  # monotonic
    expires_wall: float  # unix time, for display


def endpoint_and_scopes(oauth: OAuth2Config) -> tuple[str, list[str]]:
    """The token URL and scopes, with the provider's preset filling what is not configured."""
    preset_url, preset_scopes = PRESETS.get(oauth.provider, ("", []))
    url = oauth.token_url or preset_url
    if not url:
        raise ConfigError("oauth2.token_url is required for provider \"custom\"")
    return url, oauth.scopes or preset_scopes


def _from_source(value_env: str | None, value_file: str | None, what: str, account_id: str,
                 environ: Mapping[str, str]) -> str | None:
    if value_env:
        if value_env not in environ:
            raise ConfigError(f"account {account_id}: environment variable {value_env} ({what}) is not set")
        return environ[value_env]
    if value_file:
        try:
            return Path(value_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"account {account_id}: cannot read {what} file {value_file}: {exc.strerror}") from None
    return None


class Credentials:
    """Resolves secrets for the accounts one process serves; thread-safe."""

    def __init__(self, key_file: str = "", store: Store | None = None, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key_file = key_file
        self._keyring: Keyring | None = None
        self.store = store
        self.environ = os.environ if environ is None else environ
        self.clock = clock
        self.tokens: dict[str, AccessToken] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()
        self.refreshes = 0

    @property
    def keyring(self) -> Keyring:
        if self._keyring is None:
            self._keyring = Keyring.load(default_key_path(self.key_file))
        return self._keyring

    def stored(self, account: AccountConfig, secrets: Mapping[str, str], field: str) -> str | None:
        if field not in secrets:
            return None
        try:
            return self.keyring.decrypt(secrets[field], account.id, field)
        except SecretError as exc:
            raise ConfigError(str(exc)) from None

    def password(self, account: AccountConfig, secrets: Mapping[str, str]) -> str:
        value = self.stored(account, secrets, "password")
        if value is None:
            value = _from_source(account.password_env, account.password_file, "password", account.id, self.environ)
        if value is None:
            raise ConfigError(f"account {account.id}: no password (store, password_file or password_env)")
        return value

    def secret_for_login(self, account: AccountConfig, secrets: Mapping[str, str], force_refresh: bool = False) -> str:
        """What ``imap.connect`` sends: the password, or a valid OAuth2 access token."""
        if account.auth == "oauth2":
            return self.access_token(account, secrets, force_refresh).token
        return self.password(account, secrets)

    # --- OAuth2 -----------------------------------------------------------------------------------
    def access_token(self, account: AccountConfig, secrets: Mapping[str, str], force_refresh: bool = False,
                     valid_for: float = 0.0) -> AccessToken:
        """A cached token still valid for ``valid_for`` seconds (plus a margin), else a fresh one."""
        with self.guard:
            lock = self.locks.setdefault(account.id, threading.Lock())
        with lock:  # one refresh per account at a time, even with several threads asking
            cached = self.tokens.get(account.id)
            if (cached is not None and not force_refresh
                    and cached.expires_at - REFRESH_AHEAD - valid_for > self.clock()):
                return cached
            token = self._refresh(account, secrets)
            self.tokens[account.id] = token
            return token

    def forget(self, account_id: str) -> None:
        self.tokens.pop(account_id, None)

    def _refresh_token(self, account: AccountConfig, secrets: Mapping[str, str]) -> str:
        """The newest refresh token: one the provider rotated, unless the operator set one since."""
        rotated = self.store.rotated_refresh_token(account.id) if self.store is not None else None
        if rotated is not None and rotated[1] >= self.store.account_updated_at(account.id):
            try:
                return self.keyring.decrypt(rotated[0], account.id, "refresh_token")
            except SecretError as exc:
                raise ConfigError(str(exc)) from None
        oauth = account.oauth2 or OAuth2Config()
        value = self.stored(account, secrets, "refresh_token") or _from_source(
            oauth.refresh_token_env, oauth.refresh_token_file, "refresh token", account.id, self.environ)
        if not value:
            raise ConfigError(f"account {account.id}: no OAuth2 refresh token (store, refresh_token_file or _env)")
        return value

    def _refresh(self, account: AccountConfig, secrets: Mapping[str, str]) -> AccessToken:
        oauth = account.oauth2 or OAuth2Config()
        url, scopes = endpoint_and_scopes(oauth)
        refresh_token = self._refresh_token(account, secrets)
        client_secret = self.stored(account, secrets, "client_secret") or _from_source(
            oauth.client_secret_env, oauth.client_secret_file, "client secret", account.id, self.environ)
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": oauth.client_id}
        if client_secret:
            form["client_secret"] = client_secret
        if scopes:
            form["scope"] = " ".join(scopes)
        request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded",
                                                  "Accept": "application/json"})
        started = self.clock()
        self.refreshes += 1
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                body = response.read(MAX_TOKEN_REPLY)
        except urllib.error.HTTPError as exc:
            reply = _json(exc.read(MAX_TOKEN_REPLY))
            error = str(reply.get("error", f"HTTP {exc.code}"))
            if error == "invalid_grant":
                raise ReauthRequired(f"token endpoint refused the refresh token: invalid_grant "
                                     f"({str(reply.get('error_description', ''))[:200]})") from None
            raise TokenEndpointError(f"token endpoint {urllib.parse.urlsplit(url).netloc}: {error}") from None
        except (OSError, urllib.error.URLError) as exc:
            raise TokenEndpointError(f"token endpoint {urllib.parse.urlsplit(url).netloc} unreachable: "
                                     f"{getattr(exc, 'reason', exc)}") from None
        reply = _json(body)
        access = reply.get("access_token")
        if not isinstance(access, str) or not access:
            raise TokenEndpointError("token endpoint answered without an access_token")
        expires_in = float(reply.get("expires_in", 3600) or 3600)
        rotated = reply.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != refresh_token and self.store is not None:
            self.store.save_rotated_refresh_token(account.id, self.keyring.encrypt(rotated, account.id,
                                                                                   "refresh_token"))
        log.info("event=oauth2_token_refreshed account=%s expires_in=%.0fs", account.id, expires_in)
        return AccessToken(token=access, expires_at=started + expires_in, expires_wall=time.time() + expires_in)


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
