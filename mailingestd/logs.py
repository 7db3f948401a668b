"""Logging: one line per event with key=value fields; structured journal fields under systemd.

Messages are written as ``event=... account=... server=... error_kind=...``. When the daemon's
stderr is connected to the journal (systemd sets JOURNAL_STREAM), records go to the journal with
those fields lifted into ACCOUNT=, SERVER=, ERROR_KIND=... so ``journalctl ACCOUNT=acme`` works.

Fields are taken from the call, never parsed out of the finished text: ``key=%s`` in the format
string names the argument that fills it, and only literals of the format string and those
arguments become fields. Server text that reads ``account=other`` (an error message, a header)
stays inside its own field. Control characters (ESC, BEL, C1...) in anything logged are escaped,
so server- or header-derived text cannot drive the terminal that reads the log
(docs/security.md); :func:`printable` does the same for what mailingestctl prints.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

_LIFTED = {"account", "server", "error_kind", "event", "folder", "uid", "role"}
# key=VALUE in a format string, VALUE a literal or one %-conversion; and every conversion, to
# count which argument a field takes.
_FORMAT_FIELD = re.compile(r"(?<![\w%])(\w+)=(%[-#0 +]*(?:\d+|\*)?(?:\.(?:\d+|\*))?[diouxXeEfFgGcrsa]|[^\s%\"]+)")
_CONVERSION = re.compile(r"%[-#0 +]*(?:\d+|\*)?(?:\.(?:\d+|\*))?[diouxXeEfFgGcrsa%]")
# C0 controls but tab, DEL, and C1 controls (U+0080..U+009F: 8-bit CSI and friends).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character but tab written as an escape (``\\x1b``, ``\\n``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def structured_fields(record: logging.LogRecord) -> dict[str, str]:
    """The journal fields of a record, from its format string and arguments (see module doc)."""
    fields: dict[str, str] = {}
    fmt = record.msg if isinstance(record.msg, str) else ""
    args: tuple[Any, ...] = record.args if isinstance(record.args, tuple) else ()
    starts = [m.start() for m in _CONVERSION.finditer(fmt) if m.group() != "%%"]
    for match in _FORMAT_FIELD.finditer(fmt):
        key, value = match.group(1), match.group(2)
        if key not in _LIFTED or key.upper() in fields:
            continue
        if value.startswith("%"):
            index = starts.index(match.start(2)) if match.start(2) in starts else -1
            if not 0 <= index < len(args) or "*" in value:
                continue
            try:
                value = value % (args[index],)
            except (TypeError, ValueError):
                continue
        fields[key.upper()] = printable(value.strip('"'))
    return fields


class _Printable(logging.Formatter):
    """The message on one line, control characters escaped (a newline in server text cannot
    forge a second log line); a traceback keeps its own line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return "\n".join(printable(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(printable(line) for line in stack_info.split("\n"))


class JournalFieldsHandler(logging.Handler):
    def __init__(self, role: str) -> None:
        super().__init__()
        from systemd import journal

        self.journal = journal
        self.role = role

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            priority = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}.get(record.levelno, 2)
            self.journal.send(message, PRIORITY=str(priority), SYSLOG_IDENTIFIER="mailingestd",
                              MAILINGESTD_ROLE=self.role, **structured_fields(record))
        except Exception:
            self.handleError(record)


def under_journal() -> bool:
    """True when stderr is the journal stream systemd gave us (JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def configure(level: str = "info", role: str = "supervisor") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if under_journal():
        try:
            handler = JournalFieldsHandler(role)
            handler.setFormatter(_Printable(f"role={role} %(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if handler.formatter is None:
        handler.setFormatter(_Printable(
            f"%(asctime)s %(levelname)s mailingestd[%(process)d] role={role} %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "imapclient", "psycopg.pool", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
