import pytest

from qmpfd.api.replies import attached
from qmpfd.errors import Conflict, InvalidRequest, NotFound, Unsupported
from qmpfd.hotplug.pending import PendingSlot
from qmpfd.hotplug.plan import FunctionSpec, plan_attach
from qmpfd.hotplug.policies import POLICIES, Policy, policy_for
from qmpfd.hotplug.slots import SlotTable
from qmpfd.qemu.topology import RawBus, Topology
from qmpfd.vm.results import AttachResult
from tests.unit.topologies import pc_raw, q35_raw
from tests.unit.topologies import topo as raw_topo


def specs(n: int, start: int = 0) -> list[FunctionSpec]:
    return [FunctionSpec(f"d{i}", "virtio-rng-pci", i) for i in range(start, start + n)]


def topo(raws: object) -> SlotTable:
    return SlotTable(raw_topo(raws))  # type: ignore[arg-type]


def policies(t: SlotTable | Topology, arch: str = "x86_64") -> dict[str, Policy]:
    buses = t.topology.buses if isinstance(t, SlotTable) else t.buses
    return {b.name: policy_for(arch, "pc", b.mechanism) for b in buses}


def test_non_zero_functions_first_function_zero_last_with_multifunction() -> None:
    t = topo(pc_raw())
    plan = plan_attach(t, specs(4), policies(t))
    assert [s.function for s in plan.steps] == [1, 2, 3, 0]
    assert plan.steps[-1].arguments["multifunction"] is True  # a JSON boolean (QEMU >= 8)
    assert all("multifunction" not in s.arguments for s in plan.steps[:-1])
    assert {s.arguments["addr"] for s in plan.steps} == {f"0x03.{f:#x}" for f in range(4)}
    assert (plan.bus, plan.slot) == ("pci.0", 3)  # 0 host bridge, 1 PIIX, 2 bridge


def test_single_function_is_an_ordinary_device_add() -> None:
    t = topo(pc_raw())
    plan = plan_attach(t, specs(1), policies(t))
    (step,) = plan.steps
    assert step.arguments == {"driver": "virtio-rng-pci", "id": "d0", "bus": "pci.0",
                              "addr": "0x03"}


def test_properties_pass_through() -> None:
    t = topo(pc_raw())
    plan = plan_attach(t, [FunctionSpec("n", "e1000", 0, {"mac": "52:54:00:00:00:01"})],
                       policies(t))
    assert plan.steps[0].arguments["mac"] == "52:54:00:00:00:01"


def test_taken_slots_are_skipped_so_concurrent_attaches_differ() -> None:
    t = topo(q35_raw(native=True))
    first = plan_attach(t, specs(2), policies(t))
    t.reserve((first.bus, first.slot), first.ids)
    second = plan_attach(t, [FunctionSpec(f"e{i}", "e1000", i) for i in range(2)], policies(t))
    assert (first.bus, first.slot) == ("rp1", 0)
    assert (second.bus, second.slot) == ("rp2", 0)


def test_no_free_slot_is_a_conflict() -> None:
    t = topo(q35_raw(native=True))
    with pytest.raises(Conflict, match="no free slot"):
        t.reserve(("rp1", 0), ["x"])
        t.reserve(("rp2", 0), ["y"])
        plan_attach(t, specs(2), policies(t))


def test_given_slot_occupied_names_the_owner() -> None:
    t = topo(q35_raw(native=True, occupied_rp1=True))
    with pytest.raises(Conflict, match="nic0"):
        plan_attach(t, specs(2), policies(t), bus="rp1", slot=0)


def test_non_hotpluggable_bus_and_unknown_bus() -> None:
    t = topo(q35_raw(native=True))
    with pytest.raises(Unsupported, match=r"pcie\.0"):
        plan_attach(t, specs(2), policies(t), bus="pcie.0")
    with pytest.raises(NotFound, match="nope"):
        plan_attach(t, specs(2), policies(t), bus="nope")


def test_slot_number_beyond_a_port() -> None:
    t = topo(q35_raw(native=True))
    with pytest.raises(InvalidRequest, match="slots 0-0"):
        plan_attach(t, specs(2), policies(t), bus="rp1", slot=3)


def test_id_clash_with_existing_device_or_queue() -> None:
    t = topo(q35_raw(native=True, occupied_rp1=True))
    with pytest.raises(Conflict, match="nic0"):
        plan_attach(t, [FunctionSpec("nic0", "e1000", 0)], policies(t))
    queued = PendingSlot("rp2", 0, expires_at=100.0)
    queued.add(FunctionSpec("d0", "e1000", 1))
    t.queue(("rp2", 0), queued)
    with pytest.raises(Conflict, match=r"functions\[0\]\.id: id 'd0' is in use by rp2 slot 0"):
        plan_attach(t, specs(1), policies(t))


@pytest.mark.parametrize(("functions", "field"), [
    ([], "functions"),
    (specs(9), "functions"),
    ([FunctionSpec("a", "e1000", 0), FunctionSpec("a", "e1000", 1)], "functions[1].id"),
    ([FunctionSpec("a", "e1000", 0), FunctionSpec("b", "e1000", 0)], "functions[1].function"),
    ([FunctionSpec("a", "e1000", 1), FunctionSpec("b", "e1000", 2)], "no function 0"),
    ([FunctionSpec("a", "e1000", 0, {"bus": "x"})], "functions[0].properties.bus"),
])
def test_request_rules_name_the_field(functions: list[FunctionSpec], field: str) -> None:
    t = topo(pc_raw())
    with pytest.raises(InvalidRequest, match=field.replace("[", r"\[").replace("]", r"\]")):
        plan_attach(t, functions, policies(t))


def test_s390_refuses_multifunction_before_anything_is_planned() -> None:
    t = topo(pc_raw())
    with pytest.raises(Unsupported, match="s390"):
        plan_attach(t, specs(2), policies(t, arch="s390x"))
    assert plan_attach(t, specs(1), policies(t, arch="s390x")).steps  # one function is fine


def test_unsupported_architecture_is_clear() -> None:
    t = topo(pc_raw())
    with pytest.raises(Unsupported, match="riscv64"):
        plan_attach(t, specs(2), {b.name: policy_for("riscv64", "virt", b.mechanism)
                                  for b in t.topology.buses})


def test_rollback_acpi_ejects_slot_once_native_removes_each_hidden_function() -> None:
    t_acpi, t_native = topo(pc_raw()), topo(q35_raw(native=True))
    acpi = plan_attach(t_acpi, specs(4), policies(t_acpi))
    native = plan_attach(t_native, specs(4), policies(t_native))
    # Failed at function 0: functions 1-3 are in QEMU, hidden from the guest.
    assert [s.id for s in acpi.rollback_steps(["d1", "d2", "d3"])] == ["d1"]
    assert [s.id for s in native.rollback_steps(["d1", "d2", "d3"])] == ["d1", "d2", "d3"]
    # Failed in verification: everything is in, one device_del removes the slot.
    assert [s.id for s in native.rollback_steps(["d1", "d2", "d3", "d0"])] == ["d0"]
    assert acpi.rollback_steps([]) == []


def test_dry_run_description_lists_steps_and_rollback() -> None:
    t = topo(pc_raw())
    d = attached(AttachResult("vm1", plan_attach(t, specs(2), policies(t)), dry_run=True))
    assert d["dry-run"] is True
    assert d["policy"] == "acpi-pcihp"
    assert [s["arguments"]["id"] for s in d["steps"]] == ["d1", "d0"]
    assert d["rollback"] == [{"execute": "device_del", "arguments": {"id": "d0"}}]


def test_config_timeout_override() -> None:
    p = POLICIES["pcie-native"].with_timeouts(None, 99)
    assert p.timeouts.unplug == 99 and p.timeouts.plug == POLICIES["pcie-native"].timeouts.plug
    assert p.rollback_targets  # still the native policy's behaviour


def test_automatic_choice_skips_buses_that_cannot_take_a_multifunction_device() -> None:
    """A bridge on its own SHPC controller comes first in topology order; a 2-function attach
    goes to the first bus whose policy can take it, a single function may use the bridge."""
    shpc = RawBus(name="hb", path="/machine/peripheral/hb/hb", bus_type="PCI",
                  owner_type="pci-bridge", owner_is_pci_device=True,
                  handler_path="/machine/peripheral/hb", handler_type="pci-bridge")
    t = topo([shpc, *pc_raw(with_bridge=False)])
    assert plan_attach(t, specs(2), policies(t)).bus == "pci.0"
    assert plan_attach(t, specs(1), policies(t)).bus == "hb"
    with pytest.raises(Unsupported, match="SHPC"):
        plan_attach(t, specs(2), policies(t), bus="hb")
