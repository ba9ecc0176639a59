"""What the fault tests check after each fault: QEMU (its second monitor), the guest and qmpfd
agree, every slot all or nothing; and the row each adds to the printed matrix."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qemu.qmp import ExecuteError

from lab.vm import LabVm, slot_groups
from tests.integration.conftest import Client, connect, qemu_view
from tests.integration.faults_support import MATRIX, DaemonProcess, MatrixRow

FUNCS = [{"id": f"ff{i}", "driver": d} for i, d in
         enumerate(["e1000", "virtio-rng-pci", "virtio-net-pci", "virtio-rng-pci"])]
IDS = {f["id"] for f in FUNCS}


async def adopt(d: DaemonProcess, qmp: Path, name: str = "f") -> Client:
    c = await connect(d.socket)
    await c.execute("vm-add", {"name": name, "qmp": str(qmp)})
    return c


async def settled(c: Client, timeout: float = 60) -> None:
    """Wait until qmpfd has no operation in flight."""
    async def poll() -> None:
        while await c.execute("query-operations"):  # noqa: ASYNC110 - polling qmpfd itself
            await asyncio.sleep(0.2)
    await asyncio.wait_for(poll(), timeout)


async def agreement(c: Client, lab: LabVm, before: set[str], vm: str = "f",
                    expect_attached: bool = False,
                    ids: set[str] = IDS) -> tuple[str, str, str]:
    """Check QEMU, guest and qmpfd agree: all functions (``ids``, function i named ...i) in
    one slot, or none anywhere."""
    peripheral, in_pci = await qemu_view(lab)
    in_qemu = ids & peripheral
    in_pci_ids = ids & in_pci
    slots = await c.execute("query-slots", {"vm": vm})
    in_qmpfd = {f["id"] for s in slots for f in s["functions"]} & ids
    if expect_attached:
        seen = await asyncio.to_thread(lab.wait_guest_pci,
                                       lambda s: len(s - before) >= len(ids), 60)
        groups = slot_groups(seen - before)
        assert list(groups.values()) == [set(range(len(ids)))], groups
        assert in_qemu == in_pci_ids == in_qmpfd == ids
        return await observed(c, lab, before, ids, vm)
    seen = await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30)
    assert seen == before
    assert not in_qemu and not in_pci_ids, f"left in QEMU: {in_qemu | in_pci_ids}"
    assert not in_qmpfd
    return await observed(c, lab, before, ids, vm)


async def observed(c: Client, lab: LabVm, before: set[str], ids: set[str],
                   vm: str = "f") -> tuple[str, str, str]:
    """The matrix cells as seen, not as hoped: QEMU's own view (second monitor), the guest's
    latest report against ``before``, and qmpfd's slots and operations for ``ids``."""
    peripheral, in_pci = await qemu_view(lab)
    held = ids & (peripheral | in_pci)
    qemu = ("none" if not held else f"all {len(ids)} present" if held == ids
            else f"only {', '.join(sorted(held))}")
    seen = lab.guest_pci() or set()
    groups = slot_groups(seen - before)
    guest = ("unchanged" if seen == before else
             f"{len(next(iter(groups.values())))} functions, one slot" if len(groups) == 1
             else f"{len(seen - before)} new in {len(groups)} slots")
    try:
        slots = await c.execute("query-slots", {"vm": vm})
    except ExecuteError as exc:
        if exc.error_class != "NotFound":
            raise
        return qemu, guest, "VM not managed"
    mine = {f["id"]: f["state"] for s in slots for f in s["functions"] if f["id"] in ids}
    ops = await c.execute("query-operations", {"vm": vm})
    qmpfd = ("no slot" if not mine else f"slot {'/'.join(sorted(set(mine.values())))}") + (
        ", no operation" if not ops else f", {len(ops)} operation(s)")
    return qemu, guest, qmpfd


async def cleanup(c: Client, lab: LabVm, before: set[str], ids: set[str] = IDS) -> None:
    await c.execute("device-detach", {"vm": "f", "ids": sorted(ids)})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30)


def record(fault: str, expected: str, view: tuple[str, str, str]) -> None:
    MATRIX.append(MatrixRow(fault, expected, *view, "pass"))
