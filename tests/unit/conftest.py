"""Shared by every unit test."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.unit.qmp_peer import QmpPeer


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """The daemon's main() and reload() set the root logger up (a handler on this test's
    stderr): put back what pytest had, so later tests do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    qemu_level = logging.getLogger("qemu").level
    yield
    gc.collect()     # finalizers (asyncio's "exception never retrieved" logs) run here, not later
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("qemu").setLevel(qemu_level)


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[QmpPeer]:
    """A scripted QMP peer on a Unix socket (tests/unit/qmp_peer.py)."""
    p = QmpPeer(tmp_path / "qmp.sock")
    await p.start()
    yield p
    await p.stop()
