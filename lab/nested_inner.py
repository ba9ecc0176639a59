# ruff: noqa: ASYNC110, ASYNC220, ASYNC221 - a lab script: blocking calls and polling are fine
"""Runs inside the nested lab's L1 guest (see :mod:`lab.nested`): qmpfd and a second-level QEMU
on a real kernel with an emulated IOMMU. Prints one ``LAB5 {json}`` line per step.

First against an L2 QEMU held at start (-S): QEMU's own view and the L1 kernel's drivers. Then,
with LAB5_BOOT_L2 set, against an L2 whose guest boots (TCG inside TCG) and reports its own PCI
list: it must see two functions in one slot, and after detach none, with all four back on e1000e.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

SLOT = "0000:01:00"
#: The partial assignment: functions 1 and 2 to the guest, 0 and 3 held back (same IOMMU group).
PARTIAL = [{"id": "p1", "host": f"{SLOT}.1"}, {"id": "p2", "host": f"{SLOT}.2"},
           {"id": "u0", "host": f"{SLOT}.0", "unassigned": True},
           {"id": "u3", "host": f"{SLOT}.3", "unassigned": True}]
TMP = Path("/run/lab5")  # /tmp is the host's, read-only, in the lab


def report(step: str, **data: Any) -> None:
    print("LAB5 " + json.dumps({"step": step, **data}), flush=True)


def driver(address: str) -> str | None:
    try:
        return os.path.basename(os.readlink(Path("/sys/bus/pci/devices") / address / "driver"))
    except FileNotFoundError:       # unbound, or the link went away while being read
        return None


def drivers() -> dict[str, str | None]:
    """The four functions' drivers once two reads 0.2 s apart agree (a bind the kernel is
    still finishing must not be caught half-way), at most 5 s."""
    def read() -> dict[str, str | None]:
        return {f"{SLOT}.{i}": driver(f"{SLOT}.{i}") for i in range(4)}
    last = read()
    for _ in range(25):
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


def reload_vfio_pci() -> None:
    """insmod the vfio-pci module again, from the lab's unpacked Debian kernel (the chroot has
    no /lib/modules of its own)."""
    from lab.guest import DEFAULT_CACHE

    found = sorted(DEFAULT_CACHE.glob("kernel-amd64/lib/modules/*/kernel/drivers/vfio/pci/"
                                      "vfio-pci.ko*"))
    done = subprocess.run(["insmod", str(found[0])] if found else ["false"],
                          capture_output=True, text=True)
    report("vfio-pci-reloaded", ok=done.returncode == 0, error=done.stderr.strip())


def held_by(inventory: Any) -> list[str | None]:
    """Who holds each function of the lab's device (other multifunction slots, such as the
    chipset's, are not the lab's business)."""
    return [f.get("held-by") for s in inventory if s["slot"] == SLOT for f in s["functions"]]


def overrides() -> dict[str, str]:
    return {f"{SLOT}.{i}": (Path("/sys/bus/pci/devices") / f"{SLOT}.{i}" / "driver_override")
            .read_text().strip() for i in range(4)}


def host_records() -> list[str]:
    """The journal's host-function records (held, given back), in order: the lab reads the
    journal itself, not qmpfd's account of it."""
    out = []
    for line in (TMP / "state" / "journal.log").read_text().splitlines():
        rec = json.loads(line.split(" ", 1)[1])
        if rec.get("t") in ("host+", "host-"):
            out.append(f"{rec['t']} {rec['address']}")
    return out


def iface_of(address: str) -> str:
    net = Path("/sys/bus/pci/devices") / address / "net"
    return sorted(os.listdir(net))[0]


async def attempt(c: QMPClient, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"ok": True, "return": await c.execute(cmd, args)}
    except ExecuteError as exc:
        return {"ok": False, "class": exc.error_class, "desc": str(exc)}


def wait_socket(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.1)


def start_l2() -> subprocess.Popen[bytes]:
    for sock in ("l2.qmp", "l2-inspect.qmp"):
        (TMP / sock).unlink(missing_ok=True)
    return subprocess.Popen(["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "128",
                             "-nodefaults", "-display", "none", "-S",
                             "-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=0x10",
                             "-qmp", f"unix:{TMP}/l2.qmp,server=on,wait=off",
                             "-qmp", f"unix:{TMP}/l2-inspect.qmp,server=on,wait=off"],
                            stderr=(TMP / "l2.log").open("ab"))


async def running_l2(c: QMPClient) -> None:
    """A booted L2 guest: it sees functions 0 and 2 of one slot, and detach gives them back."""
    from lab.vm import LabVm, LabVmSpec

    vm = LabVm("l2run", TMP / "l2run", LabVmSpec(machine="q35", root_ports=1, memory_mb=128))
    t = time.monotonic()
    try:
        vm.start(boot_timeout=float(os.environ.get("LAB5_L2_BOOT_TIMEOUT", "600")))
    except Exception as exc:
        report("l2-boot", ok=False, error=str(exc), seconds=round(time.monotonic() - t, 1))
        vm.stop()
        return
    report("l2-boot", ok=True, seconds=round(time.monotonic() - t, 1))
    try:
        before = vm.guest_pci() or set()
        await c.execute("vm-add", {"name": "l2run", "qmp": str(vm.qmp_socket)})
        r = await attempt(c, "device-attach", {"vm": "l2run", "functions": [
            {"id": "g1", "host": f"{SLOT}.1"}, {"id": "g2", "host": f"{SLOT}.2"},
            {"id": "v0", "host": f"{SLOT}.0", "unassigned": True},
            {"id": "v3", "host": f"{SLOT}.3", "unassigned": True}]})
        seen = await asyncio.to_thread(vm.wait_guest_pci, lambda s: len(s - before) >= 2, 300)
        report("l2-guest-sees", **r, new=sorted(seen - before), drivers=drivers())
        d = await attempt(c, "device-detach", {"vm": "l2run", "ids": ["g1", "g2"],
                                               "timeout": 300})
        after = await asyncio.to_thread(vm.wait_guest_pci, lambda s: s == before, 120)
        report("l2-detached", **d, guest_after=sorted(after - before), drivers=drivers())
    finally:
        vm.stop()


async def main() -> None:
    t0 = time.monotonic()
    TMP.mkdir(parents=True, exist_ok=True)
    report("start", drivers=drivers(), groups=sorted(os.listdir("/sys/kernel/iommu_groups")))
    config = TMP / "qmpfd.toml"
    config.write_text(f'[daemon]\nsocket = "{TMP}/qmpfd.sock"\nstate-dir = "{TMP}/state"\n'
                      f'log-format = "text"\n[access]\nqmp-dirs = ["{TMP}"]\n')
    daemon = subprocess.Popen([sys.executable, "-m", "qmpfd.daemon", "--config", str(config)],
                              stderr=(TMP / "qmpfd.log").open("wb"))
    l2 = start_l2()
    try:
        wait_socket(TMP / "qmpfd.sock", 120)
        wait_socket(TMP / "l2-inspect.qmp", 120)
        report("started", seconds=round(time.monotonic() - t0, 1))
        c = QMPClient("lab5")
        await c.connect(str(TMP / "qmpfd.sock"))
        report("vm-add", **await attempt(c, "vm-add", {"name": "l2", "qmp": f"{TMP}/l2.qmp"}))
        inventory = await c.execute("query-host-devices", {"multifunction-only": True})
        report("inventory", slots=inventory)

        # 1. Only functions 1 and 2: 0 and 3 would stay on e1000e in the same IOMMU group.
        r = await attempt(c, "device-attach", {"vm": "l2", "functions": [
            {"id": "p1", "host": f"{SLOT}.1"}, {"id": "p2", "host": f"{SLOT}.2"}]})
        report("group-check", **r, drivers=drivers())

        # 2. Function 1's interface is up: the host uses it.
        iface = iface_of(f"{SLOT}.1")
        subprocess.run(["ip", "link", "set", iface, "up"], check=True)
        r = await attempt(c, "device-attach", {"vm": "l2", "functions": PARTIAL})
        report("in-use-check", **r, iface=iface, drivers=drivers())
        subprocess.run(["ip", "link", "set", iface, "down"], check=True)

        # 3. QEMU refuses the first function plugged: everything goes back to e1000e.
        r = await attempt(c, "device-attach", {"vm": "l2", "functions": [
            {"id": "p1", "host": f"{SLOT}.1"},
            # a value of the right type that QEMU itself refuses (no such BAR)
            {"id": "p2", "host": f"{SLOT}.2", "properties": {"x-msix-relocation": "bar9"}},
            {"id": "u0", "host": f"{SLOT}.0", "unassigned": True},
            {"id": "u3", "host": f"{SLOT}.3", "unassigned": True}]})
        report("failure-gives-back", **r, drivers=drivers())

        # 3b. A bind that fails half-way: vfio-pci is not loaded, so after driver_override is
        # set and e1000e lets go, no driver takes the function. Everything goes back to e1000e,
        # driver_override is cleared, nothing stays held, and the journal says so.
        rmmod = subprocess.run(["rmmod", "vfio_pci"], capture_output=True, text=True)
        r = await attempt(c, "device-attach", {"vm": "l2", "functions": PARTIAL})
        inv: Any = await c.execute("query-host-devices", {"multifunction-only": True})
        report("bind-fails", **r, rmmod=rmmod.returncode, rmmod_err=rmmod.stderr,
               drivers=drivers(), overrides=overrides(),
               held_by=held_by(inv),
               journal=host_records())
        reload_vfio_pci()

        # 4. The partial assignment: 1 and 2 to the guest, 0 and 3 held back.
        r = await attempt(c, "device-attach", {"vm": "l2", "functions": PARTIAL})
        inspect = QMPClient("inspect")
        await inspect.connect(str(TMP / "l2-inspect.qmp"))
        pci: Any = await inspect.execute("query-pci")
        in_l2 = [{"id": d["qdev_id"], "bus": d["bus"], "slot": d["slot"],
                  "function": d["function"]}
                 for b in pci for d in b["devices"] if d["qdev_id"] in ("p1", "p2")]
        for b in pci:
            for d in b["devices"]:
                for dd in (d.get("pci_bridge") or {}).get("devices", []):
                    if dd["qdev_id"] in ("p1", "p2"):
                        in_l2.append({"id": dd["qdev_id"], "bus": dd["bus"],
                                      "slot": dd["slot"], "function": dd["function"]})
        qom: Any = await inspect.execute("qom-list", {"path": "/machine/peripheral"})
        held: Any = await c.execute("query-host-devices", {"multifunction-only": True})
        report("assigned", **r, drivers=drivers(), in_l2=in_l2,
               peripheral=sorted(p["name"] for p in qom if p["type"].startswith("child<")),
               held_by=held_by(held),
               journal=host_records())
        placed = {}
        for dev in ("p1", "p2"):
            path = f"/machine/peripheral/{dev}"
            placed[dev] = {
                "addr": await inspect.execute("qom-get", {"path": path, "property": "addr"}),
                "bus": await inspect.execute("qom-get", {"path": path, "property": "parent_bus"}),
                "host": await inspect.execute("qom-get", {"path": path, "property": "host"})}
        report("placement", placed=placed)
        await inspect.disconnect()

        # 5. The VM goes away (QEMU exits) and comes back without those devices: qmpfd
        # reconnects and gives all four functions back to e1000e.
        l2.kill()
        l2.wait()
        report("l2-stopped", drivers=drivers())
        l2 = start_l2()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(d != "e1000e" for d in drivers().values()):
            await asyncio.sleep(0.5)
        held = await c.execute("query-host-devices", {"multifunction-only": True})
        report("given-back", drivers=drivers(),
               held_by=[f.get("held-by") for s in held for f in s["functions"]],
               vms=await c.execute("query-vms"))
        # 6. vm-remove: while the VM's QEMU runs (and uses them) its functions stay held; once
        # that QEMU is gone, nothing would ever reconnect to give them back, so vm-remove does.
        attach = await attempt(c, "device-attach", {"vm": "l2", "functions": PARTIAL})
        live = await attempt(c, "vm-remove", {"name": "l2"})
        live_drivers = drivers()
        readd = await attempt(c, "vm-add", {"name": "l2", "qmp": f"{TMP}/l2.qmp"})
        l2.kill()
        l2.wait()
        dead = await attempt(c, "vm-remove", {"name": "l2"})
        report("vm-remove", attach=attach, live=live, live_drivers=live_drivers, readd=readd,
               dead=dead, drivers=drivers())
        if os.environ.get("LAB5_BOOT_L2"):
            await running_l2(c)
        await c.disconnect()
    except Exception as exc:
        report("error", error=f"{type(exc).__name__}: {exc}")
    finally:
        report("done", seconds=round(time.monotonic() - t0, 1))
        l2.kill()
        daemon.terminate()
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        print("qmpfd log tail:\n" + (TMP / "qmpfd.log").read_text()[-1500:], flush=True)


if __name__ == "__main__":
    asyncio.run(main())
