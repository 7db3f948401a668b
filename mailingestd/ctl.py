"""``mailingestctl``: talk to a running daemon (status, drain, resume, reload) and manage accounts.

Daemon commands go over the control socket in runtime_dir; account and message commands work on
the store directly, so they also work while the daemon is stopped (a running daemon notices
account changes within seconds). Like the unit, it reads /etc/mailingestd/mailingestd.env first,
so that ``MAILINGESTD_*`` overrides there (a PostgreSQL store URL, say) apply to it as to the
daemon. Exit codes follow sysexits: 0 ok, 64 usage, 69 daemon not running or unreachable,
75 drain --wait timed out, 78 configuration error.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import secrets as secrets_module
import sys
from pathlib import Path
import time
from typing import TYPE_CHECKING, Any, NoReturn

import click
import msgspec

from . import __version__, config as config_mod, control, sysexits
from .config import AccountConfig, Config, OAuth2Config
from .logs import printable
from .sysexits import EX_CONFIG, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE

if TYPE_CHECKING:
    from .auth.secrets import Keyring
    from .store.store import Store

# The store, IMAP, credential and key modules are imported by the commands that use them:
# `mailingestctl status` needs only the config and the control socket, and importing the rest
# (imapclient, ssl, psycopg, cryptography) took longer than the whole status round trip.

def fail(code: int, message: str) -> NoReturn:
    sysexits.fail("mailingestctl", code, message)


DEFAULT_ENV_FILE = "/etc/mailingestd/mailingestd.env"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them: # and ; start comments, a value
    may be in single or double quotes (backslash escapes in double quotes)."""
    variables: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            name, sep, value = line.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not _ENV_NAME.fullmatch(name):
                raise config_mod.ConfigError(f"{path} line {number}: expected KEY=VALUE")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
                if line.rstrip()[-1] == '"':
                    value = re.sub(r"\\(.)", r"\1", value)
            variables[name] = value
    return variables


def apply_env_file(path: str | None) -> None:
    """Put the daemon's environment file into ours, as the unit does for the daemon: its
    MAILINGESTD_* overrides, password_env variables and AWS settings then apply here too. A
    variable set differently in the calling shell is overridden, and said so on stderr."""
    if not path:
        return
    try:
        variables = read_env_file(path)
    except FileNotFoundError:
        if path != DEFAULT_ENV_FILE:
            fail(EX_CONFIG, f"{path}: no such file")
        return  # EnvironmentFile=- in the unit: optional
    except PermissionError:
        fail(EX_CONFIG, f"{path}: permission denied: the daemon's environment is in it (store URL, "
                        "overrides); run as root or as mailingestd, or pass --env-file ''")
    except (config_mod.ConfigError, UnicodeDecodeError) as exc:
        fail(EX_CONFIG, str(exc))
    for name, value in variables.items():
        if name.startswith(config_mod.ENV_PREFIX) and os.environ.get(name, value) != value:
            click.echo(f"mailingestctl: {name} from {path} overrides the one in this shell", err=True)
        os.environ[name] = value


def load_config(ctx: click.Context) -> Config:
    if ctx.obj is None:
        root = ctx.find_root()
        try:
            # Accounts live in the store for every command here; skipping the file's [[accounts]]
            # keeps `status` fast with thousands of them configured.
            ctx.obj = config_mod.load(root.meta.get("config_path") or root.params.get("config_path"),
                                      accounts=False)
        except config_mod.ConfigError as exc:
            fail(EX_CONFIG, exc.for_terminal())
    return ctx.obj


def emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    """Print ``data`` as JSON with --json, else the human line(s)."""
    click.echo(json.dumps(data, indent=2) if as_json else text)


# Account states that need someone to act, and how a terminal shows them (never with NO_COLOR,
# https://no-color.org, and never into a pipe: click drops the codes when stdout is no terminal).
_STATE_COLOURS = {"auth_failed": "red", "reauth_required": "red", "backoff": "yellow"}


def coloured_state(state: str, width: int = 0) -> str:
    text = f"{state:<{width}}"
    colour = _STATE_COLOURS.get(state)
    if colour is None or os.environ.get("NO_COLOR"):
        return text
    return click.style(text, fg=colour, bold=True)


def ask(ctx: click.Context, request: control.Request, timeout: float = 5.0) -> control.Reply:
    cfg = load_config(ctx)
    try:
        reply = control.call(cfg.daemon.runtime_dir, request, timeout)
    except control.DaemonUnreachable as exc:
        fail(EX_UNAVAILABLE, str(exc))
    if not reply.ok:
        fail(EX_CONFIG if isinstance(request, control.Reload) else 1, reply.error or "the daemon refused")
    return reply


def store_of(ctx: click.Context) -> Store:
    cfg = load_config(ctx)
    if cfg.store_url.startswith("sqlite:///") and os.geteuid() == 0:
        owner = _owner(Path(cfg.store_url[len("sqlite://"):]).parent)
        if owner not in (None, 0):
            # Root would leave root-owned -wal/-shm files the daemon's user cannot write.
            fail(EX_USAGE, f"run this as the store's owner (uid {owner}), e.g. runuser -u mailingestd -- mailingestctl ...")
    from .store.store import StoreError, open_store

    try:
        return open_store(cfg.store_url, 1, 1)
    except StoreError as exc:
        fail(EX_UNAVAILABLE, f"store: {exc}")


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


CONFIG_HELP = "Configuration file (default /etc/mailingestd/mailingestd.toml, or $MAILINGESTD_CONFIG)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", envvar="MAILINGESTD_CONFIG", help=CONFIG_HELP)
@click.option("--env-file", metavar="PATH", envvar="MAILINGESTCTL_ENV_FILE", default=DEFAULT_ENV_FILE,
              show_default=True, help="The daemon's environment file, read first as the unit does ('' for none).")
@click.version_option(__version__, prog_name="mailingestctl")
def cli(config_path: str | None, env_file: str) -> None:
    """Control a running mailingestd and manage its accounts."""
    apply_env_file(env_file)


# --- daemon commands ------------------------------------------------------------------------------
def _mib(value: float | None) -> str:
    return f"{(value or 0) / 1048576:.0f} MiB"


def format_cluster(cluster: dict[str, Any] | None) -> list[str]:
    """The CLUSTER block: the mode and, with PostgreSQL leases, every node as this node sees it."""
    if not cluster:
        return ["CLUSTER  -"]
    if not cluster.get("nodes") and "held" not in cluster:
        return [f"CLUSTER  {cluster['mode']}"]
    age = cluster.get("last_renewal_age")
    lines = [f"CLUSTER  {cluster['mode']}  node {cluster['node_id']}  holds {cluster.get('held', 0)} of "
             f"{cluster.get('accounts', 0)} accounts (fair share {cluster.get('target', 0)})  lease "
             f"{cluster.get('lease_time', 0):g}s  renewed {'-' if age is None else f'{age:.1f}s ago'}  "
             f"renewal failures {cluster.get('renewal_failures', 0)}",
             f"  {'node':<24} {'state':<10} {'capacity':>8} {'leases':>7} {'heartbeat':>10} {'publish/s':>10}"]
    for n in cluster.get("nodes", []):
        state = n["state"] if n["live"] else "lost"
        lines.append(f"  {n['node_id']:<24} {state:<10} {n['capacity']:>8g} {n['leases']:>7} "
                     f"{n['heartbeat_age']:>9.1f}s {n.get('publish_rate', 0):>10g}")
    return lines


def format_status(data: dict[str, Any]) -> str:
    sup = data["supervisor"]
    lines = [f"mailingestd {sup['version']}  pid {sup['pid']}  {sup['state']}  up {sup['uptime']:.0f}s  "
             f"node {sup['node_id']}  store {sup['store']}  memory {_mib(sup['memory_bytes'])} of "
             f"{_mib(sup['memory_budget'])}", "", "PROCESSES"]
    lines.append(f"  {'role':<10} {'slot':>4} {'pid':>8} {'cpu':>4} {'state':<10} {'rss':>9} {'restarts':>8} "
                 f"{'heartbeat':>9}")
    for c in data["children"]:
        age = "-" if c["heartbeat_age"] is None else f"{c['heartbeat_age']:.1f}s"
        lines.append(f"  {c['role']:<10} {c['slot']:>4} {c['pid'] or '-':>8} {'-' if c['cpu'] is None else c['cpu']:>4} "
                     f"{c['state']:<10} {_mib(c['rss_bytes']):>9} {c['restarts']:>8} {age:>9}")
    acc = data["accounts"]
    lines += ["", f"ACCOUNTS  {acc['total']}"]
    lines.append("  by state:    " + ("  ".join(f"{coloured_state(k)} {int(v)}"
                                                for k, v in sorted(acc["by_state"].items()) if v) or "-"))
    lines.append("  by priority: " + ("  ".join(f"{k} {int(v)}" for k, v in sorted(acc["by_priority"].items()) if v)
                                      or "-"))
    lines += ["", "SERVERS", (f"  {'server':<32} {'connections':>11} {'limit':>6} {'waiting':>8} "
                              f"{'rotating':>8} {'logins/min':>13} {'polls/min':>15}")]
    for server, s in data["servers"].items():
        # logins/min: used of allowed; polls/min: what the limits allow of what the tiers need.
        capacity = (f"{s['rotating']:>8} {s['logins_last_minute']:>6}/{s['logins_allowed']:<6} "
                    f"{s['polls_possible']:>7.0f}/{s['polls_needed']:<7.0f}" if "polls_needed" in s else "")
        lines.append(f"  {server:<32} {int(s['connections']):>11} {'-' if s['limit'] is None else int(s['limit']):>6} "
                     f"{int(s['waiting']):>8} {capacity}".rstrip())
    lines += [f"  {s['deficit']}" for s in data["servers"].values() if s.get("deficit")]
    lines += ["", *format_cluster(data.get("cluster"))]
    t = data["traffic"]
    lag = ("-" if t["lag_p99"] is None else f"p50 <= {t['lag_p50']:g}s, p99 <= {t['lag_p99']:g}s")
    lines += ["", "TRAFFIC",
              f"  polls     last minute {int(t['polls_last_minute'])}   total {int(t['polls_total'])}",
              f"  messages  last minute {int(t['messages_last_minute'])}   total {int(t['messages_total'])}",
              f"  idling connections {int(t['idle_connections'])}   scheduler lag {lag}"]
    out = data["outbox"]
    if out["enabled"]:
        lines.append(f"  outbox depth {int(out['depth'])}   oldest {out.get('oldest_age', 0):g}s   "
                     f"published {int(out['published_total'])} ({out.get('publish_rate', 0):g}/s on this node)   "
                     f"publish errors {int(out['publish_errors_total'])}   parked {int(out.get('parked', 0))}")
    else:
        lines.append("  queue: none (queue.kind = \"none\")")
    if data.get("stuck_folders"):
        lines += ["", "STUCK FOLDERS (a message over imap.max_message_size; see imap.oversize)"]
        lines += [f"  {printable(line)}" for line in data["stuck_folders"]]
    lines += ["", "RECENT ERRORS"] + ([f"  {printable(e)}" for e in data["errors"]] or ["  none"])
    return "\n".join(lines)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the supervisor, every child, accounts, servers, traffic, outbox and recent errors."""
    reply = ask(ctx, control.Status())
    click.echo(control.pretty(reply.data) if as_json else format_status(reply.data))


@cli.command()
@click.option("--wait", is_flag=True, help="Block until drained, showing progress on stderr, then print a summary.")
@click.option("--timeout", type=float, default=None, metavar="S",
              help="With --wait: give up after S seconds (exit 75, EX_TEMPFAIL: try again later).")
@click.option("--exit", "exit_after", is_flag=True, help="Exit the daemon (status 0) once drained.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def drain(ctx: click.Context, wait: bool, timeout: float | None, exit_after: bool, as_json: bool) -> None:
    """Stop starting new work, finish what is in flight, commit, LOGOUT every IMAP connection."""
    cfg = load_config(ctx)
    started = time.monotonic()
    reply = ask(ctx, control.Drain(exit=exit_after))
    if not wait:
        state = reply.data.get("state")
        emit(as_json, {"state": state}, f"draining (state {state})")
        return
    deadline = None if timeout is None else started + timeout
    last: dict[str, Any] = {}
    shown = None
    while True:
        try:
            last = control.call(cfg.daemon.runtime_dir, control.Status(), 5.0).data
        except control.DaemonUnreachable:
            if exit_after:
                took = time.monotonic() - started
                emit(as_json, {"state": "exited", "seconds": round(took, 3)}, f"drained and exited after {took:.1f}s")
                return
            fail(EX_UNAVAILABLE, "the daemon went away while draining")
        state = last["supervisor"]["state"]
        if state in ("drained", "stopping"):
            break
        progress = (state, last["drain"]["in_flight_accounts"], int(last["outbox"]["depth"]))
        if progress != shown:  # one line per change, on stderr: stdout keeps the result alone
            click.echo(f"{time.monotonic() - started:5.1f}s {state}: {progress[1]} accounts in flight, "
                       f"outbox depth {progress[2]}", err=True)
            shown = progress
        if deadline is not None and time.monotonic() > deadline:
            fail(EX_TEMPFAIL, f"not drained after {timeout:g}s (state {state}, {progress[1]} accounts in flight); "
                              "the drain goes on: run drain --wait again, or resume")
        time.sleep(0.2)
    d, took = last["drain"], time.monotonic() - started
    emit(as_json, {"state": state, "seconds": round(took, 3), "in_flight_accounts": d["in_flight_accounts"],
                   "messages_total": int(last["traffic"]["messages_total"]),
                   "outbox_depth": int(last["outbox"]["depth"])},
         f"drained in {took:.1f}s: {d['in_flight_accounts']} accounts were in flight; "
         f"{int(last['traffic']['messages_total'])} messages stored in total; "
         f"outbox depth {int(last['outbox']['depth'])}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def resume(ctx: click.Context, as_json: bool) -> None:
    """Undo a drain: accounts are scheduled and connected again."""
    state = ask(ctx, control.Resume()).data.get("state")
    emit(as_json, {"state": state}, f"resumed (state {state})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def reload(ctx: click.Context, as_json: bool) -> None:
    """Re-read the configuration file, like SIGHUP; a bad file is refused and the old one kept."""
    reply = ask(ctx, control.Reload(), timeout=30.0)
    emit(as_json, {"reloaded": True, **reply.data}, "reloaded")


# --- accounts ---------------------------------------------------------------------------------------
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
    from .auth.credentials import (CredentialRefused, SecretPolicy, check_token_url, destination_of,
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


def keyring_of(ctx: click.Context) -> Keyring:
    from .auth.secrets import Keyring, default_key_path

    try:
        return Keyring.load(default_key_path(load_config(ctx).secrets.key_file))
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, str(exc))


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


@account.command("enable")
@click.argument("account_id")
@click.pass_context
def account_enable(ctx: click.Context, account_id: str) -> None:
    """Enable an account (also lifts auth_failed)."""
    if not store_of(ctx).set_enabled(account_id, True):
        fail(1, f"no account {account_id!r}")
    click.echo(f"account {account_id} enabled")


@account.command("disable")
@click.argument("account_id")
@click.pass_context
def account_disable(ctx: click.Context, account_id: str) -> None:
    """Disable an account: its connection is closed and it is not polled."""
    if not store_of(ctx).set_enabled(account_id, False):
        fail(1, f"no account {account_id!r}")
    click.echo(f"account {account_id} disabled")


@account.command("test")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (a failed login too, with exit 1).")
@click.pass_context
def account_test(ctx: click.Context, account_id: str, as_json: bool) -> None:
    """Log in once and report capabilities and folder state; changes and stores nothing."""
    from .fetch import imap
    from .auth.credentials import Credentials, ReauthRequired, SecretPolicy, TokenEndpointError

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
    from .auth.authorize import AUTHORIZATION_URLS, AuthorizeError, LoopbackReceiver, authorization_url, exchange_code, \
        new_pkce
    from .auth.credentials import check_token_url, destination_of, endpoint_and_scopes
    from .auth.secrets import SecretError

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


# --- secrets ----------------------------------------------------------------------------------------
@cli.group("secrets")
def secrets_group() -> None:
    """Keys for the secrets kept encrypted in the store."""


@secrets_group.command("genkey")
def secrets_genkey() -> None:
    """Print a new key line (<id>:<base64>) for secrets.key_file; put it FIRST to encrypt with it."""
    from .auth.secrets import generate_key_line

    click.echo(generate_key_line())


@secrets_group.command("rotate")
@click.pass_context
def secrets_rotate(ctx: click.Context) -> None:
    """Re-encrypt every stored secret under the key file's first key (old keys only decrypt).

    Secrets stored before they were bound to their server are bound to what the account's row
    says now; each is listed, check it. Running workers load the new key file by themselves."""
    from .auth.credentials import rebind_secrets
    from .auth.secrets import SecretError

    ring = keyring_of(ctx)
    try:
        rotated = rebind_secrets(store_of(ctx), ring, lambda line: click.echo(printable(line)))
    except SecretError as exc:
        fail(EX_CONFIG, str(exc))
    click.echo(f"re-encrypted the secrets of {rotated} accounts under key {ring.current_id}; "
               "older key lines can now be removed from the key file")


# --- messages ---------------------------------------------------------------------------------------
@cli.group(invoke_without_command=True)
@click.option("--account", "account_id", default=None, help="Only this account.")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def messages(ctx: click.Context, account_id: str | None, limit: int, as_json: bool) -> None:
    """The most recently ingested messages."""
    if ctx.invoked_subcommand is not None:
        return
    rows = store_of(ctx).recent_messages(account_id, limit)
    if as_json:
        click.echo(json.dumps([msgspec.to_builtins(r) for r in rows], indent=2))
        return
    for r in rows:
        when = datetime.datetime.fromtimestamp(r.ingested_at).strftime("%H:%M:%S")
        click.echo(printable(f"{when}  {r.key:<44} {r.size:>9}  {(r.from_ or '-')[:32]:<32}  "
                             f"{(r.subject or '-')[:60]}"))


@messages.command("get")
@click.argument("key")
@click.option("-o", "--output", "output", default="-", metavar="FILE",
              help="Write to FILE, created mode 0600 (default stdout); an existing FILE is refused.")
@click.option("--force", is_flag=True, help="With -o: replace an existing FILE (never through a symlink).")
@click.pass_context
def messages_get(ctx: click.Context, key: str, output: str, force: bool) -> None:
    """Write one message's raw bytes (from the store or from S3) exactly as the server sent them."""
    from .store import blobs

    cfg = load_config(ctx)
    try:
        raw = blobs.read_raw(store_of(ctx), key, blobs.open_blobs(cfg.blobs), cfg.blobs)
    except (blobs.BlobError, ValueError) as exc:
        fail(1, str(exc))
    if raw is None:
        fail(1, f"no message {key!r}")
    if output == "-":
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
    else:
        # O_NOFOLLOW: a symlink planted at FILE (in /tmp, say) is refused, not followed to
        # wherever it points; O_EXCL unless --force: nothing existing is overwritten by surprise.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
        try:
            fd = os.open(output, flags, 0o600)
        except OSError as exc:
            why = ("is a symlink" if exc.errno == errno.ELOOP or os.path.islink(output) else
                   "exists (--force replaces it)" if exc.errno == errno.EEXIST else exc.strerror)
            fail(1, f"{output}: {why}")
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, 0o600)  # --force onto an existing file: its old mode goes too
            handle.write(raw)
        click.echo(f"{key}: {len(raw)} bytes written to {output}", err=True)


# --- store ------------------------------------------------------------------------------------------
@cli.group("store")
def store_group() -> None:
    """Look at the store: sizes, retention, partitions."""


@store_group.command("stats")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def store_stats(ctx: click.Context, as_json: bool) -> None:
    """Sizes, row counts, partitions (PostgreSQL) and the oldest message still holding raw bytes."""
    from .store.retention import store_stats as collect

    data = collect(store_of(ctx))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    m = data["messages"]
    lines = [f"backend {data['backend']}  database {_mib(data['database_bytes'])}",
             f"messages {m['rows']}  raw in store {m['raw_in_store']} ({_mib(m['raw_bytes'])})  "
             f"raw in S3 {m['raw_in_s3']}  raw pruned {m['raw_pruned']}",
             f"outbox {data['outbox']['rows']}"]
    if "message_keys" in data:
        lines.append(f"message_keys {data['message_keys']['rows']}")
    oldest = data["oldest_raw"]
    lines.append("oldest raw message " + (f"{oldest['key']} ingested "
                                          f"{datetime.datetime.fromtimestamp(oldest['ingested_at']):%Y-%m-%d %H:%M:%S}"
                                          if oldest else "-"))
    for name, size in sorted(data.get("tables_bytes", {}).items()):
        lines.append(f"  table {name:<14} {_mib(size):>10}")
    for p in data.get("partitions", []):
        span = ("DEFAULT" if p["start"] is None else
                f"{datetime.datetime.utcfromtimestamp(p['start']):%Y-%m-%d} .. "
                f"{datetime.datetime.utcfromtimestamp(p['end']):%Y-%m-%d}")
        lines.append(f"  partition {p['name']:<22} {span:<24} rows {p['rows']:>9}  {_mib(p['bytes']):>10}")
    click.echo("\n".join(lines))


# --- configuration ----------------------------------------------------------------------------------
@cli.group("config")
def config_group() -> None:
    """The effective configuration."""


def _masked(value: Any) -> Any:
    """A URL's password (postgresql://user:PASSWORD@host) replaced by ***; everything else as is."""
    if isinstance(value, str) and "://" in value:
        return re.sub(r"^([a-z0-9+.-]+://[^/:@]*:)[^/@]*@", r"\1***@", value, flags=re.IGNORECASE)
    return value


def _plain(value: Any) -> Any:
    """Durations as seconds, sizes as bytes."""
    return float(value) if isinstance(value, float) else int(value)


@config_group.command("show")
@click.option("-n", "--changed", is_flag=True, help="Only the keys that differ from the defaults, like postconf -n.")
@click.option("--json", "as_json", is_flag=True, help="Print the sections as JSON.")
@click.pass_context
def config_show(ctx: click.Context, changed: bool, as_json: bool) -> None:
    """Print the configuration the daemon would use: the file, then MAILINGESTD_* from the environment
    (and the environment file), with passwords in URLs masked. Accounts: mailingestctl account list."""
    cfg = load_config(ctx)
    defaults = config_mod.Config()
    sections: dict[str, dict[str, Any]] = {}
    for name in (f.name for f in msgspec.structs.fields(Config) if f.name not in ("accounts", "path")):
        values = msgspec.to_builtins(getattr(cfg, name), enc_hook=_plain)
        default = msgspec.to_builtins(getattr(defaults, name), enc_hook=_plain)
        sections[name] = {k: _masked(v) for k, v in values.items() if not changed or v != default.get(k)}
    if as_json:
        click.echo(json.dumps(sections, indent=2))
        return
    click.echo(f"# {cfg.path or config_mod.DEFAULT_CONFIG_PATH}, then the environment")
    for name, values in sections.items():
        for key, value in values.items():
            source = f"  # {config_mod.ENV_PREFIX}{name.upper()}_{key.upper()}" \
                if f"{config_mod.ENV_PREFIX}{name.upper()}_{key.upper()}" in os.environ else ""
            click.echo(f"{name}.{key} = {json.dumps(value)}{source}")


def _accept_config_anywhere(command: click.Command) -> None:
    """--config after the subcommand too (mailingestctl status --config PATH), for every command."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.find_root().meta["config_path"] = value

    if command is not cli:
        command.params.append(click.Option(["--config"], metavar="PATH", expose_value=False, is_eager=True,
                                           callback=remember, help=CONFIG_HELP))
    for sub in getattr(command, "commands", {}).values():
        _accept_config_anywhere(sub)


_accept_config_anywhere(cli)


def main() -> None:
    from .hardening import no_core_dumps, private_files

    private_files()  # every file it creates (a message, a store file) is private
    no_core_dumps()  # account test and secrets rotate hold decrypted secrets
    try:
        sysexits.run(cli)
    except Exception as exc:
        # A store failure anywhere below is one line, exit 69 (only a command that imported the
        # store can raise one).
        store = sys.modules.get("mailingestd.store.store")
        if store is not None and isinstance(exc, store.StoreError):
            fail(EX_UNAVAILABLE, f"store: {exc}")
        raise
