"""Adopting a VM from what real QEMU 7.2 answered (recorded), then operating on it: identity,
policy, topology and the first attach/detach, with no QEMU process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmpfd.hotplug.executor import AttachFailed
from qmpfd.hotplug.plan import FunctionSpec
from qmpfd.hotplug.slots import SlotState
from qmpfd.state.journal import Journal
from qmpfd.vm import managed as managed_mod
from qmpfd.vm.managed import ManagedVm
from tests.unit.replay import ReplayLink


@pytest.mark.parametrize(("machine", "policy", "bus"), [
    ("pc", "acpi-pcihp", "pci.0"), ("q35-native", "pcie-native", "rp1")])
async def test_adopt_then_attach_and_detach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            machine: str, policy: str, bus: str) -> None:
    links: list[ReplayLink] = []

    def replay(name: str, _path: Path, _timeout: float) -> ReplayLink:
        links.append(ReplayLink(machine, name))
        return links[-1]
    monkeypatch.setattr(managed_mod, "QmpLink", replay)
    events: list[tuple[str, dict[str, object]]] = []
    vm = ManagedVm("v", tmp_path / "qmp", lambda n, d: events.append((n, d)),
                   Journal.open(tmp_path), command_timeout=1, connect_timeout=1,
                   pending_ttl=60)
    info = await vm.start()
    try:
        assert (info.arch, info.policy, info.connected) == ("x86_64", policy, True)
        assert info.qemu and info.qemu.startswith("7.2.")
        assert info.machine and info.machine.startswith("pc-")
        hot = [s for s in vm.slots() if s.hotpluggable]
        assert hot and {s.bus for s in hot} >= {bus}
        specs = [FunctionSpec(f"a{i}", "virtio-rng-pci", i) for i in range(2)]
        placed = await vm.attach(specs, bus=bus)
        key = (placed.plan.bus, placed.plan.slot)
        assert vm.table.state(key) is SlotState.PRESENT
        assert set(links[-1].qemu.devices) == {"a0", "a1"}
        await vm.detach(ids=["a0", "a1"], bus=None, slot=None, whole_slot=False, timeout=5)
        await asyncio.sleep(0.05)
        assert vm.table.state(key) is SlotState.EMPTY and not links[-1].qemu.devices
        assert [n for n, _ in events] == ["SLOT_ATTACHED", "SLOT_DETACHED"]
    finally:
        await vm.stop()


async def test_host_functions_are_given_back_by_the_operation_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attach binds through ``acquire`` and gives back through the VM's one release path,
    only when nothing of the request is left in QEMU and that is known."""
    links: list[ReplayLink] = []

    def replay(name: str, _path: Path, _timeout: float) -> ReplayLink:
        links.append(ReplayLink("pc", name))
        return links[-1]
    monkeypatch.setattr(managed_mod, "QmpLink", replay)
    released: list[list[str]] = []

    async def on_removed(_vm: str, ids: list[str]) -> list[str]:
        released.append(sorted(ids))
        return []
    vm = ManagedVm("v", tmp_path / "qmp", lambda n, d: None, Journal.open(tmp_path),
                   command_timeout=1, connect_timeout=1, pending_ttl=60,
                   on_removed=on_removed)
    await vm.start()
    acquired: list[str] = []

    async def acquire() -> None:
        acquired.append("bound")
    try:
        await vm.attach([FunctionSpec("k0", "virtio-rng-pci", 0)], acquire=acquire)
        assert acquired == ["bound"] and released == []           # kept while in QEMU
        links[-1].qemu.script[("device_add", "e0")] = "refuse"
        with pytest.raises(AttachFailed):
            await vm.attach([FunctionSpec(f"e{i}", "virtio-rng-pci", i) for i in range(2)],
                            acquire=acquire)
        assert released == [["e0", "e1"]]                          # rolled back: given back
        links[-1].qemu.script[("device_add", "g0")] = "gone"
        with pytest.raises(AttachFailed):
            await vm.attach([FunctionSpec(f"g{i}", "virtio-rng-pci", i) for i in range(2)],
                            acquire=acquire)
        assert released == [["e0", "e1"]]                          # not known yet: kept
    finally:
        await vm.stop()
