"""What qmpfd sends QEMU, counted by a logging proxy on the QMP socket (not by qmpfd): with the
topology kept in memory, an N-function attach is N ``device_add``s and nothing else, a whole-slot
detach is the policy's ``device_del``s and nothing else; and changes made behind qmpfd's back on
a second monitor do not fool its planning. Each proven with the guest's own PCI list.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from lab.qmp_proxy import QmpProxy
from lab.vm import LabVm, LabVmSpec, slot_groups
from tests.integration.conftest import Client, connect, qemu_execute, qemu_view, start_lab_vm
from tests.integration.faults_support import MATRIX, MatrixRow

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "count-pc", LabVmSpec(machine="pc"))
    yield vm
    vm.stop()


@pytest.fixture
async def proxied(daemon: Path, lab: LabVm, workdir: Path
                  ) -> AsyncIterator[tuple[Client, QmpProxy]]:
    proxy = QmpProxy(workdir / "count-pc.proxy", lab.qmp_socket)
    await proxy.start()
    c = await connect(daemon)
    await c.execute("vm-add", {"name": "count", "qmp": str(proxy.listen)})
    yield c, proxy
    await c.execute("vm-remove", {"name": "count"})
    await c.qmp.disconnect()
    await proxy.close()


def functions(n: int, prefix: str) -> list[dict[str, str]]:
    drivers = ["e1000", "virtio-rng-pci", "virtio-net-pci", "virtio-rng-pci"]
    return [{"id": f"{prefix}{i}", "driver": drivers[i % 4]} for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 4, 8])
async def test_attach_sends_n_device_adds_and_detach_only_the_policys_device_del(
        proxied: tuple[Client, QmpProxy], lab: LabVm, n: int) -> None:
    c, proxy = proxied
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    proxy.reset()
    attached = await c.execute("device-attach", {"vm": "count",
                                                 "functions": functions(n, f"c{n}x")})
    assert proxy.reset() == ["device_add"] * n
    seen = await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) == n, 60)
    assert list(slot_groups(seen - before).values()) == [set(range(n))]
    ids = [f["id"] for f in attached["functions"]]
    await c.execute("device-detach", {"vm": "count", "ids": ids})
    assert proxy.reset() == ["device_del"], "acpi-pcihp ejects the whole slot with one device_del"
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 60)


async def test_a_slot_taken_behind_qmpfds_back_is_replanned(proxied: tuple[Client, QmpProxy],
                                                            lab: LabVm) -> None:
    c, _ = proxied
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    plan = await c.execute("device-attach", {"vm": "count", "dry-run": True,
                                             "functions": functions(2, "bb")})
    # Another monitor takes exactly the slot qmpfd would choose.
    await qemu_execute(lab, "device_add", {"driver": "e1000", "id": "sneaky", "bus": plan["bus"],
                                           "addr": f"{plan['slot']:#04x}"})
    try:
        seen_before = len(c.events.history)
        result = await c.execute("device-attach", {"vm": "count",
                                                   "functions": functions(2, "bb")})
        assert (result["bus"], result["slot"]) != (plan["bus"], plan["slot"])
        # One request, one outcome: the refused first attempt is not announced as a failure.
        for _ in range(100):
            events = [e["event"] for e in c.events.history[seen_before:]]
            if "SLOT_ATTACHED" in events:
                break
            await asyncio.sleep(0.05)
        assert "SLOT_ATTACH_FAILED" not in events and "SLOT_ATTACHED" in events, events
        peripheral, _ = await qemu_view(lab)
        assert {"bb0", "bb1", "sneaky"} <= peripheral
        seen = await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) == 3, 60)
        assert sorted(len(f) for f in slot_groups(seen - before).values()) == [1, 2]
        slots = await c.execute("query-slots", {"vm": "count"})
        taken = next(s for s in slots if (s["bus"], s["slot"]) == (plan["bus"], plan["slot"]))
        assert [f["id"] for f in taken["functions"]] == ["sneaky"], "qmpfd re-read QEMU"
        # An id taken behind its back: a clear Conflict naming the field, nothing left behind.
        await qemu_execute(lab, "device_add", {"driver": "virtio-rng-pci", "id": "dup0"})
        with pytest.raises(ExecuteError) as err:
            await c.execute("device-attach", {"vm": "count", "functions": [
                {"id": "dup0", "driver": "virtio-rng-pci"}]})
        assert err.value.error_class == "Conflict" and "functions[0].id" in str(err.value)
        await c.execute("device-detach", {"vm": "count", "ids": ["bb0", "bb1"]})
    finally:
        for dev in ("sneaky", "dup0"):
            await qemu_execute(lab, "device_del", {"id": dev})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 60)
    peripheral, _ = await qemu_view(lab)
    assert not {"bb0", "bb1", "sneaky", "dup0"} & peripheral


async def test_query_slots_refresh_reads_qemu_again(proxied: tuple[Client, QmpProxy],
                                                    lab: LabVm) -> None:
    c, proxy = proxied
    proxy.reset()
    await c.execute("query-slots", {"vm": "count"})
    assert proxy.reset() == [], "query-slots answers from memory"
    await c.execute("query-slots", {"vm": "count", "refresh": True})
    assert "qom-list" in proxy.reset()


async def test_orphaned_slot_found_on_adopt_and_removed_by_detach(
        daemon: Path, lab: LabVm) -> None:
    """A slot holding a non-zero function without function 0 (invisible to the guest), left
    by something outside qmpfd: adopting the VM reports it; device-detach removes it."""
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    await qemu_execute(lab, "device_add", {"driver": "virtio-rng-pci", "id": "orphan1",
                                           "bus": "pci.0", "addr": "0x1e.0x1"})
    c = await connect(daemon)
    try:
        await c.execute("vm-add", {"name": "orph", "qmp": str(lab.qmp_socket)})
        ev = await c.wait_event("SLOT_ORPHANED", 10)
        assert ev["data"]["vm"] == "orph" and ev["data"]["slot"] == 0x1e
        assert ev["data"]["ids"] == ["orphan1"]
        slots = await c.execute("query-slots", {"vm": "orph"})
        s30 = next(s for s in slots if (s["bus"], s["slot"]) == ("pci.0", 0x1e))
        assert [(f["id"], f["state"]) for f in s30["functions"]] == [("orphan1", "orphaned")]
        await c.execute("device-detach", {"vm": "orph", "bus": "pci.0", "slot": 0x1e})
        peripheral, _ = await qemu_view(lab)
        assert "orphan1" not in peripheral
        assert await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30) == before
        MATRIX.append(MatrixRow("orphaned slot found on adopt", "SLOT_ORPHANED; detach removes",
                                "none after detach", "unchanged", "orphaned, then no slot",
                                "pass"))
    finally:
        await c.execute("vm-remove", {"name": "orph"})
        await c.qmp.disconnect()
