"""ppc64 pseries: the spapr policy on real qemu-system-ppc64 with a booted Debian ppc64el guest.

What is proven here: a pseries VM is recognised (policy spapr), every PHB (pci.0 and PHBs given with
-device) is a hotpluggable bus, a multifunction attach puts every function in one slot in QEMU
(function 0 last, verified by qmpfd and by QEMU's own query-pci), and the detach through function 0
removes every function.

What is not: the guest's own view. A pseries guest learns of a PCI hotplug through an RTAS event
that its userspace must act on (rtas_errd + drmgr from ppc64-diag/powerpc-utils, which configure
the new DRCs); the busybox guest has neither, so it never shows the new functions. See the README.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpfd.lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import Client, adopt, qemu_execute, qemu_view, start_lab_vm

pytestmark = pytest.mark.integration

VM = "ppc-pseries"


@pytest.fixture(scope="module")
def pseries(workdir: Path, daemon: Path) -> Iterator[tuple[LabVm, dict[str, Any]]]:
    lab = start_lab_vm(workdir, VM, LabVmSpec(machine="pseries", extra_phbs=1))
    try:
        yield lab, adopt(daemon, VM, lab.qmp_socket)
    finally:
        lab.stop()


def test_pseries_guest_boots_and_is_spapr(pseries: tuple[LabVm, dict[str, Any]]) -> None:
    lab, info = pseries
    assert info["arch"] == "ppc64" and info["policy"] == "spapr"
    assert lab.guest_pci() is not None  # the ppc64el guest booted and reports


async def test_every_phb_is_hotpluggable(client: Client,
                                         pseries: tuple[LabVm, dict[str, Any]]) -> None:
    slots = await client.execute("query-slots", {"vm": VM})
    assert {s["bus"] for s in slots if s["hotpluggable"]} == {"pci.0", "phb1.0"}


@pytest.mark.parametrize(("bus", "n"), [("pci.0", 2), ("pci.0", 4), ("phb1.0", 8)])
async def test_attach_and_cascading_detach(client: Client, pseries: tuple[LabVm, dict[str, Any]],
                                           bus: str, n: int) -> None:
    lab, _ = pseries
    funcs = [{"id": f"s{n}f{i}", "driver": "virtio-net-pci" if i == 0 else "virtio-rng-pci"}
             for i in range(n)]
    ids = {f["id"] for f in funcs}
    reply = await client.execute("device-attach", {"vm": VM, "functions": funcs, "bus": bus})
    assert reply["policy"] == "spapr"
    assert [int(s["arguments"]["addr"].split(".")[1], 16) for s in reply["steps"]][-1] == 0
    pci = await qemu_execute(lab, "query-pci")
    placed = {d["qdev_id"]: (d["slot"], d["function"]) for b in pci for d in b["devices"]
              if d["qdev_id"] in ids}
    assert set(placed) == ids and {slot for slot, _ in placed.values()} == {reply["slot"]}
    assert sorted(fn for _, fn in placed.values()) == list(range(n))
    detached = await client.execute("device-detach", {"vm": VM, "ids": sorted(ids)})
    assert sorted(detached["ids"]) == sorted(ids)
    peripheral, in_pci = await qemu_view(lab)
    assert not ids & (peripheral | in_pci)


async def test_refused_function_rolls_back(client: Client,
                                           pseries: tuple[LabVm, dict[str, Any]]) -> None:
    lab, _ = pseries
    funcs: list[dict[str, Any]] = [{"id": f"rb{i}", "driver": "virtio-rng-pci"}
                                   for i in range(3)]
    funcs[0]["properties"] = {"no-such-property": 1}
    with pytest.raises(Exception, match="no-such-property"):
        await client.execute("device-attach", {"vm": VM, "functions": funcs})
    peripheral, in_pci = await qemu_view(lab)
    assert not {"rb0", "rb1", "rb2"} & (peripheral | in_pci)
