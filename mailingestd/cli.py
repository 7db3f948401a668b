"""``mailingestd``: run the daemon in the foreground (systemd style), or check a configuration."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click

from . import __version__, config as config_mod, logs, sysexits
from .store import StoreError, open_store
from .sysexits import EX_CONFIG, EX_OK, EX_UNAVAILABLE

def fail(code: int, message: str) -> NoReturn:
    sysexits.fail("mailingestd", code, message)


def check(cfg: config_mod.Config) -> None:
    """Everything that can be checked without the network: secrets readable, store opens."""
    for account in cfg.accounts:
        if account.auth == "password":
            config_mod.read_secret(account)
    store = open_store(cfg.store_url, 1, 1)
    store.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", envvar="MAILINGESTD_CONFIG",
              help="Configuration file (default /etc/mailingestd/mailingestd.toml, or $MAILINGESTD_CONFIG).")
@click.option("--check-config", is_flag=True, help="Validate the configuration (and open the store), then exit.")
@click.version_option(__version__, prog_name="mailingestd")
def command(config_path: str | None, check_config: bool) -> None:
    """Ingest new mail from many IMAP mailboxes into a durable store and announce it on a queue.

    Runs in the foreground: logs go to stderr (to the journal under systemd). SIGTERM drains
    and exits 0, SIGINT/SIGQUIT stop fast, SIGHUP reloads the configuration.
    """
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, str(exc))
    logs.configure(cfg.daemon.log_level, "supervisor")
    try:
        check(cfg)
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, str(exc))
    except StoreError as exc:
        fail(EX_UNAVAILABLE, f"store: {exc}")
    if check_config:
        click.echo(f"{cfg.path}: configuration OK ({len(cfg.accounts)} accounts in the file, "
                   f"store {cfg.store_url.split('://')[0]}, queue {cfg.queue.kind}, {cfg.worker_count} workers)")
        sys.exit(EX_OK)
    from .supervisor import run

    try:
        code = run(cfg)
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, str(exc))
    except StoreError as exc:
        fail(EX_UNAVAILABLE, f"store: {exc}")
    logging.shutdown()
    sys.exit(code)


def main() -> None:
    sysexits.run(command)
