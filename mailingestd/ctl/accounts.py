"""mailingestctl account ...: the accounts kept in the store (add, list, show, remove, resync,
enable, disable), a one-off login (test) and the OAuth2 authorization of an account (authorize)."""

from __future__ import annotations

import datetime
import json
import secrets as secrets_module
import sys
import time
from typing import Any, NoReturn

import click
import msgspec

from .. import config as config_mod
from ..config import AccountConfig, OAuth2Config
from ..logs import printable
from ..sysexits import EX_CONFIG, EX_UNAVAILABLE, EX_USAGE
from .common import cli, coloured_state, fail, keyring_of, load_config, store_of


@cli.group()
def account() -> None:
    """Manage the accounts kept in the store."""


@account.command("add")
@click.argument("account_id")
@click.option("--host", required=True, help="IMAP server host name.")
@click.option("--port", type=int, default=None, help="Port (default 993 for implicit TLS, else 143).")
@click.option("--tls", type=click.Choice(["implicit", "starttls", "none"]), default="implicit", show_default=True)
@click.option("--tls-ca-file", default=None, help="Extra CA bundle to trust for this server.")
@click.option("--username", required=True)
@click.option("--password-file", default=None, help="File holding the password (read by the daemon at each login).")
@click.option("--password-env", default=None, help="Environment variable holding the password.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input and keep it "
              "encrypted in the store (needs secrets.key_file).")
@click.option("--oauth2-provider", type=click.Choice(["google", "microsoft", "custom"]), default=None,
              help="Use OAuth2 (XOAUTH2/OAUTHBEARER) with this provider's endpoint and scopes.")
@click.option("--oauth2-token-url", default="", help="Token endpoint (provider custom, or to override a preset).")
@click.option("--oauth2-client-id", default="", help="OAuth2 client id.")
@click.option("--oauth2-scope", "oauth2_scopes", multiple=True, help="Scope (repeatable; default: the preset's).")
@click.option("--oauth2-secrets-stdin", is_flag=True, help="Read two lines from standard input, the client secret "
              "and the refresh token, and keep them encrypted in the store.")
@click.option("--folder", "folders", multiple=True, help="Folder to ingest (repeatable; default INBOX).")
@click.option("--priority", type=click.Choice(["auto", "high", "medium", "low"]), default="auto", show_default=True)
@click.option("--no-idle", is_flag=True, help="Never use IDLE; poll instead.")
@click.option("--disabled", is_flag=True, help="Add the account disabled.")
@click.option("--replace", is_flag=True, help="Replace an account of the same id (its settings and secrets).")
@click.pass_context
def account_add(ctx: click.Context, account_id: str, host: str, port: int | None, tls: str, tls_ca_file: str | None,
                username: str, password_file: str | None, password_env: str | None, password_stdin: bool,
                oauth2_provider: str | None, oauth2_token_url: str, oauth2_client_id: str,
                oauth2_scopes: tuple[str, ...], oauth2_secrets_stdin: bool, folders: tuple[str, ...],
                priority: str, no_idle: bool, disabled: bool, replace: bool) -> None:
    """Add an account to the store (--replace: or replace one). Secrets given on standard input are encrypted."""
    id_problem = config_mod.account_id_problem(account_id)
    if id_problem:
        raise click.UsageError(f"account {account_id!r}: {id_problem}")
    if not replace and store_of(ctx).get_account(account_id) is not None:
        fail(1, f"account {account_id} exists already (--replace replaces it)")
    oauth = None
    plain: dict[str, str] = {}
    if oauth2_provider:
        if password_file or password_env or password_stdin:
            raise click.UsageError("an OAuth2 account takes no password")
        if oauth2_secrets_stdin:
            lines = sys.stdin.read().splitlines()
            if len(lines) < 2 or not lines[1].strip():
                raise click.UsageError("standard input must hold two lines: the client secret, then the refresh token")
            plain = {"client_secret": lines[0].strip(), "refresh_token": lines[1].strip()}
            if not plain["client_secret"]:
                del plain["client_secret"]
        oauth = OAuth2Config(provider=oauth2_provider, token_url=oauth2_token_url, client_id=oauth2_client_id,
                             scopes=list(oauth2_scopes))
    else:
        if sum(map(bool, (password_file, password_env, password_stdin))) != 1:
            raise click.UsageError("give exactly one of --password-file, --password-env and --password-stdin")
        if password_stdin:
            plain = {"password": sys.stdin.readline().rstrip("\r\n")}
    acct = AccountConfig(id=account_id, host=host, port=port, tls=tls, tls_ca_file=tls_ca_file, username=username,
                         auth="oauth2" if oauth else "password", oauth2=oauth,
                         password_file=password_file, password_env=password_env,
                         folders=list(folders) or ["INBOX"], priority=priority, idle=not no_idle,
                         enabled=not disabled)
    from ..auth.credentials import (CredentialRefused, SecretPolicy, check_token_url, destination_of,
                              endpoint_and_scopes, is_loopback)

    # What the daemon will refuse, said now (the daemon checks again at every login).
    policy = SecretPolicy.from_config(load_config(ctx))
    try:
        if password_file and not policy.file_allowed(password_file):
            raise CredentialRefused(f"--password-file {password_file} is outside secrets.allowed_dirs "
                                    f"({', '.join(policy.dirs) or 'none'}); the daemon will not read it")
        if password_env and password_env not in policy.env:
            raise CredentialRefused(f"--password-env {password_env} is not in secrets.allowed_env; the daemon will "
                                    "not read it")
        if tls == "none" and not is_loopback(host):
            raise CredentialRefused(f"--tls none to {host} would send the credentials in clear; only loopback, or "
                                    "an [[accounts]] table with allow_plaintext = true in the configuration file")
        if oauth is not None:
            check_token_url(account_id, endpoint_and_scopes(oauth)[0])
    except config_mod.ConfigError as exc:
        fail(EX_USAGE, str(exc))
    # The secrets given replace every stored one (a --password-file account keeps no old
    # ciphertext), sealed for this host, port, tls, tls_verify, username and token URL.
    secrets: dict[str, str] = {}
    if plain:
        ring = keyring_of(ctx)
        destination = destination_of(acct)
        secrets = {field: ring.encrypt(value, account_id, field, destination) for field, value in plain.items()}
    store_of(ctx).upsert_account(acct, source="store", secrets=secrets)
    click.echo(f"account {account_id} saved" + (" (secrets encrypted in the store)" if secrets else "")
               + (f"; no refresh token yet: mailingestctl account authorize {account_id}"
                  if oauth is not None and "refresh_token" not in plain else ""))


@account.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def account_list(ctx: click.Context, as_json: bool) -> None:
    """List accounts with their state."""
    rows = store_of(ctx).list_accounts()
    if as_json:
        click.echo(json.dumps([{**_public(r.account), "state": r.state, "source": r.source,
                                "last_error": r.last_error} for r in rows], indent=2))
        return
    click.echo(f"{'id':<24} {'server':<28} {'user':<28} {'prio':<6} {'on':<3} {'state':<12} source")
    for r in rows:
        a = r.account
        click.echo(printable(f"{a.id:<24} {a.host + ':' + str(a.effective_port):<28} {a.username:<28} "
                             f"{a.priority:<6} {'yes' if a.enabled else 'no':<3} ")
                   + coloured_state(printable(r.state), 12) + " " + printable(r.source))


def _public(acct: AccountConfig) -> dict[str, Any]:
    """The account's settings; secrets are never in them (only where to find them)."""
    return msgspec.to_builtins(acct)


def _get(ctx: click.Context, account_id: str) -> Any:
    row = store_of(ctx).get_account(account_id)
    if row is None:
        fail(1, f"no account {account_id!r}")
    return row


@account.command("show")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Print the account as JSON.")
@click.pass_context
def account_show(ctx: click.Context, account_id: str, as_json: bool) -> None:
    """Show one account's settings, state, last error and folder checkpoints."""
    row = _get(ctx, account_id)
    store = store_of(ctx)
    mailboxes = {f: store.get_mailbox(account_id, f) for f in row.account.folders}
    data = {**_public(row.account), "state": row.state, "source": row.source, "last_error": row.last_error,
            "mailboxes": {f: msgspec.to_builtins(m) if m else None for f, m in mailboxes.items()}}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    settings = {k: v for k, v in data.items() if k not in ("id", "state", "last_error", "mailboxes") and v is not None}
    lines = [f"account {row.account.id}  state {coloured_state(row.state)}  source {row.source}"]
    lines += [f"  last error  {row.last_error}"] if row.last_error else []
    lines += [f"  {key:<11} {json.dumps(value) if isinstance(value, (list, dict)) else value}"
              for key, value in settings.items()]
    for folder, m in data["mailboxes"].items():
        lines.append(f"  folder {folder}: " + ("not checked yet" if m is None else
                                              "  ".join(f"{k} {v}" for k, v in m.items() if k != "folder")))
    click.echo("\n".join(lines))


@account.command("remove")
@click.argument("account_id")
@click.pass_context
def account_remove(ctx: click.Context, account_id: str) -> None:
    """Remove an account (its stored messages stay)."""
    if not store_of(ctx).delete_account(account_id):
        fail(1, f"no account {account_id!r}")
    click.echo(f"account {account_id} removed")


@account.command("resync")
@click.argument("account_id")
@click.pass_context
def account_resync(ctx: click.Context, account_id: str) -> None:
    """Re-ingest every folder of an account on purpose: messages the store no longer holds are
    stored and announced again, marked "resync": true; stored ones are left as they are."""
    store = store_of(ctx)
    if store.get_account(account_id) is None:
        fail(1, f"no account {account_id!r}")
    folders = store.resync_account(account_id)
    click.echo(f"account {account_id}: {folders} folder(s) start over when they next change or the daemon "
               "restarts")


def _set_enabled(ctx: click.Context, account_id: str, enabled: bool) -> None:
    if not store_of(ctx).set_enabled(account_id, enabled):
        fail(1, f"no account {account_id!r}")
    click.echo(f"account {account_id} {'enabled' if enabled else 'disabled'}")


@account.command("enable")
@click.argument("account_id")
@click.pass_context
def account_enable(ctx: click.Context, account_id: str) -> None:
    """Enable an account (also lifts auth_failed)."""
    _set_enabled(ctx, account_id, True)


@account.command("disable")
@click.argument("account_id")
@click.pass_context
def account_disable(ctx: click.Context, account_id: str) -> None:
    """Disable an account: its connection is closed and it is not polled."""
    _set_enabled(ctx, account_id, False)


@account.command("test")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (a failed login too, with exit 1).")
@click.pass_context
def account_test(ctx: click.Context, account_id: str, as_json: bool) -> None:
    """Log in once and report capabilities and folder state; changes and stores nothing."""
    from ..fetch import imap
    from ..auth.credentials import Credentials, ReauthRequired, SecretPolicy, TokenEndpointError

    cfg = load_config(ctx)
    try:  # the [[accounts]] tables too: the files and variables they name are allowed secrets
        policy = SecretPolicy.from_config(config_mod.load(cfg.path or None))
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, str(exc))
    row = _get(ctx, account_id)
    acct = row.account
    # With the store: the newest refresh token is the one the provider rotated (the original may
    # be dead), and a token it rotates now must be kept or the daemon's would be.
    credentials = Credentials(cfg.secrets.key_file, store_of(ctx), policy=policy)
    token = None
    try:
        if acct.auth == "oauth2":
            token = credentials.access_token(acct, row.secrets)
            secret = token.token
        else:
            secret = credentials.password(acct, row.secrets)
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, str(exc))
    except (ReauthRequired, TokenEndpointError) as exc:
        _test_failed(as_json, account_id, None, "reauth" if isinstance(exc, ReauthRequired) else "network", str(exc))
    server = f"{acct.host}:{acct.effective_port}"
    started = time.monotonic()
    try:
        client = imap.connect(acct, secret, timeout=cfg.imap.timeout)
    except imap.ImapError as exc:
        _test_failed(as_json, account_id, server, exc.kind.value, exc.detail)
    try:
        result: dict[str, Any] = {
            "account": account_id, "ok": True, "server": server, "username": acct.username, "auth": acct.auth,
            "mechanism": getattr(client, "login_mechanism", "?"), "tls": acct.tls,
            "seconds": round(time.monotonic() - started, 3),
            "access_token_expires_at": None if token is None else token.expires_wall,
            "capabilities": sorted(imap.capabilities(client)), "folders": {}}
        for folder in acct.folders:
            try:
                st = imap.status(client, folder)
                result["folders"][folder] = {"uidvalidity": st.uidvalidity, "uidnext": st.uidnext,
                                             "messages": st.exists, "highestmodseq": st.highestmodseq}
            except imap.ImapError as exc:
                result["folders"][folder] = {"error_kind": exc.kind.value, "error": exc.detail}
    finally:
        imap.logout(client, 5.0)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"account {account_id}: logged in to {server} as {acct.username} (auth {acct.auth}, mechanism "
               f"{result['mechanism']}, tls {acct.tls}) in {result['seconds']:.2f}s")
    if token is not None:
        expires = datetime.datetime.fromtimestamp(token.expires_wall).isoformat(timespec="seconds")
        click.echo(f"access token expires at {expires} (in {token.expires_wall - time.time():.0f}s)")
    click.echo(printable("capabilities: " + " ".join(result["capabilities"])))
    for folder, st in result["folders"].items():
        if "error" in st:
            click.echo(printable(f"folder {folder}: error_kind={st['error_kind']} error={st['error']}"))
        else:
            click.echo(f"folder {folder}: uidvalidity {st['uidvalidity']} uidnext {st['uidnext']} messages "
                       f"{st['messages']}" + (f" highestmodseq {st['highestmodseq']}"
                                               if st["highestmodseq"] is not None else ""))


@account.command("authorize")
@click.argument("account_id")
@click.option("--provider", type=click.Choice(["google", "microsoft", "custom"]), default=None,
              help="Provider (default: the account's); its preset gives the endpoints and scopes.")
@click.option("--auth-url", default="", help="Authorization endpoint (provider custom, or to override a preset).")
@click.option("--client-secret-stdin", is_flag=True,
              help="Read the OAuth2 client secret from standard input and keep it encrypted in the store.")
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="Port on 127.0.0.1 for the redirect (default: any free one; fix it to forward it over SSH).")
@click.option("--timeout", type=float, default=300.0, show_default=True, metavar="S",
              help="Seconds to wait for the browser's redirect.")
@click.pass_context
def account_authorize(ctx: click.Context, account_id: str, provider: str | None, auth_url: str,
                      client_secret_stdin: bool, port: int, timeout: float) -> None:
    """Obtain the account's OAuth2 refresh token: print the provider's sign-in URL, receive the
    redirect on 127.0.0.1 (authorization code with PKCE), store the token encrypted."""
    from ..auth.authorize import AUTHORIZATION_URLS, AuthorizeError, LoopbackReceiver, authorization_url, exchange_code, \
        new_pkce
    from ..auth.credentials import check_token_url, destination_of, endpoint_and_scopes
    from ..auth.secrets import SecretError

    row = _get(ctx, account_id)
    old = row.account
    if old.auth != "oauth2" or old.oauth2 is None:
        fail(EX_USAGE, f"account {account_id} does not use OAuth2: add it with mailingestctl account add ... "
                       "--oauth2-provider P --oauth2-client-id ID (--replace to change an existing one)")
    if row.source != "store":
        fail(EX_USAGE, f"account {account_id} comes from the configuration file, whose refresh token is "
                       "refresh_token_file or refresh_token_env; authorize accounts kept in the store")
    oauth = msgspec.structs.replace(old.oauth2, provider=provider or old.oauth2.provider)
    acct = msgspec.structs.replace(old, oauth2=oauth)
    try:
        token_url, scopes = endpoint_and_scopes(oauth)
        check_token_url(account_id, token_url)
    except config_mod.ConfigError as exc:
        fail(EX_USAGE, str(exc))
    auth_url = auth_url or AUTHORIZATION_URLS.get(oauth.provider, "")
    if not auth_url:
        raise click.UsageError("--auth-url is required for provider custom")
    if not oauth.client_id:
        fail(EX_USAGE, f"account {account_id} has no OAuth2 client id (account add --oauth2-client-id ... --replace)")
    ring = keyring_of(ctx)
    destination = destination_of(acct)
    client_secret = ""
    if client_secret_stdin:
        client_secret = sys.stdin.readline().strip()
    elif "client_secret" in row.secrets:
        try:
            client_secret = ring.decrypt(row.secrets["client_secret"], account_id, "client_secret", destination_of(old))
        except SecretError as exc:
            fail(EX_CONFIG, str(exc))
    pkce, state = new_pkce(), secrets_module.token_urlsafe(24)
    try:
        receiver = LoopbackReceiver(state, port)
    except OSError as exc:
        fail(EX_UNAVAILABLE, f"cannot listen on 127.0.0.1:{port} for the redirect: {exc.strerror}")
    try:
        url = authorization_url(auth_url, oauth.client_id, receiver.redirect_uri, scopes, state, pkce,
                                oauth.provider, login_hint=acct.username)
        click.echo(f"Open this URL in a browser, sign in as {acct.username} and allow access:", err=True)
        click.echo(url)
        click.echo(f"Waiting up to {timeout:g}s for the redirect to {receiver.redirect_uri}", err=True)
        code = receiver.wait(timeout)
        grant = exchange_code(token_url, oauth.client_id, client_secret, code, receiver.redirect_uri, pkce)
    except AuthorizeError as exc:
        fail(1, f"account={account_id} error_kind=authorize error={exc}")
    finally:
        receiver.close()
    sealed = {field: ring.encrypt(value, account_id, field, destination)
              for field, value in (("refresh_token", grant.refresh_token), ("client_secret", client_secret)) if value}
    store_of(ctx).upsert_account(acct, source="store", secrets=sealed)
    click.echo(f"account {account_id}: refresh token stored encrypted (check it with mailingestctl account test "
               f"{account_id})")


def _test_failed(as_json: bool, account_id: str, server: str | None, kind: str, detail: str) -> NoReturn:
    """A failed account test: one key=value line on stderr, or with --json the same as JSON on stdout; exit 1."""
    if as_json:
        click.echo(json.dumps({"account": account_id, "ok": False, "server": server, "error_kind": kind,
                               "error": detail}, indent=2))
        sys.exit(1)
    fail(1, printable(f"account={account_id}" + (f" server={server}" if server else "")
                      + f" error_kind={kind} error={detail}"))

