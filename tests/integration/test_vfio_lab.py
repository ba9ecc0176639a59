"""Partial assignment through VFIO on a real kernel with an emulated IOMMU (the nested VFIO lab).

A first-level guest (q35, intel-iommu with interrupt remapping and caching mode, the Debian kernel
with vfio and e1000e) holds a 4-function e1000e device behind a root port: one IOMMU group, four
functions on e1000e. Inside it, the host's own qmpfd and QEMU run (the host root shared read-only
over virtio-9p) against second-level QEMUs: one held at start (QEMU's own view), then one whose
Debian guest boots under TCG inside TCG (about 150 s here) and reports its own PCI list.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lab.nested import run_lab
from tests.integration.faults_support import MATRIX, MatrixRow

pytestmark = pytest.mark.integration

SLOT = "0000:01:00"
ALL = [f"{SLOT}.{i}" for i in range(4)]


@pytest.fixture(scope="module")
def lab() -> dict[str, dict[str, Any]]:
    lines, seconds = run_lab(timeout=1200, boot_l2=True)
    steps = {}
    for line in lines:
        if line.startswith("LAB5 {"):
            data = json.loads(line[5:])
            steps[data["step"]] = data
    print(f"\nnested VFIO lab: {seconds:.0f} s (L1 boot, qmpfd and L2 QEMU inside)")
    assert "error" not in steps, steps.get("error")
    assert "done" in steps, "\n".join(lines[-40:])
    return steps


def test_first_level_guest_has_one_group_of_four_on_e1000e(lab: dict[str, Any]) -> None:
    assert lab["start"]["drivers"] == {a: "e1000e" for a in ALL}
    slot = next(s for s in lab["inventory"]["slots"] if s["slot"] == SLOT)
    groups = {f["iommu-group"] for f in slot["functions"]}
    assert len(groups) == 1 and None not in groups
    assert sorted(slot["functions"][0]["group-members"]) == ALL


def test_group_check_names_the_members_left_on_the_host(lab: dict[str, Any]) -> None:
    step = lab["group-check"]
    assert step["class"] == "HostDeviceUnavailable"
    assert f"{SLOT}.0 (driver e1000e" in step["desc"] and f"{SLOT}.3 (driver e1000e" in step["desc"]
    assert step["drivers"] == {a: "e1000e" for a in ALL}  # nothing was touched


def test_function_with_interface_up_is_refused(lab: dict[str, Any]) -> None:
    step = lab["in-use-check"]
    assert step["class"] == "HostDeviceUnavailable"
    assert f"network interface {step['iface']} is up" in step["desc"]
    assert step["drivers"] == {a: "e1000e" for a in ALL}


def test_refused_attach_gives_every_function_back(lab: dict[str, Any]) -> None:
    step = lab["failure-gives-back"]
    assert step["class"] == "QemuError" and "rolled back" in step["desc"]
    assert step["drivers"] == {a: "e1000e" for a in ALL}


def test_failed_bind_leaves_every_function_on_its_driver(lab: dict[str, Any]) -> None:
    """vfio-pci not loaded: the bind fails after driver_override and unbind. Every function is
    back on e1000e with driver_override cleared, none is held, and the journal shows each one
    touched recorded as held before it was touched and given back after."""
    step = lab["bind-fails"]
    assert step["rmmod"] == 0, step["rmmod_err"]
    assert step["class"] == "HostDeviceUnavailable" and "vfio-pci" in step["desc"], step
    assert step["drivers"] == {a: "e1000e" for a in ALL}
    assert set(step["overrides"].values()) == {"(null)"}, step["overrides"]
    assert step["held_by"] == [None] * 4
    touched = [r.split()[1] for r in step["journal"] if r.startswith("host+")]
    assert touched, "nothing was journaled before the sysfs writes"
    for address in touched:
        later = step["journal"][step["journal"].index(f"host+ {address}"):]
        assert f"host- {address}" in later, step["journal"]
    assert lab["vfio-pci-reloaded"]["ok"], lab["vfio-pci-reloaded"]
    MATRIX.append(MatrixRow(
        "host function bind fails half-way (vfio-pci not loaded; nested lab, L1 sysfs)",
        "HostDeviceUnavailable; every function back on its driver",
        "none (L2 QEMU held at start)",
        "all 4 on " + "/".join(sorted(set(step["drivers"].values()))) + ", override cleared",
        "nothing held; journal: held, then given back", "pass"))


def test_functions_1_and_2_assigned_0_and_3_held(lab: dict[str, Any]) -> None:
    step = lab["assigned"]
    assert step["ok"], step
    ret = step["return"]
    assert {f["id"]: f["function"] for f in ret["functions"]} == {"p1": 0, "p2": 2}
    assert sorted(ret["host"]["unassigned"]) == [f"{SLOT}.0", f"{SLOT}.3"]
    assert step["drivers"] == {a: "vfio-pci" for a in ALL}
    assert step["held_by"] == ["l2"] * 4, step["held_by"]   # all four, 0 and 3 included
    # The journal itself (not qmpfd's account) holds every one of them for the VM.
    held = set()
    for rec in step["journal"]:
        kind, address = rec.split()
        held = held | {address} if kind == "host+" else held - {address}
    assert held == set(ALL), step["journal"]
    placed = lab["placement"]["placed"]
    assert placed["p1"]["host"] == f"{SLOT}.1" and placed["p2"]["host"] == f"{SLOT}.2"
    assert placed["p1"]["bus"] == placed["p2"]["bus"]          # one slot of the L2 machine
    assert (placed["p1"]["addr"], placed["p2"]["addr"]) == (0, 2)  # devfn: functions 0 and 2


def test_vm_gone_gives_all_four_back_to_e1000e(lab: dict[str, Any]) -> None:
    assert lab["l2-stopped"]["drivers"] == {a: "vfio-pci" for a in ALL}
    step = lab["given-back"]
    assert step["drivers"] == {a: "e1000e" for a in ALL}
    assert not any(step["held_by"])


def test_vm_remove_keeps_functions_of_a_running_qemu_and_gives_back_a_dead_ones(
        lab: dict[str, Any]) -> None:
    step = lab["vm-remove"]
    assert step["attach"]["ok"], step
    assert step["live"]["ok"] and sorted(step["live"]["return"]["host-held"]) == ALL
    assert step["live_drivers"] == {a: "vfio-pci" for a in ALL}  # its QEMU still uses them
    assert step["readd"]["ok"], step
    assert step["dead"]["ok"] and sorted(step["dead"]["return"]["host-released"]) == ALL
    assert step["drivers"] == {a: "e1000e" for a in ALL}


def test_booted_second_level_guest_sees_two_functions_in_one_slot(lab: dict[str, Any]) -> None:
    assert lab["l2-boot"]["ok"], lab["l2-boot"]
    step = lab["l2-guest-sees"]
    assert step["ok"], step
    assert {f["id"]: f["function"] for f in step["return"]["functions"]} == {"g1": 0, "g2": 2}
    new = step["new"]
    assert len(new) == 2 and len({a.rsplit(".", 1)[0] for a in new}) == 1   # one guest slot
    assert sorted(a.rsplit(".", 1)[1] for a in new) == ["0", "2"]
    assert step["drivers"] == {a: "vfio-pci" for a in ALL}


def test_detach_from_booted_guest_returns_all_four_to_e1000e(lab: dict[str, Any]) -> None:
    step = lab["l2-detached"]
    assert step["ok"], step
    assert sorted(step["return"]["ids"]) == ["g1", "g2"]
    assert step["guest_after"] == []                      # the L2 guest sees none of them
    assert step["drivers"] == {a: "e1000e" for a in ALL}  # unassigned ones given back too
