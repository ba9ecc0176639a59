"""ppc64 pseries: the spapr policy on real qemu-system-ppc64 with a booted Debian ppc64el guest.

Proven here, by QEMU's own view and by the guest's: a pseries VM is recognised (policy spapr),
every PHB (pci.0 and PHBs given with -device) is a hotpluggable bus, a multifunction attach puts
every function in one slot (function 0 last) and the guest sees them all in one slot, and the
detach through function 0 removes every function from QEMU and from the guest.

The guest learns of hotplug the way a pseries distribution does: QEMU raises an RTAS event per
function, rtas_errd (ppc64-diag) reads it and runs drmgr (powerpc-utils), which configures the
DRC and adds the function through rpadlpar_io; unplug runs the same chain backwards. The guest's
initramfs carries those programs (see lab.guest.guest_userland).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.vm import LabVm, LabVmSpec, slot_groups
from tests.integration.conftest import (
    SPAPR_UNPLUG,
    Client,
    adopt,
    qemu_execute,
    qemu_view,
    start_lab_vm,
)

pytestmark = pytest.mark.integration

VM = "ppc-pseries"
#: How long the guest may take to show (or drop) every function. Under TCG, drmgr configures
#: one function at a time, a few seconds each; this bounds the wait, it is not a speed check.
GUEST_WAIT = 240.0


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


async def test_query_policy_shows_spapr_and_the_configured_timeout(
        client: Client, pseries: tuple[LabVm, dict[str, Any]]) -> None:
    policy = await client.execute("query-policy", {"vm": VM})
    assert policy["policy"] == "spapr"
    assert policy["timeouts"]["unplug"] == SPAPR_UNPLUG  # the config's override, not the default
    assert {b["mechanism"] for b in policy["buses"]} == {"spapr"}


async def test_every_phb_is_hotpluggable(client: Client,
                                         pseries: tuple[LabVm, dict[str, Any]]) -> None:
    slots = await client.execute("query-slots", {"vm": VM})
    assert {s["bus"] for s in slots if s["hotpluggable"]} == {"pci.0", "phb1.0"}


@pytest.mark.parametrize(("bus", "n"), [("pci.0", 2), ("pci.0", 4), ("phb1.0", 8)])
async def test_attach_and_cascading_detach(client: Client, pseries: tuple[LabVm, dict[str, Any]],
                                           bus: str, n: int) -> None:
    lab, _ = pseries
    before = lab.guest_pci() or set()
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
    # The guest's own view: all n functions, in one slot of the PHB's domain.
    after = await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) >= n,
                                    GUEST_WAIT)
    groups = slot_groups(after - before)
    assert list(groups.values()) == [set(range(n))], groups
    domain = 0 if bus == "pci.0" else 1
    assert next(iter(groups)).startswith(f"{domain:04x}:00:{reply['slot']:02x}"), groups

    detached = await client.execute("device-detach", {"vm": VM, "ids": sorted(ids)})
    assert sorted(detached["ids"]) == sorted(ids)
    peripheral, in_pci = await qemu_view(lab)
    assert not ids & (peripheral | in_pci)
    seen = await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, GUEST_WAIT)
    assert seen == before


async def test_refused_function_rolls_back(client: Client,
                                           pseries: tuple[LabVm, dict[str, Any]]) -> None:
    lab, _ = pseries
    funcs: list[dict[str, Any]] = [{"id": f"rb{i}", "driver": "virtio-rng-pci"}
                                   for i in range(3)]
    funcs[0]["properties"] = {"rng": "nosuch"}   # refused by QEMU after rb1, rb2 went in
    with pytest.raises(Exception, match="nosuch"):
        await client.execute("device-attach", {"vm": VM, "functions": funcs})
    peripheral, in_pci = await qemu_view(lab)
    assert not {"rb0", "rb1", "rb2"} & (peripheral | in_pci)
