"""Host functions through the command layer, on the captured sysfs of the VFIO lab's guest with
a fake kernel thread doing the driver moves: listed, bound to vfio-pci and held for the attach,
given back once when the slot leaves QEMU or the attach fails, and the libvirt XML route."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpfd.config import HostConfig
from qmpfd.errors import InvalidRequest, QmpfdError
from qmpfd.host import vfio
from qmpfd.host.manager import HostDevices
from tests.unit.capture_sysfs import rebuild
from tests.unit.fake_kernel import FakeKernel
from tests.unit.harness import Api
from tests.unit.replay import ReplayLink
from tests.unit.scripted_qemu import REFUSE

SLOT = "0000:01:00"
ADDRS = [f"{SLOT}.{i}" for i in range(4)]


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    monkeypatch.setattr(vfio, "SETTLE_SECONDS", 2.0)
    sysfs, _ = rebuild("q35-iommu-4fn", tmp_path / "host")
    with FakeKernel(sysfs, ADDRS) as k:
        yield k


@pytest.fixture
def api(tmp_path: Path, kernel: FakeKernel) -> Api:
    a = Api(tmp_path)
    a.commands.host = HostDevices(HostConfig(sysfs=kernel.sysfs, proc=tmp_path / "host/proc"),
                                  a.h.journal)
    a.h.release = a.commands.host.release              # as the daemon wires it
    return a


async def settled(kernel: FakeKernel, addresses: list[str], driver: str) -> None:
    for _ in range(200):
        if all(kernel.driver(a) == driver for a in addresses):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{addresses}: {[kernel.driver(a) for a in addresses]} != {driver}")


def host_functions(*numbers: int) -> list[dict[str, Any]]:
    """Functions ``numbers`` of the host slot; the others of its IOMMU group unassigned (bound
    to vfio-pci with them, never given to the guest), as the group's viability asks."""
    return [{"id": f"h{n}", "host": f"{SLOT}.{n}", **({} if n in numbers else
                                                     {"unassigned": True})} for n in range(4)]


async def test_listed_bound_held_and_given_back_once(api: Api, kernel: FakeKernel) -> None:
    listed = await api("query-host-devices", {"multifunction-only": True})
    nic = next(s for s in listed if s["slot"] == SLOT)
    assert [f["driver"] for f in nic["functions"]] == ["e1000e"] * 4
    dry = await api("device-attach", {"vm": "v", "functions": host_functions(0, 1),
                                      "dry-run": True})
    assert dry["host"] == {"bind": ADDRS, "unassigned": ADDRS[2:]}
    assert kernel.driver(ADDRS[0]) == "e1000e" and not api.h.journal.host
    placed = await api("device-attach", {"vm": "v", "functions": host_functions(0, 1)})
    assert [f["id"] for f in placed["functions"]] == ["h0", "h1"]
    assert [kernel.driver(a) for a in ADDRS] == ["vfio-pci"] * 4
    assert sorted(api.h.journal.host) == ADDRS
    sent = api.h.qemu.added
    assert sent["h0"]["driver"] == "vfio-pci" and sent["h0"]["host"] == ADDRS[0]
    held = await api("query-host-devices", {})
    by_address = {f["address"]: f for s in held for f in s["functions"]}
    assert by_address[ADDRS[0]]["held-by"] == "v"
    gone = await api("device-detach", {"vm": "v", "ids": ["h0", "h1"]})
    assert sorted(gone["host-released"]) == ADDRS
    await settled(kernel, ADDRS, "e1000e")
    assert api.h.journal.host == {}


async def test_a_refused_attach_gives_host_functions_back(api: Api, kernel: FakeKernel) -> None:
    # QEMU's topology as a real pc QEMU answered it: a refusal makes qmpfd read it again
    # (was its view stale?) before it answers.
    link = ReplayLink("pc", "v")
    link.subscribe(api.h.vm.tracker.handle_event)
    api.h.vm.link = link  # type: ignore[assignment]
    await api.h.vm.refresh()
    link.qemu.script[("device_add", "h0")] = REFUSE      # function 0: after function 1 went in
    with pytest.raises(QmpfdError, match=r"refused .*; rolled back") as refused:
        await api("device-attach", {"vm": "v", "functions": host_functions(0, 1)})
    assert refused.value.error_class == "QemuError"
    await settled(kernel, ADDRS, "e1000e")
    assert api.h.journal.host == {} and not link.qemu.devices


async def test_nothing_assigned_is_refused_before_any_bind(api: Api, kernel: FakeKernel) -> None:
    functions = host_functions()
    with pytest.raises(InvalidRequest, match="every host function is unassigned"):
        await api("device-attach", {"vm": "v", "functions": functions})
    assert kernel.driver(ADDRS[0]) == "e1000e" and api.h.journal.host == {}


def hostdev(n: int) -> str:
    multi = " multifunction='on'" if n == 0 else ""
    return f"""  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0x0000' bus='0x01' slot='0x00' function='{n:#x}'/></source>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x09' function='{n:#x}'{multi}/>
  </hostdev>"""


XML = "<devices>\n" + "\n".join(hostdev(n) for n in range(4)) + "\n</devices>"


async def test_libvirt_xml_route(api: Api, kernel: FakeKernel) -> None:
    with pytest.raises(InvalidRequest, match=r"slot: 8 differs from the XML's <address> \(9\)"):
        await api("device-attach-xml", {"vm": "v", "xml": XML, "slot": 8})
    placed = await api("device-attach-xml", {"vm": "v", "xml": XML})
    assert (placed["bus"], placed["slot"]) == ("pci.0", 9)
    assert sorted(api.h.journal.host) == ADDRS
    assert {i: a["host"] for i, a in api.h.qemu.added.items()} == {
        f"hostdev-0000-01-00-{n}": f"{SLOT}.{n}" for n in range(4)}
    with pytest.raises(Exception, match="address@bus=7"):
        await api("device-attach-xml", {"vm": "v", "xml": XML.replace("bus='0x00'", "bus='0x07'")
                                        })
