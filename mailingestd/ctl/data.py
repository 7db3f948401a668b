"""mailingestctl secrets, messages, store and config: the keys, the stored messages, the store's
sizes and the effective configuration; they work on the files and the store directly, daemon or not."""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import sys
from typing import Any

import click
import msgspec

from .. import config as config_mod
from ..config import Config
from ..logs import printable
from ..sysexits import EX_CONFIG
from .common import _mib, cli, fail, keyring_of, load_config, store_of


# --- secrets ----------------------------------------------------------------------------------------
@cli.group("secrets")
def secrets_group() -> None:
    """Keys for the secrets kept encrypted in the store."""


@secrets_group.command("genkey")
def secrets_genkey() -> None:
    """Print a new key line (<id>:<base64>) for secrets.key_file; put it FIRST to encrypt with it."""
    from ..auth.secrets import generate_key_line

    click.echo(generate_key_line())


@secrets_group.command("rotate")
@click.pass_context
def secrets_rotate(ctx: click.Context) -> None:
    """Re-encrypt every stored secret under the key file's first key (old keys only decrypt).

    Secrets stored before they were bound to their server are bound to what the account's row
    says now; each is listed, check it. Running workers load the new key file by themselves."""
    from ..auth.credentials import rebind_secrets
    from ..auth.secrets import SecretError

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
    from ..store import blobs

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
    from ..store.retention import store_stats as collect

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
