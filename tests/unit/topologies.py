"""Topologies as QEMU 7.2 reports them (read from real VMs with qmpfd.qemu.introspect), as data."""

from __future__ import annotations

from qmpfd.qemu.topology import RawBus, RawDevice, Topology

ACPI = "/machine/unattached/device[24]"


def pc_raw(with_bridge: bool = True) -> list[RawBus]:
    root = RawBus(
        name="pci.0", path="/machine/i440fx/pci.0", bus_type="PCI", owner_type="i440FX-pcihost",
        owner_is_pci_device=False, handler_path=ACPI, handler_type="PIIX4_PM",
        devices=(RawDevice("/machine/unattached/device[2]", "i440FX", 0),
                 RawDevice("/machine/unattached/device[3]", "PIIX3", 8),
                 RawDevice("/machine/unattached/device[4]", "piix3-ide", 9),
                 RawDevice("/machine/unattached/device[5]", "PIIX4_PM", 11),
                 *([RawDevice("/machine/peripheral/br1", "pci-bridge", 16)] if with_bridge
                   else [])))
    buses = [root]
    if with_bridge:
        buses.append(RawBus(
            name="br1", path="/machine/peripheral/br1/br1", bus_type="PCI",
            owner_type="pci-bridge", owner_is_pci_device=True, handler_path=ACPI,
            handler_type="PIIX4_PM"))
    return buses


def q35_raw(native: bool, occupied_rp1: bool = False) -> list[RawBus]:
    def port(name: str, devices: tuple[RawDevice, ...] = ()) -> RawBus:
        return RawBus(
            name=name, path=f"/machine/peripheral/{name}/{name}", bus_type="PCIE",
            owner_type="pcie-root-port", owner_is_pci_device=True,
            handler_path=f"/machine/peripheral/{name}" if native else "/machine/q35/lpc",
            handler_type="pcie-root-port" if native else "ICH9-LPC", devices=devices)

    root = RawBus(
        name="pcie.0", path="/machine/q35/pcie.0", bus_type="PCIE", owner_type="q35-pcihost",
        owner_is_pci_device=False, handler_path="", handler_type=None,
        devices=(RawDevice("/machine/unattached/device[2]", "mch", 0),
                 RawDevice("/machine/peripheral/rp1", "pcie-root-port", 0x10 << 3),
                 RawDevice("/machine/peripheral/rp2", "pcie-root-port", 0x11 << 3),
                 RawDevice("/machine/unattached/device[9]", "ICH9-LPC", 0x1F << 3)))
    rp1_devices = (RawDevice("/machine/peripheral/nic0", "e1000", 0),) if occupied_rp1 else ()
    return [root, port("rp1", rp1_devices), port("rp2")]


def switch_raw() -> list[RawBus]:
    """q35 native: rp1 -> x3130-upstream up1 -> xio3130-downstream dn1, dn2."""
    root, rp1, _ = q35_raw(native=True)
    rp1 = RawBus(**{**rp1.__dict__, "devices": (RawDevice("/machine/peripheral/up1",
                                                          "x3130-upstream", 0),)})
    up = RawBus(name="up1", path="/machine/peripheral/up1/up1", bus_type="PCIE",
                owner_type="x3130-upstream", owner_is_pci_device=True, handler_path="",
                handler_type=None,
                devices=(RawDevice("/machine/peripheral/dn1", "xio3130-downstream", 0),
                         RawDevice("/machine/peripheral/dn2", "xio3130-downstream", 8)))
    dns = [RawBus(name=n, path=f"/machine/peripheral/{n}/{n}", bus_type="PCIE",
                  owner_type="xio3130-downstream", owner_is_pci_device=True,
                  handler_path=f"/machine/peripheral/{n}", handler_type="xio3130-downstream")
           for n in ("dn1", "dn2")]
    return [root, rp1, up, *dns]


def topo(raws: list[RawBus]) -> Topology:
    return Topology.from_raw(raws)
