"""``mailingestd``: run the daemon in the foreground (systemd style), check a configuration without
changing anything, or migrate the store (``mailingestd migrate``)."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click

from . import __version__, config as config_mod, logs, sysexits
from .hardening import no_core_dumps, private_files, refuse_root
from .store.probe import StoreProbe, probe_store
from .store.store import StoreError
from .sysexits import EX_CONFIG, EX_OK, EX_UNAVAILABLE

# Migration 5 sets lz4 compression on a column (ALTER ... SET COMPRESSION, PostgreSQL 14); the
# test suite and the benchmarks run PostgreSQL 15.
POSTGRESQL_MIN_VERSION = 14


def fail(code: int, message: str) -> NoReturn:
    sysexits.fail("mailingestd", code, message)


def supported_problem(probe: StoreProbe) -> str | None:
    """Why this mailingestd cannot use the store, or None."""
    if probe.server_version is not None and probe.server_version < POSTGRESQL_MIN_VERSION * 10000:
        return (f"PostgreSQL {probe.server_version // 10000} is not supported: mailingestd needs PostgreSQL "
                f"{POSTGRESQL_MIN_VERSION} or newer")
    if probe.schema_version > probe.latest:
        return (f"store schema version {probe.schema_version} is newer than this mailingestd ({probe.latest}); "
                "upgrade mailingestd")
    return None


def load(config_path: str | None) -> config_mod.Config:
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, exc.for_terminal())
    logs.configure(cfg.daemon.log_level, "supervisor")
    return cfg


def check(cfg: config_mod.Config) -> StoreProbe:
    """Everything that can be checked without IMAP, and without changing a file or the store:
    the passwords readable, the store reachable, supported and not newer than this version."""
    try:
        for account in cfg.accounts:
            if account.auth == "password":
                config_mod.read_secret(account)
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, exc.for_terminal())
    try:
        probe = probe_store(cfg.store_url)
    except StoreError as exc:
        fail(EX_UNAVAILABLE, f"store: {exc}")
    problem = supported_problem(probe)
    if problem:
        fail(EX_CONFIG, f"store: {problem}")
    return probe


config_option = click.option("--config", "config_path", metavar="PATH", envvar="MAILINGESTD_CONFIG",
                             help="Configuration file (default /etc/mailingestd/mailingestd.toml, "
                                  "or $MAILINGESTD_CONFIG).")


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--check-config", is_flag=True,
              help="Validate the configuration and look at the store (read-only), then exit.")
@click.option("--allow-root", is_flag=True, help="Run even as root (the daemon needs no privilege; see docs/security.md).")
@click.version_option(__version__, prog_name="mailingestd")
@click.pass_context
def command(ctx: click.Context, config_path: str | None, check_config: bool, allow_root: bool = False) -> None:
    """Ingest new mail from many IMAP mailboxes into a durable store and announce it on a queue.

    Runs in the foreground: logs go to stderr (to the journal under systemd). SIGTERM drains
    and exits 0, SIGINT/SIGQUIT stop fast, SIGHUP reloads the configuration. Store migrations
    run at start, or beforehand with `mailingestd migrate`.
    """
    if ctx.invoked_subcommand is not None:
        return
    cfg = load(config_path)
    probe = check(cfg)
    if check_config:
        click.echo(f"{cfg.path}: configuration OK ({len(cfg.accounts)} accounts in the file, "
                   f"queue {cfg.queue.kind}, {cfg.worker_count} workers); {probe.describe()}")
        sys.exit(EX_OK)
    problem = refuse_root(allow_root)
    if problem:
        fail(sysexits.EX_USAGE, problem)
    from .daemon.supervisor import run

    try:
        code = run(cfg)
    except config_mod.ConfigError as exc:
        fail(EX_CONFIG, exc.for_terminal())
    except StoreError as exc:
        fail(EX_UNAVAILABLE, f"store: {exc}")
    logging.shutdown()
    sys.exit(code)


@command.command()
@config_option
@click.pass_context
def migrate(ctx: click.Context, config_path: str | None) -> None:
    """Create the store or bring its schema up to date, then exit (the daemon also does it at start)."""
    cfg = load(config_path or ctx.find_root().params.get("config_path"))
    before = check(cfg)
    from .store.store import open_store

    try:
        store = open_store(cfg.store_url, 1, 1)
        version = store.migrate()  # already done by open_store: returns the version, changes nothing
        store.close()
    except StoreError as exc:
        fail(EX_UNAVAILABLE, f"store: {exc}")
    click.echo(f"store {before.backend}: schema {before.schema_version} -> {version}"
               + (" (nothing to do)" if before.schema_version == version else ""))


def main() -> None:
    private_files()
    no_core_dumps()
    sysexits.run(command)
