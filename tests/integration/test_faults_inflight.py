"""Fault rows for work in flight, each against a real `pc` guest with QEMU's own view
(second monitor) as referee:

- a ``device_add`` whose reply comes after the plug timeout (``timeout: 0.001``): the reply never
  says "rolled back" while QEMU holds a function, and the ids are free afterwards;
- ``vm-remove`` during an attach: refused with Conflict naming the operation; with ``force`` the
  attach settles first and the reply says how;
- QEMU's monitor stalled mid-attach: the outcome is announced once QEMU answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec, slot_groups
from tests.integration.conftest import connect, qemu_execute, qemu_view, start_lab_vm
from tests.integration.fault_checks import (
    FUNCS,
    IDS,
    DaemonProcess,
    adopt,
    agreement,
    cleanup,
    observed,
    record,
    settled,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "inflight-pc", LabVmSpec(machine="pc"))
    yield vm
    vm.stop()


@pytest.fixture(scope="module")
def native_lab(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "inflight-native", LabVmSpec(machine="q35-native", root_ports=2))
    yield vm
    vm.stop()


@pytest.mark.parametrize("machine", ["pc", "q35-native"])
async def test_device_add_answered_after_the_timeout(daemon_proc: DaemonProcess,
                                                     request: pytest.FixtureRequest,
                                                     machine: str) -> None:
    """On pc the late function would stay in a slot without function 0; on q35 native a middle
    function did. Either way: nothing stays, and the reply says so only when it is true."""
    lab: LabVm = request.getfixturevalue("lab" if machine == "pc" else "native_lab")
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    daemon_proc.start()
    c = await adopt(daemon_proc, lab.qmp_socket)
    for attempt in range(3):
        with pytest.raises(ExecuteError) as err:
            await c.execute("device-attach", {"vm": "f", "functions": FUNCS, "timeout": 0.001})
        desc = str(err.value)
        assert err.value.error_class == "Timeout", desc
        peripheral, in_pci = await qemu_view(lab)
        if desc.endswith("rolled back"):
            # The reply says rolled back: QEMU must hold nothing of the request right now.
            assert not IDS & (peripheral | in_pci), (attempt, desc, IDS & peripheral)
        else:
            assert "rollback still waiting" in desc, desc
        await settled(c)
        view = await agreement(c, lab, before)
    record(f"device_add answered after the plug timeout (timeout 0.001, {machine})",
           "Timeout; nothing left; ids free", view)
    # The ids are free again: the same request without the tiny timeout works.
    await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
    await agreement(c, lab, before, expect_attached=True)
    await cleanup(c, lab, before)


async def test_vm_remove_during_an_attach(daemon_proc: DaemonProcess, lab: LabVm) -> None:
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    daemon_proc.start(QMPFD_PAUSE_AT="attach-step-2", QMPFD_PAUSE_SECONDS="3")
    c = await adopt(daemon_proc, lab.qmp_socket)
    attach = asyncio.create_task(c.execute("device-attach", {"vm": "f", "functions": FUNCS}))
    other = await connect(daemon_proc.socket)
    await daemon_proc.at_pause()         # functions 1-3 are in QEMU, function 0 is not yet
    peripheral, _ = await qemu_view(lab)
    assert IDS & peripheral and "ff0" not in peripheral
    with pytest.raises(ExecuteError) as err:
        await other.execute("vm-remove", {"name": "f"})
    assert err.value.error_class == "Conflict"
    assert "attach operation" in str(err.value) and "force" in str(err.value), str(err.value)
    assert [v["name"] for v in await other.execute("query-vms")] == ["f"]
    removed = await other.execute("vm-remove", {"name": "f", "force": True})
    (st,) = removed["settled"]
    assert st["kind"] == "attach" and st["outcome"] == "completed", removed
    assert sorted(st["ids"]) == sorted(IDS)
    result = await attach                 # the attach itself finished and says so
    assert sorted(f["id"] for f in result["functions"]) == sorted(IDS)
    assert await other.execute("query-vms") == []
    # QEMU and the guest hold the whole slot; adopting the VM again shows it present.
    await other.execute("vm-add", {"name": "f", "qmp": str(lab.qmp_socket)})
    view = await agreement(other, lab, before, expect_attached=True)
    record("vm-remove during an attach", "Conflict; force settles it (completed)", view)
    await cleanup(other, lab, before)
    for cl in (c, other):
        await cl.qmp.disconnect()


def cold_plug_args(bus: str) -> list[str]:
    """The four functions of FUNCS on ``bus``, on QEMU's command line (as a management plane
    restarting a VM from its config would start it)."""
    args: list[str] = []
    for fn, f in enumerate(FUNCS):
        extra = ",multifunction=on" if fn == 0 else ""
        args += ["-device", f"{f['driver']},id={f['id']},bus={bus},addr=0.{fn}{extra}"]
    return args


async def test_qemu_restarted_with_the_devices_during_a_detach(daemon_proc: DaemonProcess,
                                                               workdir: Path) -> None:
    """A native-PCIe detach is in its 5 s attention-button window when QEMU is killed; QEMU
    comes back with the same four functions on its command line. The pending unplug ends as
    failed (event, query-operations {ended}), the slot is present, and a new detach works."""
    spec = LabVmSpec(machine="q35-native", root_ports=2)
    vm = start_lab_vm(workdir, "restart-native", spec)
    try:
        before = await asyncio.to_thread(vm.wait_guest_pci, lambda s: True, 5)
        daemon_proc.start()
        c = await adopt(daemon_proc, vm.qmp_socket, name="r")
        reply = await c.execute("device-attach", {"vm": "r", "functions": FUNCS})
        await asyncio.to_thread(vm.wait_guest_pci, lambda s: len(s - before) >= 4, 60)
        detach = asyncio.create_task(c.execute("device-detach", {"vm": "r", "ids": sorted(IDS)}))
        await asyncio.sleep(1.5)          # device_del sent; the guest waits out its 5 s window
        assert not detach.done()
        vm.proc.kill()                    # type: ignore[union-attr]
        vm.proc.wait()                    # type: ignore[union-attr]
        with pytest.raises(ExecuteError):
            await detach
        restarted = LabVm(vm.name, vm.workdir, LabVmSpec(
            machine="q35-native", root_ports=2, extra=cold_plug_args(reply["bus"])))
        await asyncio.to_thread(restarted.start)
        vm = restarted
        event = await c.wait_event("SLOT_DETACH_FAILED", 60)
        assert sorted(event["data"]["ids"]) == sorted(IDS)
        assert "restarted" in event["data"]["reason"]
        await settled(c)
        ended = await c.execute("query-operations", {"vm": "r", "ended": True})
        assert [(e["kind"], e["outcome"]) for e in ended] == [("detach", "failed")], ended
        slots = await c.execute("query-slots", {"vm": "r"})
        mine = next(s for s in slots if (s["bus"], s["slot"]) == (reply["bus"], reply["slot"]))
        assert {f["state"] for f in mine["functions"]} == {"present"}
        fresh_before = set(before)
        seen = await asyncio.to_thread(vm.wait_guest_pci, lambda s: len(s - fresh_before) >= 4,
                                       60)
        assert sorted(len(g) for g in slot_groups(seen - fresh_before).values()) == [4]
        peripheral, in_pci = await qemu_view(vm)
        assert IDS <= peripheral and IDS <= in_pci
        view = await observed(c, vm, fresh_before, IDS, vm="r")
        assert view == ("all 4 present", "4 functions, one slot", "slot present, no operation")
        record("QEMU killed mid-detach, restarted with the devices on its command line",
               "detach failed (event); slot present; detach works", view)
        # And a new detach works.
        await c.execute("device-detach", {"vm": "r", "ids": sorted(IDS)})
        await asyncio.to_thread(vm.wait_guest_pci, lambda s: s == fresh_before, 60)
        peripheral, in_pci = await qemu_view(vm)
        assert not IDS & (peripheral | in_pci)
        await c.qmp.disconnect()
    finally:
        vm.stop()


async def test_monitor_stalled_mid_attach(tmp_path: Path, lab: LabVm) -> None:
    """QEMU stops answering (SIGSTOP) while an attach runs: the client hears Timeout saying
    the outcome is not known yet, the operation stays in flight, and once QEMU answers again
    (it then carries out the device_adds it had queued) qmpfd takes the slot back, ends the
    operation and announces it. QEMU, guest and qmpfd agree; the ids are free."""
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    d = DaemonProcess(tmp_path / "qmpfd", extra_config="[timeouts]\ncommand = 2\n")
    d.start()
    try:
        c = await adopt(d, lab.qmp_socket)
        assert lab.proc is not None
        os.kill(lab.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ExecuteError) as err:
                await c.execute("device-attach", {"vm": "f", "functions": FUNCS, "timeout": 1})
            assert err.value.error_class == "Timeout"
            assert "not known yet" in str(err.value), err.value
            ops = await c.execute("query-operations")
            assert [o["kind"] for o in ops] == ["attach"], ops
        finally:
            os.kill(lab.proc.pid, signal.SIGCONT)
        event = await c.wait_event("SLOT_ATTACH_FAILED", timeout=120)
        assert sorted(event["data"]["ids"]) == sorted(IDS)
        await settled(c)
        view = await agreement(c, lab, before)
        record("QEMU's monitor stalled mid-attach (SIGSTOP), then answers",
               "Timeout (outcome unknown); rolled back when QEMU answers", view)
        await c.execute("device-attach", {"vm": "f", "functions": FUNCS})   # ids free again
        await agreement(c, lab, before, expect_attached=True)
        await cleanup(c, lab, before)
    finally:
        d.stop()


async def test_slot_emptied_while_the_detach_is_recorded(tmp_path: Path, lab: LabVm) -> None:
    """The slot's functions leave QEMU (here a raw device_del on QEMU's other monitor; the
    guest ejecting it is the same to qmpfd) while the detach's record is being written: the
    detach ends as done, nothing stays in flight, the VM can be removed."""
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    d = DaemonProcess(tmp_path / "qmpfd")
    d.start(QMPFD_PAUSE_AT="detach-recording", QMPFD_PAUSE_SECONDS="4")
    try:
        c = await adopt(d, lab.qmp_socket)
        await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
        await agreement(c, lab, before, expect_attached=True)
        detach = asyncio.create_task(c.execute("device-detach", {"vm": "f", "ids": sorted(IDS)}))
        await d.at_pause()
        await qemu_execute(lab, "device_del", {"id": "ff0"})
        reply = await asyncio.wait_for(detach, 60)
        assert sorted(reply["ids"]) == sorted(IDS)
        await settled(c, 10)
        view = await agreement(c, lab, before)
        await c.execute("vm-remove", {"name": "f"})
        record("slot emptied while its detach is being recorded", "detach done; nothing "
               "in flight; vm-remove works", view)
    finally:
        d.stop()
