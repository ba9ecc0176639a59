"""Project-wide pytest hooks: print the fault-injection and QEMU version matrices after the run."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.integration.faults_support import (
        MATRIX,
        VERSION_MATRIX,
        render_matrix,
        render_version_matrix,
    )

    if MATRIX:
        terminalreporter.section("fault-injection matrix")
        terminalreporter.write_line(render_matrix(MATRIX))
    if VERSION_MATRIX:
        terminalreporter.section("QEMU version matrix (rows that passed, as observed)")
        terminalreporter.write_line(render_version_matrix(VERSION_MATRIX))
