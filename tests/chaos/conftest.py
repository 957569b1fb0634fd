"""Fault-injection runs: each scenario's counts are printed at the end of the session."""

from __future__ import annotations

import pytest

REPORTS: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("fault injection")
        for line in REPORTS:
            terminalreporter.write_line(line)
