"""Host PCI model and assignment rules, on sysfs captured from the nested VFIO lab's guest (q35
with an emulated Intel IOMMU, a 4-function e1000e device behind root port rp1 at 0000:01:00)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qmpfd.errors import Conflict, HostDeviceUnavailable, InvalidRequest, NotFound
from qmpfd.host.assign import DenyRule, HostFunctionRequest, plan_host_assignment
from qmpfd.host.pciids import PciIds
from qmpfd.host.sysfs import HostPci, normalize_address, read_host
from tests.unit.capture_sysfs import rebuild

SLOT = "0000:01:00"


@pytest.fixture
def host(tmp_path: Path) -> HostPci:
    sysfs, proc = rebuild("q35-iommu-4fn", tmp_path)
    return read_host(sysfs, proc)


def with_driver(host: HostPci, address: str, driver: str | None, **kw: object) -> HostPci:
    fns = dict(host.functions)
    fns[address] = dataclasses.replace(fns[address], driver=driver, **kw)  # type: ignore[arg-type]
    return dataclasses.replace(host, functions=fns)


def req(i: int, **kw: object) -> HostFunctionRequest:
    return HostFunctionRequest(id=f"h{i}", host=f"{SLOT}.{i}", **kw)  # type: ignore[arg-type]


def test_captured_device_is_one_multifunction_slot_in_one_group(host: HostPci) -> None:
    slot = host.slots()[SLOT]
    assert [f.function for f in slot] == [0, 1, 2, 3]
    assert slot[0].multifunction  # header type bit 7 of function 0, read from config space
    assert {f.vendor for f in slot} == {0x8086} and {f.class_code >> 16 for f in slot} == {0x02}
    groups = {f.iommu_group for f in slot}
    assert len(groups) == 1
    (group,) = groups
    assert group is not None and set(host.groups[group]) == {f.address for f in slot}


def test_partial_assignment_maps_lowest_to_function_zero(host: HostPci) -> None:
    plan = plan_host_assignment([req(0, unassigned=True), req(1), req(2),
                                 req(3, unassigned=True)], host, vm="vm1")
    assert plan.guest == {"h1": 0, "h2": 2}
    assert set(plan.unassigned) == {f"{SLOT}.0", f"{SLOT}.3"}
    assert [a for a, _ in plan.bind] == [f"{SLOT}.{i}" for i in range(4)]


def test_explicit_mapping_and_host_numbers_by_default(host: HostPci) -> None:
    plan = plan_host_assignment([req(i) for i in range(4)], host, vm="vm1")
    assert plan.guest == {f"h{i}": i for i in range(4)}
    mapped = plan_host_assignment([req(1, function=0), req(2, function=1), req(0, unassigned=True),
                                   req(3, unassigned=True)], host, vm="vm1")
    assert mapped.guest == {"h1": 0, "h2": 1}
    with pytest.raises(InvalidRequest, match="all assigned"):
        plan_host_assignment([req(1, function=0), req(2), req(0, unassigned=True),
                              req(3, unassigned=True)], host, vm="vm1")


def test_group_member_left_on_host_driver_blocks(host: HostPci) -> None:
    h = with_driver(host, f"{SLOT}.3", "e1000e")
    with pytest.raises(HostDeviceUnavailable, match=rf"{SLOT}\.3 \(driver e1000e"):
        plan_host_assignment([req(0), req(1), req(2)], h, vm="vm1")
    # Listing it as unassigned makes the group viable.
    ok = plan_host_assignment([req(0), req(1), req(2), req(3, unassigned=True)], h, vm="vm1")
    assert (f"{SLOT}.3", "e1000e") in ok.bind


def test_function_in_use_by_the_host_is_refused_unless_forced_and_allowed(host: HostPci) -> None:
    h = with_driver(host, f"{SLOT}.1", "e1000e", net=(("enp1s0f1", "up"),))
    requests = [req(0), req(1), req(2), req(3)]
    with pytest.raises(HostDeviceUnavailable, match="enp1s0f1 is up"):
        plan_host_assignment(requests, h, vm="vm1")
    with pytest.raises(HostDeviceUnavailable, match="force is disabled"):
        plan_host_assignment(requests, h, vm="vm1", force=True)
    assert plan_host_assignment(requests, h, vm="vm1", force=True, allow_force=True).guest


def test_deny_policy_by_class_and_ids(host: HostPci) -> None:
    with pytest.raises(HostDeviceUnavailable, match="no NICs today"):
        plan_host_assignment([req(0)], host, vm="v",
                             deny=[DenyRule("no NICs today", class_prefix="0x0200")])
    with pytest.raises(HostDeviceUnavailable, match="BMC"):
        plan_host_assignment([req(0)], host, vm="v",
                             deny=[DenyRule("BMC", vendor_device=(0x8086, 0x10D3))])


def test_held_for_another_vm_and_unknown_or_bad_addresses(host: HostPci) -> None:
    with pytest.raises(Conflict, match="vm2"):
        plan_host_assignment([req(0)], host, vm="vm1", held_by={f"{SLOT}.0": "vm2"})
    with pytest.raises(NotFound, match=r"0000:09:00\.0"):
        plan_host_assignment([HostFunctionRequest("x", "9:00.0")], host, vm="v")
    with pytest.raises(InvalidRequest, match="not a PCI address"):
        plan_host_assignment([HostFunctionRequest("x", "zz")], host, vm="v")
    assert normalize_address("1:00.1") == "0000:01:00.1"


def test_pci_ids_names() -> None:
    ids = PciIds.parse("8086  Intel Corporation\n\t10d3  82574L Gigabit Network Connection\n"
                       "C 02  Network controller\n\t00  Ethernet controller\n")
    assert ids.vendor(0x8086) == "Intel Corporation"
    assert ids.device(0x8086, 0x10D3) == "82574L Gigabit Network Connection"
    assert ids.class_name(0x020000) == "Ethernet controller"
    assert ids.class_name(0x028000) == "Network controller"


def test_a_function_without_an_iommu_group_is_refused(host: HostPci) -> None:
    no_group = with_driver(host, f"{SLOT}.1", "e1000e", iommu_group=None)
    with pytest.raises(HostDeviceUnavailable, match=r"functions\[0\]\.host: .* has no IOMMU group"):
        plan_host_assignment([req(1)], no_group, vm="vm1")
