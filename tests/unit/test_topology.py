from dataclasses import replace

import pytest

from qmpfd.errors import Unsupported
from qmpfd.hotplug.policies import policy_for
from qmpfd.qemu.introspect import VmIdentity
from qmpfd.qemu.topology import MECH_ACPI, MECH_ACPI_GED, MECH_PCIE, MECH_SHPC, RawBus, RawDevice
from qmpfd.qemu.versions import check_supported
from tests.unit.topologies import pc_raw, q35_raw, switch_raw, topo


def test_pc_root_and_bridge_use_acpi_and_have_32_slots() -> None:
    t = topo(pc_raw())
    assert [(b.name, b.mechanism, b.slot_count) for b in t.buses] == [
        ("pci.0", MECH_ACPI, 32), ("br1", MECH_ACPI, 32)]


def test_q35_root_complex_is_not_hotpluggable_ports_have_one_slot() -> None:
    t = topo(q35_raw(native=False))
    assert t.bus("pcie.0") is not None and not t.bus("pcie.0").hotpluggable  # type: ignore[union-attr]
    assert {b.name: (b.mechanism, b.slot_count) for b in t.buses if b.hotpluggable} == {
        "rp1": (MECH_ACPI, 1), "rp2": (MECH_ACPI, 1)}


def test_q35_with_acpi_hotplug_off_is_native() -> None:
    t = topo(q35_raw(native=True))
    assert t.mechanisms() == [MECH_PCIE]


def test_switch_downstream_ports_hotplug_upstream_does_not() -> None:
    t = topo(switch_raw())
    up, dn1 = t.bus("up1"), t.bus("dn1")
    assert up is not None and dn1 is not None
    assert not up.hotpluggable
    assert dn1.mechanism == MECH_PCIE and dn1.slot_count == 1


def test_slots_list_empty_hotpluggable_and_occupied_fixed_slots() -> None:
    t = topo(q35_raw(native=True, occupied_rp1=True))
    listed = [(s.bus, s.slot, [f.id for f in s.functions]) for s in t.slots()]
    assert ("rp1", 0, ["nic0"]) in listed and ("rp2", 0, []) in listed
    assert ("pcie.0", 0, [None]) in listed           # built-in mch: listed, no id
    assert not any(b == "pcie.0" and not ids for b, _, ids in listed)


def test_device_ids_only_for_peripherals() -> None:
    d = RawDevice("/machine/peripheral/nic0", "e1000", 0x2A)
    assert (d.id, d.slot, d.function) == ("nic0", 5, 2)
    assert RawDevice("/machine/peripheral/nic0/virtio-backend", "x", 0).id is None
    assert RawDevice("/machine/unattached/device[3]", "PIIX3", 8).id is None


def test_pseries_phb_is_its_own_handler_spapr() -> None:
    from qmpfd.qemu.topology import MECH_SPAPR, RawBus, Topology
    phb = RawBus(name="pci.0", path="/machine/unattached/device[4]/pci.0", bus_type="PCI",
                 owner_type="spapr-pci-host-bridge", owner_is_pci_device=False,
                 handler_path="/machine/unattached/device[4]",
                 handler_type="spapr-pci-host-bridge")
    t = Topology.from_raw([phb])
    assert t.buses[0].mechanism == MECH_SPAPR and t.buses[0].slot_count == 32


def test_pcie_root_complex_with_an_acpi_handler_still_takes_no_hotplug() -> None:
    """QEMU >= 8 links q35's pcie.0 to ICH9's ACPI handler, yet refuses device_add there."""
    root, *ports = q35_raw(native=False)
    linked = replace(root, handler_path="/machine/unattached/device[2]", handler_type="ICH9-LPC",
                     root_hotplug=False)
    t = topo([linked, *ports])
    assert not t.bus("pcie.0").hotpluggable  # type: ignore[union-attr]
    assert t.bus("rp1").mechanism == MECH_ACPI  # type: ignore[union-attr]


def test_acpi_root_bus_follows_the_handlers_root_hotplug_property() -> None:
    root, bridge = pc_raw()
    assert topo([replace(root, root_hotplug=False), bridge]).bus("pci.0").mechanism is None  # type: ignore[union-attr]
    assert topo([root, bridge]).bus("pci.0").mechanism == MECH_ACPI  # type: ignore[union-attr]
    # a bridge's bus is not a root bus: the property does not apply to it
    assert topo([replace(root, root_hotplug=False), bridge]).bus("br1").mechanism == MECH_ACPI  # type: ignore[union-attr]


def test_acpi_ged_and_shpc_are_recognised_and_refused_by_name() -> None:
    port = RawBus(name="rp1", path="/machine/peripheral/rp1/rp1", bus_type="PCIE",
                  owner_type="pcie-root-port", owner_is_pci_device=True,
                  handler_path="/machine/unattached/device[5]", handler_type="acpi-ged")
    bridge = RawBus(name="hb", path="/machine/peripheral/hb/hb", bus_type="PCI",
                    owner_type="pci-bridge", owner_is_pci_device=True,
                    handler_path="/machine/peripheral/hb", handler_type="pci-bridge")
    t = topo([port, bridge])
    assert t.bus("rp1").mechanism == MECH_ACPI_GED  # type: ignore[union-attr]
    assert t.bus("hb").mechanism == MECH_SHPC  # type: ignore[union-attr]
    ged = policy_for("aarch64", "virt-10.1", MECH_ACPI_GED)
    shpc = policy_for("x86_64", "pc-q35-10.0", MECH_SHPC)
    assert not ged.multifunction and "acpi-ged" in (ged.unsupported_reason or "")
    assert not shpc.multifunction and "SHPC" in (shpc.unsupported_reason or "")


@pytest.mark.parametrize(("version", "refused"), [((5, 2, 0), True), ((6, 2, 0), True),
                                                  ((7, 1, 0), True), ((7, 2, 0), False),
                                                  ((11, 1, 3), False)])
def test_qemu_older_than_the_minimum_is_refused_naming_it(version: tuple[int, int, int],
                                                          refused: bool) -> None:
    ident = VmIdentity("x86_64", "pc-i440fx", ".".join(map(str, version)), version)
    if refused:
        with pytest.raises(Unsupported, match=r"minimum is QEMU 7\.2"):
            check_supported(ident)
    else:
        check_supported(ident)


def test_a_device_id_is_worked_out_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: attaches and detaches ask every device for its id; each device works it out
    from its QOM path once (a device qmpfd plugged never: its id is known), and the answers
    are the same as before."""
    from functools import cached_property

    from qmpfd.qemu.topology import peripheral
    worked: list[str] = []
    real = RawDevice.id.func  # type: ignore[attr-defined]

    def counting(self: RawDevice) -> str | None:
        worked.append(self.path)
        return real(self)  # type: ignore[no-any-return]
    prop = cached_property(counting)
    prop.__set_name__(RawDevice, "id")
    monkeypatch.setattr(RawDevice, "id", prop)
    t = topo(pc_raw())
    read = {d.path for b in t.buses for d in b.devices}      # as read from QEMU
    for n in range(5):
        t = t.with_devices("pci.0", [peripheral(f"d{n}", "virtio-rng-pci", 10 + n, 0)])
        assert t.find_device(f"d{n}") is not None and f"d{n}" in t.device_ids()
        t = t.without([f"d{n}"])
        assert t.find_device(f"d{n}") is None
    assert len(worked) == len(set(worked)), "no device worked its id out twice"
    assert set(worked) <= read, "the plugged devices' ids were known"
    assert RawDevice("/machine/peripheral/x", "t", 0).id == "x"
    assert RawDevice("/machine/peripheral/x/y", "t", 0).id is None
    assert RawDevice("/machine/i440fx/pci.0", "t", 0).id is None
