"""Slots deeper in the topology: behind a PCIe switch's downstream port, and on a conventional
pci-bridge behind a root port (q35); found by the topology model, attached and detached, with the
guest as witness."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.vm import LabVm, LabVmSpec, slot_groups
from tests.integration.conftest import Client, adopt, qemu_view, start_lab_vm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def switch_vm(workdir: Path, daemon: Path) -> Iterator[LabVm]:
    lab = start_lab_vm(workdir, "topo-switch", LabVmSpec(
        machine="q35-native", root_ports=0, switch_downstream_ports=2))
    adopt(daemon, "topo-switch", lab.qmp_socket)
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def bridge_vm(workdir: Path, daemon: Path) -> Iterator[LabVm]:
    lab = start_lab_vm(workdir, "topo-bridge", LabVmSpec(
        machine="q35", root_ports=0, bridge_behind_port=True))
    adopt(daemon, "topo-bridge", lab.qmp_socket)
    yield lab
    lab.stop()


async def attach_detach(client: Client, vm: str, lab: LabVm, bus: str, n: int) -> dict[str, Any]:
    before = lab.guest_pci() or set()
    funcs = [{"id": f"{bus}-f{i}", "driver": "virtio-rng-pci" if i else "e1000"}
             for i in range(n)]
    reply: dict[str, Any] = await client.execute("device-attach",
                                                 {"vm": vm, "functions": funcs, "bus": bus})
    assert reply["bus"] == bus
    after = await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) >= n, 60)
    assert list(slot_groups(after - before).values()) == [set(range(n))]
    await client.execute("device-detach", {"vm": vm, "ids": [f["id"] for f in funcs]})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30)
    return reply


async def test_switch_downstream_ports_are_hotpluggable(client: Client,
                                                        switch_vm: LabVm) -> None:
    slots = await client.execute("query-slots", {"vm": "topo-switch"})
    hot = {s["bus"] for s in slots if s["hotpluggable"]}
    assert {"dn1", "dn2"} <= hot and "up1" not in hot
    reply = await attach_detach(client, "topo-switch", switch_vm, "dn2", 4)
    assert reply["policy"] == "pcie-native" and reply["slot"] == 0


async def test_automatic_slot_choice_reaches_downstream_ports(client: Client,
                                                              switch_vm: LabVm) -> None:
    """No bus given: qmpfd finds a downstream port by itself, and the guest sees the device
    there (not only a plan that says so)."""
    before = switch_vm.guest_pci() or set()
    funcs = [{"id": "a0", "driver": "e1000"}, {"id": "a1", "driver": "e1000"}]
    reply = await client.execute("device-attach", {"vm": "topo-switch", "functions": funcs})
    assert reply["bus"] in {"dn1", "dn2"}
    after = await asyncio.to_thread(switch_vm.wait_guest_pci,
                                    lambda s: len(s - before) >= 2, 60)
    assert list(slot_groups(after - before).values()) == [{0, 1}]
    peripheral, _ = await qemu_view(switch_vm)
    assert {"a0", "a1"} <= peripheral                       # QEMU's own view agrees
    await client.execute("device-detach", {"vm": "topo-switch", "ids": ["a0", "a1"]})
    await asyncio.to_thread(switch_vm.wait_guest_pci, lambda s: s == before, 30)


async def test_pci_bridge_behind_root_port(client: Client, bridge_vm: LabVm) -> None:
    slots = await client.execute("query-slots", {"vm": "topo-bridge"})
    bridge_slots = [s for s in slots if s["bus"] == "brp1"]
    assert len(bridge_slots) == 32 and all(s["hotpluggable"] for s in bridge_slots)
    reply = await attach_detach(client, "topo-bridge", bridge_vm, "brp1", 3)
    assert reply["policy"] == "acpi-pcihp"
