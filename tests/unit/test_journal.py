"""The journal's group commit, against an in-memory store (no disk)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from qmpfd.state.journal import Journal


class SlowStore:
    """Records every saved document; each save takes a moment, like an fsync."""

    def __init__(self, fail_first: bool = False) -> None:
        self.saved: list[dict[str, Any]] = []
        self.fail_first = fail_first

    async def save(self, doc: dict[str, Any]) -> None:
        snapshot = json.loads(json.dumps(doc))  # what would be on disk
        await asyncio.sleep(0.01)
        if self.fail_first:
            self.fail_first = False
            raise OSError("disk full")
        self.saved.append(snapshot)


async def test_concurrent_changes_share_writes_and_each_is_on_disk_when_it_returns() -> None:
    store = SlowStore()
    journal = Journal(store)  # type: ignore[arg-type]

    async def add(i: int) -> None:
        await journal.vm_added(f"vm{i}", f"/run/qemu/vm{i}.qmp")
        # Returning means: a saved document already holds this change.
        assert any(f"vm{i}" in doc["vms"] for doc in store.saved)

    await asyncio.gather(*(add(i) for i in range(20)))
    assert len(store.saved) <= 3  # not 20: one write covers everyone who waited
    assert set(store.saved[-1]["vms"]) == {f"vm{i}" for i in range(20)}


async def test_a_failed_write_is_retried_by_the_next_caller_not_counted_as_saved() -> None:
    store = SlowStore(fail_first=True)
    journal = Journal(store)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        await journal.vm_added("a", "/run/qemu/a.qmp")
    await journal.vm_added("b", "/run/qemu/b.qmp")
    assert store.saved[-1]["vms"] == {"a": "/run/qemu/a.qmp", "b": "/run/qemu/b.qmp"}
