"""Adopting a VM from what real QEMU 7.2 answered (recorded), then operating on it: identity,
policy, topology and the first attach/detach, with no QEMU process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

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
