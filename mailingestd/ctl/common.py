"""What every mailingestctl command shares: the root group, the daemon's environment file, the
configuration, the control socket and the store, and how a failure is said (sysexits)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .. import __version__, config as config_mod, control, sysexits
from ..config import Config
from ..sysexits import EX_CONFIG, EX_UNAVAILABLE, EX_USAGE

if TYPE_CHECKING:
    from ..auth.secrets import Keyring
    from ..store.store import Store

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
    from ..store.store import StoreError, open_store

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


def _mib(value: float | None) -> str:
    return f"{(value or 0) / 1048576:.0f} MiB"


def keyring_of(ctx: click.Context) -> Keyring:
    from ..auth.secrets import Keyring, default_key_path

    try:
        return Keyring.load(default_key_path(load_config(ctx).secrets.key_file))
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, str(exc))
