"""qmpfd.client as a management plane uses it, on a real guest: attach a display
function and its audio function as one slot, wait, detach; typed replies, errors as the
contract's exceptions, and the event iterator resuming after a reconnect without a gap."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.vm import LabVm, LabVmSpec, slot_groups
from qmpfd.client import Client, EventsLost, Unreachable, errors, models
from tests.integration.conftest import start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration

# A GPU and its HDMI audio function. On a host with the real device they are
# {"id": "gpu0", "host": "0000:01:00.0"} and {"id": "gpu0-audio", "host": "0000:01:00.1"};
# here two emulated functions stand in (QEMU's display devices cannot be hot-plugged).
GPU_AND_AUDIO = [{"id": "gpu0", "driver": "virtio-rng-pci"},
                 {"id": "gpu0-audio", "driver": "e1000"}]


@pytest.fixture(scope="module")
def guest(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "client-pc", LabVmSpec(machine="pc"))
    yield vm
    vm.stop()


async def test_a_plane_attaches_waits_and_detaches(tmp_path: Path, guest: LabVm) -> None:
    d = DaemonProcess(tmp_path / "d", access_config=f'qmp-dirs = ["{guest.workdir}"]',
                      daemon_config="event-ring = 64")
    d.start()
    try:
        before = await asyncio.to_thread(guest.wait_guest_pci, lambda s: True, 5)
        async with await Client.open(str(d.socket)) as qmpfd:
            vm = await qmpfd.vm_add("web1", str(guest.qmp_socket))
            assert isinstance(vm, models.Vm) and vm.policy == "acpi-pcihp"
            placed = await qmpfd.device_attach("web1", GPU_AND_AUDIO)
            assert [(f.id, f.function) for f in placed.functions] == [
                ("gpu0", 0), ("gpu0-audio", 1)]
            seen = await asyncio.to_thread(guest.wait_guest_pci,
                                           lambda s: len(s - before) >= 2, 60)
            assert list(slot_groups(seen - before).values()) == [{0, 1}]
            with pytest.raises(errors.Conflict) as err:     # ids already in use
                await qmpfd.device_attach("web1", GPU_AND_AUDIO)
            assert "gpu0" in err.value.desc
            with pytest.raises(errors.NotFound):
                await qmpfd.query_slots("nope")
            slots = await qmpfd.query_slots("web1")
            mine = next(s for s in slots if s.slot == placed.slot and s.bus == placed.bus)
            assert {f.state for f in mine.functions} == {"present"}
            events = qmpfd.events()
            attached = await asyncio.wait_for(anext(events), 10)
            last = (attached.boot, attached.seq)
            assert attached.event == "SLOT_ATTACHED"

        # The plane goes away; things happen; it comes back and resumes after its last event.
        async with await Client.open(str(d.socket)) as other:
            gone = await other.device_detach("web1", ids=["gpu0", "gpu0-audio"])
            assert isinstance(gone, models.Detached) and gone.seconds >= 0
        await asyncio.to_thread(guest.wait_guest_pci, lambda s: s == before, 60)
        async with await Client.open(str(d.socket)) as qmpfd:
            resumed = qmpfd.events(after=last)
            missed = await asyncio.wait_for(anext(resumed), 10)
            assert missed.event == "SLOT_DETACHED" and missed.seq == last[1] + 1
            with pytest.raises(EventsLost):                 # a boot that is over
                await anext(qmpfd.events(after=("an-old-boot", 1)))
            health = await qmpfd.query_health()
            assert health.status == "ok"
            await qmpfd.vm_remove("web1")
        with pytest.raises(Unreachable, match="cannot reach qmpfd"):
            await Client.open(str(tmp_path / "no.sock"))
    finally:
        d.stop()
