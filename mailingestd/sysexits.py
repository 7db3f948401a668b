"""Exit codes (sysexits.h) shared by mailingestd and mailingestctl, and the one-line error exit."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

EX_OK = 0
EX_USAGE = 64  # bad command line
EX_UNAVAILABLE = 69  # daemon not running or unreachable, store unreachable
EX_SOFTWARE = 70  # a child crash loop: restarting again would not help
EX_TEMPFAIL = 75  # not done yet, try again later (mailingestctl drain --wait --timeout)
EX_CONFIG = 78  # configuration error


def fail(program: str, code: int, message: str) -> NoReturn:
    """One clear line on stderr, then exit: never a traceback for an operator's mistake."""
    click.echo(f"{program}: {message}", err=True)
    sys.exit(code)


def run(command: click.Command) -> None:
    """Run a click command with sysexits: a usage error exits 64 (click's own default is 2)."""
    try:
        command.main(standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        sys.exit(EX_USAGE)
    except click.exceptions.Abort:
        sys.exit(1)
