"""``mailingestctl``: talk to a running daemon (status, drain, resume, reload) and manage accounts.

Daemon commands go over the control socket in runtime_dir; account and message commands work on
the store directly, so they also work while the daemon is stopped (a running daemon notices
account changes within seconds). Like the unit, it reads /etc/mailingestd/mailingestd.env first,
so that ``MAILINGESTD_*`` overrides there (a PostgreSQL store URL, say) apply to it as to the
daemon. Exit codes follow sysexits: 0 ok, 64 usage, 69 daemon not running or unreachable,
75 drain --wait timed out, 78 configuration error.

The commands live by group: ``common.py`` (the root group, configuration, control socket, store),
``status.py`` (status, drain, resume, reload), ``accounts.py`` (account ...), ``data.py``
(secrets, messages, store, config). ``main`` is the console script (``mailingestd.ctl:main``).
"""

from __future__ import annotations

import sys

import click

from .. import sysexits
from ..sysexits import EX_UNAVAILABLE
from . import accounts, data, status  # noqa: F401 (each registers its commands on cli)
from .common import CONFIG_HELP, cli, fail

__all__ = ["cli", "main"]


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
    from ..hardening import no_core_dumps, private_files

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
