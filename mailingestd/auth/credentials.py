"""Credentials of an account: passwords and OAuth2 access tokens, resolved in the process that uses them.

Secrets come from where the account says: encrypted in the store (``AccountRow.secrets``, see
secrets.py), a file, or an environment variable. OAuth2 access tokens are obtained with the
refresh-token grant and cached with their expiry in the worker that owns the account (an account
belongs to exactly one worker slot, so no two processes refresh the same token); they are refreshed
ahead of expiry, and a token the server rejects is refreshed once and retried once by the caller.
A refresh refused with ``invalid_grant`` means a person must grant access again: the account goes
to ``reauth_required``, which is not retried until its credentials change. A refresh token the
provider rotates is saved (encrypted) so the next refresh uses it.

The store's rows are not trusted to say where a secret goes (docs/security.md). A secret kept in
the store is bound to its destination (secrets.py); a file or environment variable named by a
row is read only from the places the root-owned configuration allows (:class:`SecretPolicy`);
a password goes over a plaintext connection only to loopback or to an account the configuration
file marks ``allow_plaintext``; an OAuth2 token endpoint must be https (loopback excepted).
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from .. import config as config_mod
from ..config import AccountConfig, Config, ConfigError, OAuth2Config
from .secrets import Destination, Keyring, SecretError, default_key_path
from ..store.store import Store

log = logging.getLogger(__name__)

PRESETS: dict[str, tuple[str, list[str]]] = {
    "google": ("https://oauth2.googleapis.com/token", ["https://mail.google.com/"]),
    "microsoft": ("https://login.microsoftonline.com/common/oauth2/v2.0/token",
                  ["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"]),
}
REFRESH_AHEAD = 120.0  # seconds before expiry a cached token counts as expired
HTTP_TIMEOUT = 15.0
MAX_TOKEN_REPLY = 64 * 1024


class CredentialRefused(ConfigError):
    """A secret this account may not use as its row stands: bound elsewhere, read from a place the
    configuration does not allow, or about to cross the network in clear. Fails the login like
    wrong credentials (error kind ``auth``), with the reason as the account's error."""


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


def destination_of(account: AccountConfig) -> Destination:
    """Where the account's secrets go: the associated data they are sealed with (secrets.py)."""
    token_url = endpoint_and_scopes(account.oauth2)[0] if account.auth == "oauth2" and account.oauth2 else ""
    return Destination(host=account.host, port=account.effective_port, tls=account.tls,
                       tls_verify=account.tls_verify, username=account.username, token_url=token_url)


def is_loopback(host: str) -> bool:
    """A loopback address literal or ``localhost``; names are not resolved (a name may move)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


SECRETS_DIR = "/etc/mailingestd/secrets"


def _sources(account: AccountConfig) -> tuple[str | None, ...]:
    """Where the account's secrets are read from, as a store row keeps them (one secret_ref: the
    variable when both a variable and a file are configured, as the password is read)."""
    oauth = account.oauth2 or OAuth2Config()
    return (None if account.password_env else account.password_file, account.password_env,
            oauth.client_secret_file, oauth.client_secret_env, oauth.refresh_token_file, oauth.refresh_token_env)


class ConfiguredAccount(msgspec.Struct, frozen=True):
    """An ``[[accounts]]`` table of the configuration file: where its secrets may go and come from."""

    destination: Destination
    sources: tuple[str | None, ...]


class SecretPolicy(msgspec.Struct, frozen=True):
    """What the root-owned configuration allows, never what a store row claims.

    ``dirs``: files under these directories may be read as secrets (``secrets.allowed_dirs``,
    default /etc/mailingestd/secrets, plus ``$CREDENTIALS_DIRECTORY``); ``files`` and ``env``:
    the files and environment variables the configuration file's ``[[accounts]]`` name, plus
    ``secrets.allowed_env``; ``plaintext``: ids of the file's accounts with ``allow_plaintext``;
    ``configured``: the file's accounts, whose rows must still say what the file says (a file
    or variable secret is not sealed, so this is what binds it to its server).
    """

    dirs: tuple[str, ...] = ()
    files: frozenset[str] = frozenset()
    env: frozenset[str] = frozenset()
    plaintext: frozenset[str] = frozenset()
    configured: dict[str, tuple[ConfiguredAccount, ...]] = {}

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None) -> SecretPolicy:
        environ = os.environ if environ is None else environ
        dirs = [d for d in config.secrets.allowed_dirs if d]
        if environ.get("CREDENTIALS_DIRECTORY"):
            dirs.append(environ["CREDENTIALS_DIRECTORY"])
        files: set[str] = set()
        names: set[str] = set(config.secrets.allowed_env)
        for account in config.accounts:
            oauth = account.oauth2 or OAuth2Config()
            files.update(f for f in (account.password_file, oauth.client_secret_file, oauth.refresh_token_file) if f)
            names.update(n for n in (account.password_env, oauth.client_secret_env, oauth.refresh_token_env) if n)
        return cls(dirs=tuple(os.path.realpath(d) for d in dirs), files=frozenset(files), env=frozenset(names),
                   plaintext=frozenset(a.id for a in config.accounts if a.allow_plaintext),
                   configured={a.id: (ConfiguredAccount(destination_of(a), _sources(a)),) for a in config.accounts})

    def merged(self, other: SecretPolicy) -> SecretPolicy:
        """What either allows: the configuration a process was started with, and the file as it
        is now (edited, and maybe not reloaded yet): both were written by root."""
        configured = dict(self.configured)
        for account_id, alternatives in other.configured.items():
            configured[account_id] = tuple(dict.fromkeys(configured.get(account_id, ()) + alternatives))
        return SecretPolicy(dirs=tuple(dict.fromkeys(self.dirs + other.dirs)), files=self.files | other.files,
                            env=self.env | other.env, plaintext=self.plaintext | other.plaintext,
                            configured=configured)

    def file_allowed(self, path: str) -> bool:
        if path in self.files:
            return True
        real = os.path.realpath(path)  # no escape by "..", nor by a symlink inside an allowed directory
        return any(real.startswith(d.rstrip("/") + "/") for d in self.dirs)

    def row_problem(self, account: AccountConfig) -> str | None:
        """Why the store's row of an account of the configuration file may not be used, or None."""
        alternatives = self.configured.get(account.id)
        if not alternatives:
            return None
        destination, sources = destination_of(account), _sources(account)
        if any(c.destination == destination and c.sources == sources for c in alternatives):
            return None
        if all(c.destination != destination for c in alternatives):
            return (f"its row in the store names {destination.describe()}, the configuration file "
                    f"{alternatives[-1].destination.describe()}")
        return "its row in the store names other secret files or variables than the configuration file"


class _InstalledPolicy(msgspec.Struct):
    path: str
    stamp: tuple[int, int, int] | None
    started: SecretPolicy  # from the configuration the process was forked with
    policy: SecretPolicy  # that, merged with the file as last read


# Lines for `mailingestctl status` (the child's recent errors, see child.Child.heartbeat): an
# account that sends credentials in clear over the network or without verifying the certificate.
_notices: collections.deque[str] = collections.deque(maxlen=64)


def take_notices() -> list[str]:
    lines = []
    while _notices:
        lines.append(_notices.popleft())
    return lines


_installed: _InstalledPolicy | None = None
_install_lock = threading.Lock()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def install_policy(config: Config) -> SecretPolicy:
    """Make ``config``'s policy this process's (and its future children's): the supervisor calls
    it at start and on every reload, before it forks."""
    global _installed
    policy = SecretPolicy.from_config(config)
    with _install_lock:
        _installed = _InstalledPolicy(config.path, _stamp(config.path) if config.path else None, policy, policy)
    return policy


def current_policy() -> SecretPolicy:
    """The installed policy, merged with the configuration file as it is now when it changed since
    (a worker is not forked again on reload, and the file may be edited before the reload moves
    the rows: either version is root's). A file that does not load adds nothing."""
    global _installed
    installed = _installed
    if installed is None:
        return SecretPolicy.from_config(Config())
    stamp = _stamp(installed.path) if installed.path else None
    if stamp == installed.stamp:
        return installed.policy
    with _install_lock:
        if _installed is installed:
            try:
                policy = installed.started.merged(SecretPolicy.from_config(config_mod.load(installed.path)))
            except ConfigError as exc:
                policy = installed.started
                log.warning("event=secret_policy_unchanged reason=config_invalid error=%s", exc)
            _installed = _InstalledPolicy(installed.path, stamp, installed.started, policy)
        return _installed.policy


def _from_source(value_env: str | None, value_file: str | None, what: str, account_id: str,
                 environ: Mapping[str, str], policy: SecretPolicy) -> str | None:
    if value_env:
        if value_env not in policy.env:
            raise CredentialRefused(f"account {account_id}: environment variable {value_env} ({what}) is not named "
                                    "in the configuration file (an account's [[accounts]] table or "
                                    "secrets.allowed_env); refusing to read it")
        if value_env not in environ:
            raise ConfigError(f"account {account_id}: environment variable {value_env} ({what}) is not set")
        return environ[value_env]
    if value_file:
        if not policy.file_allowed(value_file):
            raise CredentialRefused(f"account {account_id}: {what} file {value_file} is outside the directories "
                                    f"secrets may be read from ({', '.join(policy.dirs) or 'none'}; "
                                    "secrets.allowed_dirs); refusing to read it")
        try:
            return Path(value_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"account {account_id}: cannot read {what} file {value_file}: {exc.strerror}") from None
    return None


class Credentials:
    """Resolves secrets for the accounts one process serves; thread-safe."""

    def __init__(self, key_file: str = "", store: Store | None = None, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, policy: SecretPolicy | None = None) -> None:
        self.key_file = key_file
        self._keyring: Keyring | None = None
        self._key_stamp: tuple[int, int, int] | None = None
        self._policy = policy
        self.warned: set[tuple[str, str]] = set()
        self.store = store
        self.environ = os.environ if environ is None else environ
        self.clock = clock
        self.tokens: dict[str, AccessToken] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()
        self.refreshes = 0

    @property
    def policy(self) -> SecretPolicy:
        return self._policy if self._policy is not None else current_policy()

    @property
    def keyring(self) -> Keyring:
        """The key file's keys, loaded again whenever the file changes: after `mailingestctl
        secrets rotate` a long-running worker must encrypt rotated refresh tokens under the new
        first key, or dropping the old line would destroy them."""
        path = default_key_path(self.key_file)
        try:
            st = os.stat(path)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self.guard:
            if self._keyring is None or (stamp is not None and stamp != self._key_stamp):
                self._keyring = Keyring.load(path)
                self._key_stamp = stamp
            return self._keyring

    def stored(self, account: AccountConfig, secrets: Mapping[str, str], field: str) -> str | None:
        if field not in secrets:
            return None
        try:
            return self.keyring.decrypt(secrets[field], account.id, field, destination_of(account))
        except SecretError as exc:
            raise CredentialRefused(str(exc)) from None

    def check_account(self, account: AccountConfig) -> None:
        """Refuse an account of the configuration file whose row now says otherwise; refuse to send
        a password in clear except to loopback or where the file allows it; log plaintext over the
        network and unverified TLS once per account."""
        problem = self.policy.row_problem(account)
        if problem:
            raise CredentialRefused(f"account {account.id}: {problem} (changed outside the file?); refusing to "
                                    "use its secret")
        if account.tls == "none":
            if is_loopback(account.host):
                return
            if account.id not in self.policy.plaintext:
                raise CredentialRefused(f"account {account.id}: tls = \"none\" would send its credentials in clear "
                                        f"to {account.host}; allowed only to loopback unless the configuration file "
                                        "sets allow_plaintext = true for this account")
            self._warn(account, "tls=none")
        elif not account.tls_verify:
            self._warn(account, "tls_verify=false")

    def _warn(self, account: AccountConfig, what: str) -> None:
        if (account.id, what) not in self.warned:
            self.warned.add((account.id, what))
            log.warning("event=insecure_transport account=%s server=%s:%d %s", account.id, account.host,
                        account.effective_port, what)
            _notices.append(f"account={account.id} server={account.host}:{account.effective_port} "
                            f"event=insecure_transport {what}")

    def password(self, account: AccountConfig, secrets: Mapping[str, str]) -> str:
        self.check_account(account)
        value = self.stored(account, secrets, "password")
        if value is None:
            value = _from_source(account.password_env, account.password_file, "password", account.id, self.environ,
                                 self.policy)
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
        self.check_account(account)
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
                return self.keyring.decrypt(rotated[0], account.id, "refresh_token", destination_of(account))
            except SecretError as exc:
                raise CredentialRefused(str(exc)) from None
        oauth = account.oauth2 or OAuth2Config()
        value = self.stored(account, secrets, "refresh_token") or _from_source(
            oauth.refresh_token_env, oauth.refresh_token_file, "refresh token", account.id, self.environ, self.policy)
        if not value:
            raise ConfigError(f"account {account.id}: no OAuth2 refresh token (store, refresh_token_file or _env)")
        return value

    def _refresh(self, account: AccountConfig, secrets: Mapping[str, str]) -> AccessToken:
        oauth = account.oauth2 or OAuth2Config()
        url, scopes = endpoint_and_scopes(oauth)
        check_token_url(account.id, url)
        refresh_token = self._refresh_token(account, secrets)
        client_secret = self.stored(account, secrets, "client_secret") or _from_source(
            oauth.client_secret_env, oauth.client_secret_file, "client secret", account.id, self.environ, self.policy)
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
            self.store.save_rotated_refresh_token(account.id, self.keyring.encrypt(
                rotated, account.id, "refresh_token", destination_of(account)))
        log.info("event=oauth2_token_refreshed account=%s expires_in=%.0fs", account.id, expires_in)
        return AccessToken(token=access, expires_at=started + expires_in, expires_wall=time.time() + expires_in)


def check_token_url(account_id: str, url: str) -> None:
    """The refresh token and client secret go only to an https endpoint (or one on loopback)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or "")):
        return
    raise CredentialRefused(f"account {account_id}: OAuth2 token_url {url} is not https (only loopback may use "
                            "http); refusing to send the refresh token there")


def rebind_secrets(store: Store, ring: Keyring, report: Callable[[str], None]) -> int:
    """``mailingestctl secrets rotate``: seal every stored secret under the first key, bound to the
    destination its row names now. Secrets sealed before binding (v1) are bound here, and
    ``report`` is told where each goes, so the operator sees it. Returns how many accounts changed.
    """
    changed = 0
    for row in store.list_accounts():
        account, destination = row.account, destination_of(row.account)
        unbound = [f for f, c in row.secrets.items() if c.startswith("v1:")]
        if row.secrets and not all(ring.is_current(c) for c in row.secrets.values()):
            plain = {f: (ring.decrypt_unbound(c, account.id, f) if f in unbound
                         else ring.decrypt(c, account.id, f, destination)) for f, c in row.secrets.items()}
            store.set_secrets(account.id, {f: ring.encrypt(v, account.id, f, destination) for f, v in plain.items()},
                              new_credentials=False)
            changed += 1
        token = store.rotated_refresh_token(account.id)
        if token is not None and not ring.is_current(token[0]):
            if token[0].startswith("v1:"):
                unbound.append("rotated refresh_token")
                value = ring.decrypt_unbound(token[0], account.id, "refresh_token")
            else:
                value = ring.decrypt(token[0], account.id, "refresh_token", destination)
            store.save_rotated_refresh_token(account.id, ring.encrypt(value, account.id, "refresh_token", destination))
            changed += 1
        if unbound:
            report(f"account {account.id}: {', '.join(unbound)} now bound to {destination.describe()}")
    return changed


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
