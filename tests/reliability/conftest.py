"""The reliability suite's table: one row per audited fault, printed at the end of the run.

The table is also written to ``.pytest_cache/reliability-table.md`` so a long run's result can
be copied into docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_kit import LONG, ROWS, table


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long suite's faults last minutes: past the default 300 s per-test timeout."""
    if LONG:
        for item in items:
            item.add_marker(pytest.mark.timeout(1200))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    text = table(ROWS)
    terminalreporter.section(f"reliability ({'long' if LONG else 'short'} suite)")
    terminalreporter.write_line(text)
    out = Path(terminalreporter.config.rootpath) / ".pytest_cache" / "reliability-table.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
