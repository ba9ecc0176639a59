"""Host devices on this machine's real kernel: the inventory read from /sys, and the refusals that
protect the host (a function whose interface is up, a mounted disk, no IOMMU group), through the
JSON and the XML forms of device-attach. Nothing may change: not the host's drivers, not QEMU.

The partial assignment itself (binding to vfio-pci inside a guest with an emulated IOMMU) needs the
nested VFIO lab; see docs/host-devices.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import Client, adopt, qemu_view, start_lab_vm

pytestmark = pytest.mark.integration

VM = "hostdev-target"


@pytest.fixture(scope="module")
def target(workdir: Path, daemon: Path) -> Iterator[LabVm]:
    lab = start_lab_vm(workdir, VM, LabVmSpec(machine="pc", paused=True))
    adopt(daemon, VM, lab.qmp_socket)
    yield lab
    lab.stop()


def drivers() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for d in Path("/sys/bus/pci/devices").iterdir():
        link = d / "driver"
        out[d.name] = os.path.basename(os.readlink(link)) if link.is_symlink() else None
    return out


async def inventory(client: Client) -> list[dict[str, Any]]:
    slots = await client.execute("query-host-devices")
    return [f for s in slots for f in s["functions"]]


def pick(functions: list[dict[str, Any]], reason: str) -> dict[str, Any]:
    found = [f for f in functions if any(reason in r for r in f["in-use"])]
    assert found, f"this machine has no PCI function with '{reason}' (the test needs one)"
    return found[0]


async def test_inventory_matches_sysfs(client: Client) -> None:
    functions = await inventory(client)
    assert {f["address"] for f in functions} == set(drivers())
    for f in functions:
        assert f["driver"] == drivers()[f["address"]]
        assert f["class"].startswith("0x") and len(f["class"]) == 8


@pytest.mark.parametrize("reason", ["network interface", "block device"])
async def test_function_the_host_uses_is_refused(client: Client, target: LabVm,
                                                 reason: str) -> None:
    fn = pick(await inventory(client), reason)
    before_drivers, before_qemu = drivers(), await qemu_view(target)
    with pytest.raises(ExecuteError) as err:
        await client.execute("device-attach", {"vm": VM, "functions": [
            {"id": "hx0", "host": fn["address"]}]})
    assert err.value.error_class == "HostDeviceUnavailable"
    assert reason in str(err.value) and fn["address"] in str(err.value)
    assert drivers() == before_drivers and await qemu_view(target) == before_qemu


async def test_xml_form_reaches_the_same_checks(client: Client, target: LabVm) -> None:
    fn = pick(await inventory(client), "network interface")
    dom, bus, rest = fn["address"].split(":")
    slot, func = rest.split(".")
    xml = (f"<devices><hostdev mode='subsystem' type='pci' managed='yes'><source>"
           f"<address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{func}'/>"
           "</source></hostdev></devices>")
    with pytest.raises(ExecuteError) as err:
        await client.execute("device-attach-xml", {"vm": VM, "xml": xml})
    assert err.value.error_class == "HostDeviceUnavailable"
    with pytest.raises(ExecuteError) as bad:
        await client.execute("device-attach-xml", {"vm": VM, "xml": (
            '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><hostdev>&x;</hostdev>')})
    assert bad.value.error_class == "InvalidRequest" and "refused" in str(bad.value)


async def test_function_without_iommu_group_is_refused(client: Client, target: LabVm) -> None:
    functions = await inventory(client)
    free = [f for f in functions if not f["in-use"] and f["iommu-group"] is None]
    if not free:
        assert all(f["iommu-group"] is not None for f in functions)
        pytest.skip("this host boots with an IOMMU on, so every PCI function has a group and "
                    "none can be refused for lacking one; to run this check, boot without "
                    "intel_iommu=on/amd_iommu=on (tests/unit/test_host.py proves the refusal on "
                    "captured sysfs either way)")
    before = drivers()
    with pytest.raises(ExecuteError) as err:
        await client.execute("device-attach", {"vm": VM, "functions": [
            {"id": "hx1", "host": free[0]["address"]}]})
    assert err.value.error_class == "HostDeviceUnavailable" and "IOMMU" in str(err.value)
    assert drivers() == before
