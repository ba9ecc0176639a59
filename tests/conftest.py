"""Project-wide pytest hooks: print the fault-injection matrix after the run."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.integration.faults_support import MATRIX, render_matrix

    if MATRIX:
        terminalreporter.section("fault-injection matrix")
        terminalreporter.write_line(render_matrix(MATRIX))
