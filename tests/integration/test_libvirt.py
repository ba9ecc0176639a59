"""A VM libvirt runs: qmpfd adopts it through libvirt's own QEMU monitor passthrough
and monitor events (no XML edited), attaches a 4-function device that the guest sees in one
slot, libvirt's own `virsh attach-interface` still works and lands elsewhere, and qmpfd detaches
the whole slot. Real libvirtd (started by the test: the machine's, 9.0 on Debian 12, and Debian
13's 11.3 under scripts/other-python) and a real guest."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from lab.libvirt import LibvirtGuest
from lab.vm import slot_groups
from qmpfd.client import Client as TypedClient
from tests.integration.conftest import connect
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration

FUNCS = [{"id": f"lv{i}", "driver": d} for i, d in
         enumerate(["e1000", "virtio-rng-pci", "virtio-net-pci", "virtio-rng-pci"])]


BRIDGE = "qmpfdlvbr0"


@pytest.fixture(scope="module")
def bridge() -> Iterator[str]:
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=False)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    yield BRIDGE
    subprocess.run(["ip", "link", "del", BRIDGE], check=False)


@pytest.fixture(scope="module")
def libvirt_guest(workdir: Path, bridge: str) -> Iterator[LibvirtGuest]:
    with LibvirtGuest("qmpfd-lab-lv", workdir / "libvirt") as guest:
        yield guest


async def test_libvirt_run_vm_attach_coexist_detach(tmp_path: Path,
                                                    libvirt_guest: LibvirtGuest) -> None:
    g = libvirt_guest
    before = await asyncio.to_thread(g.wait_guest_pci, lambda s: True, 5)
    d = DaemonProcess(tmp_path / "d")
    d.start()
    try:
        c = await connect(d.socket)
        # Adopted through the typed client library, which reaches libvirt-run VMs too.
        async with await TypedClient.open(str(d.socket)) as typed:
            info = await typed.vm_add("lv", libvirt=g.name)
        assert info.policy == "acpi-pcihp" and (info.machine or "").startswith("pc")
        vms = await c.execute("query-vms")
        assert vms[0]["qmp"] == f"libvirt:{g.name}" and vms[0]["connected"]
        reply = await c.execute("device-attach", {"vm": "lv", "functions": FUNCS})
        assert reply["slot"] == 31, "slots are taken from the top in libvirt-run VMs"
        seen = await asyncio.to_thread(g.wait_guest_pci, lambda s: len(s - before) >= 4, 120)
        assert sorted(len(x) for x in slot_groups(seen - before).values()) == [4]

        # libvirt's own hotplug still works and lands elsewhere (it allocates from the lowest
        # free address it knows, and qmpfd took the highest).
        # A bridge for it (virsh attach-interface has no user networking): libvirt makes a tap.
        out = await asyncio.to_thread(g.virsh, "attach-interface", g.name, "bridge", BRIDGE,
                                      "--model", "e1000", "--live")
        assert out.returncode == 0, out.stderr
        with_nic = await asyncio.to_thread(g.wait_guest_pci,
                                           lambda s: len(s - before) >= 5, 120)
        groups = slot_groups(with_nic - before)
        assert sorted(len(x) for x in groups.values()) == [1, 4], groups
        xml = (await asyncio.to_thread(g.virsh, "dumpxml", g.name)).stdout
        assert "<interface type='bridge'>" in xml and "lv0" not in xml   # libvirt's view

        # Rollback through libvirt: a bad property on function 2 leaves nothing behind
        # (QEMU's own view, asked through virsh, is the referee).
        with pytest.raises(ExecuteError) as err:
            await c.execute("device-attach", {"vm": "lv", "functions": [
                {"id": "rb0", "driver": "e1000"}, {"id": "rb1", "driver": "virtio-rng-pci"},
                {"id": "rb2", "driver": "virtio-rng-pci", "properties": {"rng": "nosuch"}}]})
        assert "rolled back" in str(err.value)
        qom = (await asyncio.to_thread(g.virsh, "qemu-monitor-command", g.name,
                                       '{"execute":"qom-list","arguments":'
                                       '{"path":"/machine/peripheral"}}')).stdout
        assert "rb0" not in qom and "rb1" not in qom and "lv0" in qom

        # Recovery: qmpfd killed and started again re-adopts the VM through libvirt.
        assert d.proc is not None
        await c.qmp.disconnect()
        d.proc.kill()
        d.wait_killed()
        d.start()
        c = await connect(d.socket)
        vms = await c.execute("query-vms")
        assert vms[0]["qmp"] == f"libvirt:{g.name}" and vms[0]["connected"], vms
        # libvirtd's own view: the new daemon is its client, the killed one is not.
        assert d.proc is not None
        assert d.proc.pid in await asyncio.to_thread(libvirt_client_pids, g), \
            "the restarted qmpfd holds no connection to libvirtd"
        # QEMU's view, through libvirt: slot 31 still holds exactly what qmpfd says it does.
        pci = json.loads((await asyncio.to_thread(
            g.virsh, "qemu-monitor-command", g.name, '{"execute":"query-pci"}')).stdout)
        in_31 = {dev["qdev_id"] for bus in pci["return"] for dev in bus["devices"]
                 if dev["slot"] == 31}
        assert in_31 == {f["id"] for f in FUNCS}, in_31

        # qmpfd sees libvirt's NIC in QEMU (an event and a refresh), and detaches its slot.
        slots = await c.execute("query-slots", {"vm": "lv", "refresh": True})
        ours = next(s for s in slots if s["slot"] == 31)
        assert sorted(f["id"] for f in ours["functions"]) == sorted(f["id"] for f in FUNCS)
        await c.execute("device-detach", {"vm": "lv", "ids": [f["id"] for f in FUNCS]})
        after = await asyncio.to_thread(g.wait_guest_pci,
                                        lambda s: len(s - before) == 1, 120)
        assert sorted(len(x) for x in slot_groups(after - before).values()) == [1]
        qom = (await asyncio.to_thread(g.virsh, "qemu-monitor-command", g.name,
                                       '{"execute":"qom-list","arguments":'
                                       '{"path":"/machine/peripheral"}}')).stdout
        assert not [f["id"] for f in FUNCS if f'"{f["id"]}"' in qom], qom
        await c.execute("vm-remove", {"name": "lv"})
        await c.qmp.disconnect()
    finally:
        d.stop()


def libvirt_client_pids(g: LibvirtGuest) -> set[int]:
    """The process ids of libvirtd's connected clients, as libvirtd itself reports them
    (virt-admin over its admin socket)."""
    listed = subprocess.run(["virt-admin", "client-list", "libvirtd"], capture_output=True,
                            text=True, timeout=30, check=True).stdout
    pids = set()
    for line in listed.splitlines()[2:]:
        if not line.split():
            continue
        info = subprocess.run(["virt-admin", "client-info", "libvirtd", line.split()[0]],
                              capture_output=True, text=True, timeout=30).stdout
        for row in info.splitlines():
            key, _, value = row.partition(":")
            if key.strip() == "unix_process_id":
                pids.add(int(value))
    return pids
