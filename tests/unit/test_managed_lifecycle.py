"""A ManagedVm's life on links that answer what real QEMUs answered (tests/unit/fixtures): adopt,
lose the link and win it back with backoff, stay managed when re-adoption finds QEMU away, raw
QMP passthrough, and whether a QEMU is gone for good."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qmpfd.errors import QmpfdError, VmGone
from qmpfd.qemu.link import LinkState
from qmpfd.state.journal import Journal, Operation
from qmpfd.vm import managed as managed_mod
from qmpfd.vm.managed import ManagedVm
from tests.unit.replay import ReplayLink


class Links:
    """Makes the VM's links: the first ``refuse`` connections fail as a QEMU that is away."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.made: list[ReplayLink] = []

    def __call__(self, name: str, _path: Path, _timeout: float) -> ReplayLink:
        link = ReplayLink("pc", name)
        if self.refuse:
            self.refuse -= 1

            async def away(_t: float) -> None:
                raise VmGone("cannot connect to QMP socket (scripted)")
            link.connect = away  # type: ignore[method-assign]
        self.made.append(link)
        return link


def vm(tmp_path: Path, events: list[tuple[str, dict[str, Any]]]) -> ManagedVm:
    return ManagedVm("v", tmp_path / "v.qmp", lambda n, d: events.append((n, d)),
                     Journal.open(tmp_path), command_timeout=1, connect_timeout=1,
                     pending_ttl=60)


async def test_adopt_lose_and_win_back_the_link(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    links = Links()
    monkeypatch.setattr(managed_mod, "QmpLink", links)
    monkeypatch.setattr(managed_mod, "RECONNECT_FIRST", 0.01)
    events: list[tuple[str, dict[str, Any]]] = []
    v = vm(tmp_path, events)
    info = await v.start()
    assert info.connected and info.policy == "acpi-pcihp" and info.machine
    assert await v.qemu_gone() is False                       # connected: never gone
    links.refuse = 2                                          # QEMU away for two attempts
    links.made[-1]._state = LinkState.DOWN
    v._on_disconnect()
    v._on_disconnect()                                        # once is enough
    for _ in range(300):
        if any(n == "VM_RECONNECTED" for n, _ in events):
            break
        await asyncio.sleep(0.01)
    names = [n for n, _ in events]
    assert names.count("VM_DISCONNECTED") == 1 and names.count("VM_RECONNECTED") == 1
    assert len(links.made) == 4 and v.link.connected       # two refused, then one that took
    await v.stop()


async def test_readoption_keeps_an_unreachable_vm(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(managed_mod, "QmpLink", Links(refuse=100))
    monkeypatch.setattr(managed_mod, "RECONNECT_FIRST", 0.01)
    events: list[tuple[str, dict[str, Any]]] = []
    v = vm(tmp_path, events)
    with pytest.raises(QmpfdError):
        await v.start()                                       # a new adoption: refused
    (tmp_path / "again").mkdir()
    again = vm(tmp_path / "again", events)
    info = await again.start(keep_trying=True)                # a re-adoption: kept
    assert not info.connected and [n for n, _ in events] == ["VM_DISCONNECTED"]
    assert await again.qemu_gone() is True                    # nothing listens on its socket
    await again.stop()


async def test_passthrough_reads_qemu_again_and_failures_are_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(managed_mod, "QmpLink", Links())
    events: list[tuple[str, dict[str, Any]]] = []
    v = vm(tmp_path, events)
    await v.start()
    before = v.link.commands_sent
    with pytest.raises(QmpfdError):
        await v.passthrough("no-such-command", None)
    assert v.link.commands_sent > before + 1                  # and the topology read again
    op = Operation("attach", "v", "pci.0", 5, {"a": 0}, "acpi-pcihp")
    await v.journal.begin(op)
    v.operation_failed(op, "scripted")
    assert [e.reason for e in v.failed] == ["scripted"]
    assert events[-1][0] == "SLOT_ATTACH_FAILED"
    await v.stop()
