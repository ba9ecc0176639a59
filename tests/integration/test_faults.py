"""Fault-injection matrix: crashes, QEMU dying, cut QMP sockets, refused functions and
guests that do not answer, each against a real guest. After every fault, QEMU's own view, the
guest's PCI list and qmpfd's state must agree, and no slot may be half-plugged.

The matrix is printed at the end of the test run (tests/conftest.py) and copied into docs/faults.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec, slot_groups
from tests.integration.conftest import (
    Client,
    connect,
    qemu_execute,
    qemu_view,
    refused_by_qemu,
    start_lab_vm,
)
from tests.integration.fault_checks import (
    FUNCS,
    IDS,
    adopt,
    agreement,
    cleanup,
    observed,
    record,
    settled,
)
from tests.integration.faults_support import DaemonProcess, QmpPipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "faults-pc", LabVmSpec(machine="pc"))
    yield vm
    vm.stop()


async def killed_by(daemon_proc: DaemonProcess, c: Client, cmd: str,
                    args: dict[str, Any], *, answered: bool = False) -> Client:
    """Send a request the daemon dies in (its QMPFD_CRASH_AT point), start it again on the
    same state, and return a client once recovery has settled. ``answered``: the point comes
    after QEMU carried the request out, where qmpfd has answered it already (an attach is
    answered when QEMU accepts its last device_add): the success reply must arrive before
    the connection dies; elsewhere no reply may."""
    if answered:
        assert await c.execute(cmd, args), "QEMU carried it out: the client was told so"
        await asyncio.to_thread(daemon_proc.wait_killed)
    else:
        with pytest.raises(Exception):  # noqa: B017 - the connection dies with the daemon
            await c.execute(cmd, args)
    assert daemon_proc.wait_killed() == -9
    with contextlib.suppress(Exception):
        await c.qmp.disconnect()
    daemon_proc.start()
    c = await connect(daemon_proc.socket)
    await settled(c)
    return c


@pytest.mark.parametrize("point", ["attach-begin", "attach-step-1", "attach-step-2",
                                   "attach-step-3", "attach-step-4"])
async def test_sigkill_during_attach(daemon_proc: DaemonProcess, lab: LabVm, point: str) -> None:
    before = lab.guest_pci() or set()
    daemon_proc.start(QMPFD_CRASH_AT=point)
    c = await adopt(daemon_proc, lab.qmp_socket)
    complete = point == "attach-step-4"  # function 0 was in: the attach had finished in QEMU
    c = await killed_by(daemon_proc, c, "device-attach", {"vm": "f", "functions": FUNCS},
                        answered=complete)
    view = await agreement(c, lab, before, expect_attached=complete)
    record(f"SIGKILL qmpfd at {point}", "completed" if complete else "rolled back", view)
    if complete:
        await cleanup(c, lab, before)
    await c.qmp.disconnect()


@pytest.mark.parametrize("point", ["attach-begin", "attach-step-1", "attach-ended"])
async def test_sigkill_during_a_one_function_attach(daemon_proc: DaemonProcess, lab: LabVm,
                                                    point: str) -> None:
    """A 1-function attach syncs nothing before its device_add (QEMU holds the whole slot or
    nothing): killed at any point, the slot is whole or absent, and the restarted qmpfd reads
    back what QEMU holds. Referees: QEMU's second monitor and the guest."""
    before = lab.guest_pci() or set()
    daemon_proc.start(QMPFD_CRASH_AT=point)
    c = await adopt(daemon_proc, lab.qmp_socket)
    complete = point != "attach-begin"      # device_add was accepted: QEMU has the slot
    c = await killed_by(daemon_proc, c, "device-attach", {"vm": "f", "functions": [
        {"id": "one0", "driver": "e1000"}]}, answered=complete)
    view = await agreement(c, lab, before, expect_attached=complete, ids={"one0"})
    record(f"SIGKILL qmpfd at {point} (1 function, no sync)",
           "slot whole, read back" if complete else "nothing in QEMU", view)
    if complete:
        await cleanup(c, lab, before, {"one0"})
    await c.qmp.disconnect()


@pytest.mark.parametrize("point", ["detach-begin", "detach-sent"])
async def test_sigkill_during_detach(daemon_proc: DaemonProcess, lab: LabVm, point: str) -> None:
    before = lab.guest_pci() or set()
    daemon_proc.start(QMPFD_CRASH_AT=point)
    c = await adopt(daemon_proc, lab.qmp_socket)
    await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) >= 4, 60)
    c = await killed_by(daemon_proc, c, "device-detach", {"vm": "f", "ids": sorted(IDS)})
    # ACPI: the detach's record is not synced before device_del (a second ACPI device_del
    # never cancels the first). Killed before device_del, nothing happened: the slot is whole,
    # in QEMU, the guest and qmpfd. Killed after it, the guest's eject completes it.
    sent = point == "detach-sent"
    record(f"SIGKILL qmpfd at {point}", "detach completed" if sent else "slot kept whole",
           await agreement(c, lab, before, expect_attached=not sent))
    if not sent:
        await cleanup(c, lab, before)
    await c.qmp.disconnect()


@pytest.mark.parametrize("bad", [0, 1, 2, 3])
async def test_device_add_fails_at_each_function(daemon_proc: DaemonProcess, lab: LabVm,
                                                 bad: int) -> None:
    before = lab.guest_pci() or set()
    daemon_proc.start()
    c = await adopt(daemon_proc, lab.qmp_socket)
    funcs: list[dict[str, Any]] = [dict(f) for f in FUNCS]
    funcs[bad]["properties"] = refused_by_qemu(funcs[bad]["driver"])
    with pytest.raises(ExecuteError) as err:
        await c.execute("device-attach", {"vm": "f", "functions": funcs})
    assert err.value.error_class == "QemuError" and f"ff{bad}" in str(err.value)
    assert await c.execute("query-operations") == []
    record(f"device_add of function {bad} refused", "rolled back",
           await agreement(c, lab, before))
    await c.qmp.disconnect()


async def test_qemu_killed_mid_attach(daemon_proc: DaemonProcess, workdir: Path) -> None:
    lab = start_lab_vm(workdir, "faults-killed", LabVmSpec(machine="pc"))
    try:
        daemon_proc.start(QMPFD_PAUSE_AT="attach-step-2", QMPFD_PAUSE_SECONDS="3")
        c = await adopt(daemon_proc, lab.qmp_socket, name="k")
        attach = asyncio.create_task(c.execute("device-attach", {"vm": "k",
                                                                 "functions": FUNCS}))
        await daemon_proc.at_pause()   # qmpfd is paused after the second device_add
        lab.stop()                # QEMU dies with two hidden functions
        with pytest.raises(ExecuteError) as err:
            await attach
        assert "connection lost" in str(err.value) or "not connected" in str(err.value)
        vms = await c.execute("query-vms")
        assert vms[0]["connected"] is False
        lab.start()               # the VM comes back on the same socket
        await c.wait_event("VM_RECONNECTED", 60)
        await settled(c)
        assert (await c.execute("query-vms"))[0]["connected"] is True
        peripheral, _ = await qemu_view(lab)
        assert not IDS & peripheral
        slots = await c.execute("query-slots", {"vm": "k"})
        assert not {f["id"] for s in slots for f in s["functions"]} & IDS
        fresh = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
        view = await observed(c, lab, fresh, IDS, vm="k")
        assert view == ("none", "unchanged", "no slot, no operation"), view
        record("QEMU killed mid-attach, then restarted", "attach fails; reconnect", view)
        await c.qmp.disconnect()
    finally:
        lab.stop()


async def test_qmp_socket_closed_mid_detach(daemon_proc: DaemonProcess, lab: LabVm) -> None:
    before = lab.guest_pci() or set()
    pipe = QmpPipe(daemon_proc.workdir / "pipe.qmp", lab.qmp_socket)
    pipe.start()
    daemon_proc.start()
    c = await adopt(daemon_proc, pipe.listen)
    await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) >= 4, 60)
    await qemu_execute(lab, "stop")  # the guest will not answer until we say so
    try:
        detach = asyncio.create_task(c.execute("device-detach", {"vm": "f",
                                                                 "ids": sorted(IDS)}))
        await asyncio.sleep(1.0)
        pipe.cut()
        with pytest.raises(ExecuteError) as err:
            await detach
        assert "connection lost" in str(err.value)
        assert (await c.execute("query-vms"))[0]["connected"] is False
        ops = await c.execute("query-operations")
        assert [o["kind"] for o in ops] == ["detach"]
    finally:
        await qemu_execute(lab, "cont")  # the guest ejects while qmpfd cannot hear it
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30)
    pipe.start()
    event = await c.wait_event("SLOT_DETACHED", 60)
    assert event["data"].get("recovered") is True
    await settled(c)
    record("QMP socket closed mid-detach", "detach completed on reconnect",
           await agreement(c, lab, before))
    pipe.cut()
    await c.qmp.disconnect()


async def attached_then_paused(d: DaemonProcess, lab: LabVm) -> tuple[Client, set[str]]:
    """A fresh qmpfd holding the lab VM with the 4 functions attached, and the guest paused."""
    before = lab.guest_pci() or set()
    d.start()
    c = await adopt(d, lab.qmp_socket)
    await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) >= 4, 60)
    await qemu_execute(lab, "stop")
    return c, before


async def completes_later(c: Client, lab: LabVm, before: set[str], fault: str,
                          expected: str) -> None:
    """The guest runs again: the pending unplug completes and everything agrees."""
    await c.wait_event("SLOT_DETACHED", 60)
    await settled(c)
    record(fault, expected, await agreement(c, lab, before))
    await c.qmp.disconnect()


async def test_guest_ignores_unplug(daemon_proc: DaemonProcess, lab: LabVm) -> None:
    c, before = await attached_then_paused(daemon_proc, lab)
    try:
        with pytest.raises(ExecuteError) as err:
            await c.execute("device-detach", {"vm": "f", "ids": sorted(IDS), "timeout": 1})
        assert err.value.error_class == "Timeout"
        with pytest.raises(ExecuteError) as again:  # never a second request for the slot
            await c.execute("device-detach", {"vm": "f", "ids": sorted(IDS), "force": True})
        assert again.value.error_class == "Conflict"
    finally:
        await qemu_execute(lab, "cont")
    await completes_later(c, lab, before, "guest ignores unplug (paused)",
                          "Timeout; completes later")


async def test_force_detach_returns_at_once_for_paused_guest(daemon_proc: DaemonProcess,
                                                             lab: LabVm) -> None:
    c, before = await attached_then_paused(daemon_proc, lab)
    try:
        reply = await c.execute("device-detach", {"vm": "f", "ids": sorted(IDS),
                                                  "force": True})
        assert reply["unplugging"] is True
        slots = await c.execute("query-slots", {"vm": "f"})
        assert {f["state"] for s in slots for f in s["functions"] if f["id"] in IDS} == {
            "unplugging"}
    finally:
        await qemu_execute(lab, "cont")
    await completes_later(c, lab, before, "force detach, paused guest",
                          "returns at once; completes later")


QUEUED = {"vm": "f", "id": "qf1", "driver": "virtio-rng-pci", "bus": "pci.0", "slot": 0x10,
          "function": 1}
HEAD = {**QUEUED, "id": "qf0", "driver": "e1000", "function": 0}


@pytest.mark.parametrize("point", [None, "attach-begin"])
async def test_queued_function_survives_sigkill(daemon_proc: DaemonProcess, lab: LabVm,
                                                point: str | None) -> None:
    """A function queued by function-add is in the journal: after SIGKILL (while queued, or
    while function 0 was flushing the queue) the restarted qmpfd still lists it, and function 0
    then brings both functions into the slot, never function 0 alone."""
    before = lab.guest_pci() or set()
    daemon_proc.start(**({"QMPFD_CRASH_AT": point} if point else {}))
    c = await adopt(daemon_proc, lab.qmp_socket)
    assert (await c.execute("function-add", QUEUED))["queued"] is True
    if point is None:
        assert daemon_proc.proc is not None
        daemon_proc.proc.kill()
    else:
        with pytest.raises(Exception):  # noqa: B017 - the connection dies with the daemon
            await c.execute("function-add", HEAD)
    assert daemon_proc.wait_killed() == -9
    with contextlib.suppress(Exception):
        await c.qmp.disconnect()
    daemon_proc.start()
    c = await connect(daemon_proc.socket)
    await settled(c)
    pending = await c.execute("query-pending", {"vm": "f"})
    assert [[f["id"] for f in p["functions"]] for p in pending] == [["qf1"]]
    peripheral, _ = await qemu_view(lab)
    assert not {"qf0", "qf1"} & peripheral  # queued means: not in QEMU
    reply = await c.execute("function-add", HEAD)
    assert reply["queued"] is False
    assert sorted(f["id"] for f in reply["functions"]) == ["qf0", "qf1"]
    seen = await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) >= 2, 60)
    assert list(slot_groups(seen - before).values()) == [{0, 1}]
    view = await observed(c, lab, before, {"qf0", "qf1"})
    assert view == ("all 2 present", "2 functions, one slot", "slot present, no operation"), view
    record("SIGKILL qmpfd with a function queued" + (" mid-flush" if point else ""),
           "queue kept (not in QEMU); function 0 flushes it", view)
    await c.execute("device-detach", {"vm": "f", "ids": ["qf0", "qf1"]})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30)
    assert await c.execute("query-pending") == []
    await c.qmp.disconnect()
