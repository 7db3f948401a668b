"""Logging: one line per event with key=value fields; structured journal fields under systemd.

Messages are written as ``event=... account=... server=... error_kind=...``. When the daemon's
stderr is connected to the journal (systemd sets JOURNAL_STREAM), records go to the journal with
those fields lifted into ACCOUNT=, SERVER=, ERROR_KIND=... so ``journalctl ACCOUNT=acme`` works.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_FIELD = re.compile(r"(\w+)=(\"[^\"]*\"|\S+)")
_LIFTED = {"account", "server", "error_kind", "event", "folder", "uid", "role"}


class JournalFieldsHandler(logging.Handler):
    def __init__(self, role: str) -> None:
        super().__init__()
        from systemd import journal

        self.journal = journal
        self.role = role

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields = {k.upper(): v.strip('"') for k, v in _FIELD.findall(record.getMessage()) if k in _LIFTED}
            priority = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}.get(record.levelno, 2)
            self.journal.send(message, PRIORITY=str(priority), SYSLOG_IDENTIFIER="mailingestd",
                              MAILINGESTD_ROLE=self.role, **fields)
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
            handler.setFormatter(logging.Formatter(f"role={role} %(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s mailingestd[%(process)d] role={role} %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "imapclient", "psycopg.pool", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
