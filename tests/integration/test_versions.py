"""The QEMU version matrix: every supported QEMU the lab has (the host's and other Debian
releases', see lab/qemu.py) x every machine qmpfd drives, each cell a real guest.

Per cell: 2-, 4- and 8-function attach and whole-slot detach seen by the guest; properties given
as -device strings and as JSON types, read back through QOM; a bad value refused by name with
nothing changed; rollback of a function QEMU refuses; incremental attach; detach right after
attach (on native PCIe through QEMU's "guest is busy" refusal, which checks that wording on every
version); a SIGKILL of qmpfd mid-attach and its recovery; a device_add answered after the plug
timeout. The referees are QEMU's second monitor and the guest's own PCI list; every row observed
is printed at the end of the run (the version tables of README.md and docs/concepts.md come
from it).

``QMPFD_QEMU_MATRIX`` (e.g. "trixie sid" or "10.0") narrows the versions; by default all built.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from lab import qemu as lab_qemu
from lab.guest import DEBIAN_ARCH, find_kernel
from lab.vm import LabVm, LabVmSpec, slot_groups
from tests.integration.conftest import Client, connect, qemu_execute, qemu_view, start_lab_vm
from tests.integration.faults_support import VERSION_MATRIX, DaemonProcess

pytestmark = pytest.mark.integration

MACHINES = ["pc", "q35", "q35-native", "virt", "pseries"]
POLICY = {"pc": "acpi-pcihp", "q35": "acpi-pcihp", "q35-native": "pcie-native",
          "virt": "pcie-native", "pseries": "spapr"}
#: Guest-side waits bound a hang; they are not speed checks. pseries under TCG: drmgr takes
#: ~7 s per function each way.
GUEST_WAIT = {"pseries": 300.0}
KERNEL_OF = {"host": "host", "bookworm": "bookworm", "trixie": "trixie", "sid": "trixie"}
DRIVERS = ["virtio-net-pci", "virtio-rng-pci", "e1000", "virtio-rng-pci"] * 2


def _builds() -> list[lab_qemu.QemuBuild]:
    wanted = os.environ.get("QMPFD_QEMU_MATRIX", "").split()
    seen: dict[str, lab_qemu.QemuBuild] = {}
    for b in lab_qemu.available(supported_only=True):
        if wanted and b.name not in wanted and not any(
                b.version.startswith(w + ".") or b.version == w for w in wanted):
            continue
        seen.setdefault(b.version, b)   # the host's QEMU is one of the releases: run it once
    return sorted(seen.values(), key=lambda b: tuple(int(x) for x in b.version.split(".")))


BUILDS = _builds()


@dataclass
class Cell:
    qemu: lab_qemu.QemuBuild
    machine: str
    lab: LabVm
    daemon: DaemonProcess
    #: The guest's PCI list after boot. Every row starts from it and must end at it: a row that
    #: read the guest's current list instead once took a transient view (a device the guest
    #: enumerated after the previous row's check had already passed, then dropped) as its start.
    baseline: frozenset[str]
    vm: str = "m"

    @property
    def wait(self) -> float:
        return GUEST_WAIT.get(self.machine, 60.0)

    def record(self, what: str, outcome: str) -> None:
        kernel = find_kernel(DEBIAN_ARCH[self.lab.spec.arch], choice=self.lab.spec.kernel).name
        VERSION_MATRIX.append((self.qemu.version, f"{self.machine} ({kernel})", what, outcome))


@pytest.fixture(scope="module", params=[(b, m) for b in BUILDS for m in MACHINES],
                ids=lambda p: f"{p[0].version}-{p[1]}")
def cell(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Cell]:
    build, machine = request.param
    name = f"v{build.version}-{machine}"
    # Each release's QEMU boots that release's guest kernel: 6.1 beside 7.2, 6.12 beside 10.0
    # and 11.x (the host's QEMU boots the host release's kernel).
    spec = LabVmSpec(machine=machine, root_ports=4, qemu=build.name, kernel=KERNEL_OF[build.name])
    lab = start_lab_vm(workdir, name, spec)
    d = DaemonProcess(workdir / f"{name}-qmpfd", extra_config="""
[timeouts.policy.spapr]
unplug = 300
""", access_config=f'qmp-dirs = ["{workdir}"]')
    try:
        d.start()
        baseline = frozenset(lab.wait_guest_pci(lambda s: True, 30))
        yield Cell(build, machine, lab, d, baseline)
    finally:
        d.stop()
        lab.stop()


@pytest.fixture
async def mc(cell: Cell) -> Any:
    """A client of the cell's qmpfd with the cell's VM adopted (again after a restart)."""
    if cell.daemon.proc is None or cell.daemon.proc.poll() is not None:
        cell.daemon.start()
    c = await connect(cell.daemon.socket)
    vms = {v["name"] for v in await c.execute("query-vms")}
    if cell.vm not in vms:
        await c.execute("vm-add", {"name": cell.vm, "qmp": str(cell.lab.qmp_socket)})
    yield c
    with contextlib.suppress(Exception):
        await c.qmp.disconnect()


def funcs(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "driver": DRIVERS[i]} for i in range(n)]


async def settled(c: Client, timeout: float) -> None:
    async def poll() -> None:
        while await c.execute("query-operations"):  # noqa: ASYNC110 - polling qmpfd itself
            await asyncio.sleep(0.2)
    await asyncio.wait_for(poll(), timeout)


async def guest_sees_one_slot(cell: Cell, before: set[str], n: int) -> None:
    seen = await asyncio.to_thread(cell.lab.wait_guest_pci,
                                   lambda s: len(s - before) >= n, cell.wait)
    groups = slot_groups(seen - before)
    assert list(groups.values()) == [set(range(n))], groups


async def nothing_left(cell: Cell, c: Client, before: set[str], ids: set[str],
                       guest_wait: float | None = None) -> None:
    """The guest is back to ``before``; QEMU (second monitor) and qmpfd hold none of ``ids``."""
    seen = await asyncio.to_thread(cell.lab.wait_guest_pci, lambda s: s == before,
                                   guest_wait or cell.wait)
    assert seen == before
    peripheral, in_pci = await qemu_view(cell.lab)
    assert not ids & (peripheral | in_pci), f"QEMU holds {ids & (peripheral | in_pci)}"
    slots = await c.execute("query-slots", {"vm": cell.vm})
    assert not ids & {f["id"] for s in slots for f in s["functions"]}


async def detach(cell: Cell, c: Client, ids: list[str], before: set[str]) -> None:
    reply = await c.execute("device-detach", {"vm": cell.vm, "ids": ids})
    assert sorted(reply["ids"]) == sorted(ids)
    await nothing_left(cell, c, before, set(ids))


async def start_view(cell: Cell) -> set[str]:
    """The cell's baseline, once the guest shows exactly it (what the previous row left)."""
    await asyncio.to_thread(cell.lab.wait_guest_pci, lambda s: s == cell.baseline, cell.wait)
    return set(cell.baseline)


async def test_adopted_with_its_version_and_policy(cell: Cell, mc: Client) -> None:
    vms = {v["name"]: v for v in await mc.execute("query-vms")}
    assert vms[cell.vm]["qemu"] == cell.qemu.version
    assert vms[cell.vm]["policy"] == POLICY[cell.machine]
    cell.record("vm-add", f"policy {POLICY[cell.machine]}")


@pytest.mark.parametrize("n", [2, 4, 8])
async def test_attach_and_whole_slot_detach(cell: Cell, mc: Client, n: int) -> None:
    before = await start_view(cell)
    reply = await mc.execute("device-attach", {"vm": cell.vm, "functions": funcs(f"a{n}f", n)})
    await guest_sees_one_slot(cell, before, n)
    peripheral, _ = await qemu_view(cell.lab)
    assert {f"a{n}f{i}" for i in range(n)} <= peripheral
    await detach(cell, mc, [f["id"] for f in reply["functions"]], before)
    cell.record(f"{n}-function attach, whole-slot detach", "guest saw one slot, then none")


async def test_properties_as_strings_and_json_types(cell: Cell, mc: Client) -> None:
    """-device spellings ("1024", "0x10", "off") and JSON types reach QEMU as its types. p0
    carries the properties qmpfd maps from libvirt XML (rombar, romfile, bootindex,
    acpi-index): PCI device properties, the same on vfio-pci as on an emulated function."""
    before = await start_view(cell)
    functions = [
        {"id": "p0", "driver": "virtio-net-pci",
         "properties": {"bootindex": "3", "acpi-index": 7, "rombar": "0", "romfile": ""}},
        {"id": "p1", "driver": "virtio-rng-pci",
         "properties": {"max-bytes": "1024", "period": "0x10"}},
        {"id": "p2", "driver": "virtio-rng-pci",
         "properties": {"max-bytes": 2048, "period": 20, "ioeventfd": "off"}},
    ]
    await mc.execute("device-attach", {"vm": cell.vm, "functions": functions})
    await guest_sees_one_slot(cell, before, 3)
    got = {(dev, prop): await qemu_execute(cell.lab, "qom-get",
                                           {"path": f"/machine/peripheral/{dev}",
                                            "property": prop})
           for dev, prop in [("p0", "rombar"), ("p0", "acpi-index"), ("p0", "bootindex"),
                             ("p0", "romfile"), ("p1", "max-bytes"),
                             ("p1", "period"), ("p2", "max-bytes"), ("p2", "ioeventfd")]}
    assert got == {("p0", "rombar"): 0, ("p0", "acpi-index"): 7, ("p0", "bootindex"): 3,
                   ("p0", "romfile"): "", ("p1", "max-bytes"): 1024,
                   ("p1", "period"): 16, ("p2", "max-bytes"): 2048, ("p2", "ioeventfd"): False}
    await detach(cell, mc, ["p0", "p1", "p2"], before)
    cell.record("properties as strings and JSON types", "read back through QOM as typed")


@pytest.mark.parametrize(("prop", "value", "expects"), [
    ("max-bytes", "lots", "expects an integer"),
    ("no-such-property", 1, "has no property"),
])
async def test_bad_property_refused_by_name(cell: Cell, mc: Client, prop: str, value: Any,
                                            expects: str) -> None:
    before = await start_view(cell)
    functions = funcs("b", 2)
    functions[1]["properties"] = {prop: value}
    with pytest.raises(ExecuteError) as err:
        await mc.execute("device-attach", {"vm": cell.vm, "functions": functions})
    assert err.value.error_class == "InvalidRequest"
    assert f"functions[1].properties.{prop}" in str(err.value) and expects in str(err.value)
    await nothing_left(cell, mc, before, {"b0", "b1"})
    cell.record(f"bad property ({prop}={value!r})", "InvalidRequest naming it, nothing changed")


async def test_refused_function_rolls_back(cell: Cell, mc: Client) -> None:
    """QEMU refuses function 0 (last to go in) after the others were plugged: all go."""
    before = await start_view(cell)
    functions = funcs("r", 3)
    functions[0] = {"id": "r0", "driver": "virtio-rng-pci", "properties": {"rng": "nosuch"}}
    with pytest.raises(ExecuteError) as err:
        await mc.execute("device-attach", {"vm": cell.vm, "functions": functions})
    assert err.value.error_class == "QemuError" and "rolled back" in str(err.value)
    await settled(mc, cell.wait)
    await nothing_left(cell, mc, before, {"r0", "r1", "r2"})
    cell.record("function 0 refused by QEMU", "rolled back, nothing left")


async def test_incremental_attach(cell: Cell, mc: Client) -> None:
    before = await start_view(cell)
    # function-add needs an explicit bus and slot: take the one a dry run would choose
    plan = await mc.execute("device-attach", {"vm": cell.vm, "functions": funcs("i", 3),
                                              "dry-run": True})
    where = {"bus": plan["bus"], "slot": plan["slot"]}
    for fn in (2, 1):
        queued = await mc.execute("function-add", {"vm": cell.vm, "id": f"i{fn}",
                                                   "driver": DRIVERS[fn], "function": fn,
                                                   **where})
        assert queued["queued"] is True
    peripheral, _ = await qemu_view(cell.lab)
    assert not {"i1", "i2"} & peripheral, "a queued function reached QEMU before function 0"
    await mc.execute("function-add", {"vm": cell.vm, "id": "i0", "driver": DRIVERS[0],
                                      "function": 0, **where})
    await guest_sees_one_slot(cell, before, 3)
    await detach(cell, mc, ["i0", "i1", "i2"], before)
    cell.record("incremental attach (2, 1, then 0)", "queued until function 0, one slot")


async def test_detach_right_after_attach(cell: Cell, mc: Client) -> None:
    """Detach sent the moment attach returns. On native PCIe QEMU refuses the device_del while
    the guest still powers the slot: that refusal's wording, on this version, is the one qmpfd
    recognises as "not yet" (the round whose reply says it waited). Up to three rounds, as the
    guest is not always still busy."""
    before = await start_view(cell)
    waited = False
    for r in range(3):
        reply = await mc.execute("device-attach", {"vm": cell.vm, "functions": funcs(f"d{r}", 2)})
        ids = [f["id"] for f in reply["functions"]]
        detached = await mc.execute("device-detach", {"vm": cell.vm, "ids": ids})
        await nothing_left(cell, mc, before, set(ids))
        waited = "waited-for-guest" in detached
        if waited or POLICY[cell.machine] != "pcie-native":
            break
    if POLICY[cell.machine] == "pcie-native":
        assert waited, "the guest was never busy: the busy refusal was not exercised"
    cell.record("detach right after attach",
                "busy guest waited out" if waited else "no wait needed")


async def test_sigkill_mid_attach_recovers(cell: Cell, mc: Client) -> None:
    before = await start_view(cell)
    await mc.qmp.disconnect()
    cell.daemon.stop()
    cell.daemon.start(QMPFD_CRASH_AT="attach-step-1")
    c = await connect(cell.daemon.socket)
    with pytest.raises(Exception):  # noqa: B017 - the connection dies with the daemon
        await c.execute("device-attach", {"vm": cell.vm, "functions": funcs("k", 3)})
    assert cell.daemon.wait_killed() == -9
    with contextlib.suppress(Exception):
        await c.qmp.disconnect()
    cell.daemon.start()
    c = await connect(cell.daemon.socket)
    try:
        await settled(c, cell.wait)
        # Once (QEMU 11.1, kernel 6.12, pc) the guest took over a minute to drop a slot
        # recovery emptied while it held no function 0: a bound on a hang, not a speed check.
        await nothing_left(cell, c, before, {"k0", "k1", "k2"}, guest_wait=max(cell.wait, 240))
    finally:
        await c.qmp.disconnect()
    cell.record("SIGKILL of qmpfd after the first device_add", "recovered: rolled back")


async def test_device_add_answered_after_the_timeout(cell: Cell, mc: Client) -> None:
    before = await start_view(cell)
    with pytest.raises(ExecuteError) as err:
        await mc.execute("device-attach", {"vm": cell.vm, "functions": funcs("t", 3),
                                           "timeout": 0.001})
    assert err.value.error_class == "Timeout"
    if str(err.value).endswith("rolled back"):
        peripheral, in_pci = await qemu_view(cell.lab)
        assert not {"t0", "t1", "t2"} & (peripheral | in_pci)
    await settled(mc, cell.wait)
    await nothing_left(cell, mc, before, {"t0", "t1", "t2"})
    cell.record("device_add answered after the plug timeout", "Timeout; nothing left")


OLD = [b for b in lab_qemu.available() if b.name in lab_qemu.TOO_OLD]


@pytest.mark.skipif(not OLD, reason="Debian 11's QEMU 5.2 is not unpacked: run scripts/setup "
                    "(scripts/debian-roots builds .cache/qemu/bullseye)")
async def test_qemu_older_than_the_minimum_is_refused_at_vm_add(workdir: Path,
                                                                daemon: Path) -> None:
    """Debian 11's QEMU 5.2: vm-add names the minimum and qmpfd manages nothing of it."""
    build = OLD[0]
    lab = LabVm("old-qemu", workdir / "old-qemu", LabVmSpec(machine="pc", paused=True,
                                                            qemu=build.name))
    lab.start()
    c = await connect(daemon)
    try:
        with pytest.raises(ExecuteError) as err:
            await c.execute("vm-add", {"name": "old", "qmp": str(lab.qmp_socket)})
        assert err.value.error_class == "Unsupported"
        assert f"QEMU {build.version}" in str(err.value) and "minimum is QEMU 7.2" in str(err.value)
        assert "old" not in {v["name"] for v in await c.execute("query-vms")}
        VERSION_MATRIX.append((build.version, "pc", "vm-add", "refused: minimum is 7.2"))
    finally:
        await c.qmp.disconnect()
        lab.stop()


@contextlib.asynccontextmanager
async def paused_vm_adopted(name: str, spec: LabVmSpec, workdir: Path,
                            daemon: Path) -> AsyncIterator[tuple[LabVm, Client]]:
    """A VM held at start, adopted by the session's qmpfd as ``name``; removed and stopped
    afterwards. For rows that QEMU alone decides (no guest needed)."""
    lab = LabVm(name, workdir / name, spec)
    lab.start()
    c = await connect(daemon)
    try:
        await c.execute("vm-add", {"name": name, "qmp": str(lab.qmp_socket)})
        yield lab, c
    finally:
        with contextlib.suppress(Exception):
            await c.execute("vm-remove", {"name": name})
        await c.qmp.disconnect()
        lab.stop()


@pytest.mark.parametrize("build", BUILDS, ids=lambda b: b.version)
async def test_hot_plugged_bridge_is_shpc_and_refused_by_name(build: lab_qemu.QemuBuild,
                                                              workdir: Path,
                                                              daemon: Path) -> None:
    """A bridge hot-plugged under ACPI serves its bus with its own SHPC controller (QEMU reports
    the bridge as the bus's hotplug handler): recognised, refused by name for a multifunction
    attach, and skipped by an automatic choice. Paused at start, so QEMU alone decides: a Linux
    guest (6.1 and 6.12 alike) trips in acpiphp over a bridge hot-plugged into a root port
    created without ``bus-reserve`` and stops handling ACPI hotplug afterwards."""
    name = f"shpc-{build.version}"
    spec = LabVmSpec(machine="q35", root_ports=2, paused=True, qemu=build.name)
    async with paused_vm_adopted(name, spec, workdir, daemon) as (lab, c):
        await c.execute("device-attach", {"vm": name, "functions": [
            {"id": "hbr", "driver": "pci-bridge", "properties": {"chassis_nr": "42"}}]})
        policy = await c.execute("query-policy", {"vm": name})
        assert {"bus": "hbr", "mechanism": "shpc", "policy": "unsupported"} in policy["buses"]
        with pytest.raises(ExecuteError) as err:
            await c.execute("device-attach", {"vm": name, "bus": "hbr",
                                              "functions": funcs("s", 2)})
        assert err.value.error_class == "Unsupported" and "SHPC" in str(err.value)
        auto = await c.execute("device-attach", {"vm": name, "functions": funcs("s", 2),
                                                 "dry-run": True})
        assert auto["bus"] not in ("hbr", "pcie.0")
        peripheral, _ = await qemu_view(lab)
        assert "hbr" in peripheral and not {"s0", "s1"} & peripheral
        VERSION_MATRIX.append((build.version, "q35 (bridge hot-plugged under ACPI)",
                               "multifunction attach on its bus", "SHPC: refused by name"))


def _version(b: lab_qemu.QemuBuild) -> tuple[int, ...]:
    return tuple(int(x) for x in b.version.split("."))


GED_BUILDS = [b for b in BUILDS if _version(b) >= (10, 1) and b.aarch64_uefi() is not None]


@pytest.mark.skipif(not GED_BUILDS,
                    reason="no QEMU >= 10.1 with arm64 UEFI firmware: run scripts/setup "
                           "(scripts/debian-roots unpacks sid's QEMU and qemu-efi-aarch64)")
@pytest.mark.parametrize("build", GED_BUILDS, ids=lambda b: b.version)
async def test_arm64_acpi_ged_hotplug_is_refused_by_name(build: lab_qemu.QemuBuild,
                                                         workdir: Path, daemon: Path) -> None:
    """arm64 virt, QEMU >= 10.1, booted through UEFI with ACPI PCI hotplug turned on: QEMU
    names acpi-ged as the root ports' hotplug handler. qmpfd recognises it and refuses a
    multifunction attach naming it, before QEMU sees anything. (Paused at start: the refusal
    needs no guest.)"""
    fw = build.aarch64_uefi()
    assert fw is not None
    name = f"ged-{build.version}"
    spec = LabVmSpec(machine="virt", root_ports=2, paused=True, qemu=build.name, extra=[
        "-bios", str(fw), "-global", "acpi-ged.acpi-pci-hotplug-with-bridge-support=on"])
    async with paused_vm_adopted(name, spec, workdir, daemon) as (lab, c):
        policy = await c.execute("query-policy", {"vm": name})
        assert {b["mechanism"] for b in policy["buses"]} == {"acpi-ged"}, policy
        with pytest.raises(ExecuteError) as err:
            await c.execute("device-attach", {"vm": name, "functions": funcs("g", 2)})
        assert err.value.error_class == "Unsupported" and "acpi-ged" in str(err.value)
        peripheral, _ = await qemu_view(lab)
        assert not {"g0", "g1"} & peripheral
        VERSION_MATRIX.append((build.version, "virt (UEFI, acpi-ged hotplug on)",
                               "multifunction attach", "refused naming acpi-ged"))
