"""The guest's PCI topology as QEMU's object model describes it: pure data, no I/O.

qmpfd.qemu.introspect reads QEMU (``qom-list``/``qom-get``) into :class:`RawBus` records; this
module turns them into :class:`Topology`, which answers the questions planning needs: which buses
can hotplug, by which mechanism, and which slots are free.

Why QOM and not ``query-pci``: ``query-pci`` finds buses behind bridges by the bus numbers the
guest firmware assigned, so a VM still in its firmware (or paused at start) shows nothing behind
its root ports. QOM gives the qdev bus names ``device_add`` needs and the hotplug handler of every
bus, whatever the guest has done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property

# Handlers implementing ACPI PCI hotplug (hw/acpi/pcihp.c): PIIX4 PM on pc, ICH9 LPC on q35.
ACPI_PCIHP_HANDLERS = frozenset({"PIIX4_PM", "ICH9-LPC"})
# Devices that provide a native PCIe hotplug slot (hw/pci/pcie.c): the port is its own handler.
PCIE_PORT_TYPES = frozenset({"pcie-root-port", "ioh3420", "xio3130-downstream"})
# An upstream port's bus only takes downstream ports, never an endpoint device.
UPSTREAM_PORT_TYPES = frozenset({"x3130-upstream"})
# arm64 virt, QEMU >= 10.1: ACPI PCI hotplug through the generic event device (opt-in).
ACPI_GED_HANDLERS = frozenset({"acpi-ged"})
# A pseries PHB is the hotplug handler of its own root bus (hw/ppc/spapr_pci.c).
SPAPR_HANDLERS = frozenset({"spapr-pci-host-bridge"})
# s390x: the zPCI host bridge handles its bus (hw/s390x/s390-pci-bus.c); no multifunction.
ZPCI_HANDLERS = frozenset({"s390-pcihost"})

MECH_ACPI = "acpi-pcihp"
MECH_PCIE = "pcie-native"
MECH_SPAPR = "spapr"
MECH_SHPC = "shpc"
MECH_ZPCI = "zpci"
MECH_ACPI_GED = "acpi-ged"


@dataclass(frozen=True)
class RawDevice:
    """A device on a bus: QOM path, QOM type (the driver), devfn."""

    path: str
    type: str
    devfn: int

    @cached_property
    def id(self) -> str | None:
        """The user-given id (devices under /machine/peripheral); None for built-in devices
        (worked out once: every change of the topology asks it of every device)."""
        prefix = "/machine/peripheral/"
        if self.path.startswith(prefix) and "/" not in self.path[len(prefix):]:
            return self.path[len(prefix):]
        return None

    @property
    def slot(self) -> int:
        return self.devfn >> 3

    @property
    def function(self) -> int:
        return self.devfn & 7


@dataclass(frozen=True)
class RawBus:
    """One PCI bus as read from QOM."""

    name: str                       # qdev bus name, what device_add's "bus" takes
    path: str                       # QOM path of the bus
    bus_type: str                   # QOM type: "PCI", "PCIE", ...
    owner_type: str                 # type of the host bridge or bridge/port owning the bus
    owner_is_pci_device: bool       # a bridge or port (True) or a host bridge (False)
    handler_path: str               # hotplug-handler link, "" when the bus cannot hotplug
    handler_type: str | None        # QOM type of that handler
    devices: tuple[RawDevice, ...] = ()
    #: a root bus under ACPI hotplug: the handler's ``acpi-root-pci-hotplug`` (PIIX4 has it, on
    #: by default; ICH9 has none, its root complex never takes hotplug)
    root_hotplug: bool = True


@dataclass(frozen=True)
class Function:
    function: int
    id: str | None
    driver: str


@dataclass(frozen=True)
class Slot:
    bus: str
    slot: int
    hotpluggable: bool
    functions: tuple[Function, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.functions


def _functions_by_slot(devices: Iterable[RawDevice]) -> dict[int, tuple[Function, ...]]:
    by: dict[int, list[Function]] = {}
    for d in devices:
        by.setdefault(d.slot, []).append(Function(d.function, d.id, d.type))
    return {n: tuple(sorted(fs, key=lambda f: f.function)) for n, fs in by.items()}


@dataclass(frozen=True)
class Bus:
    name: str
    path: str
    mechanism: str | None          # None: this bus cannot hotplug
    slot_count: int
    owner_type: str
    devices: tuple[RawDevice, ...] = ()

    @property
    def hotpluggable(self) -> bool:
        return self.mechanism is not None

    @cached_property
    def _by_slot(self) -> dict[int, tuple[Function, ...]]:
        """The functions of each occupied slot, built once: the planner asks for every slot
        of every bus, and scanning the devices per slot made that quadratic."""
        return _functions_by_slot(self.devices)

    @cached_property
    def free_slots(self) -> tuple[int, ...]:
        """The empty slots of a hotpluggable bus (none otherwise), lowest first: choosing a
        slot reads them instead of building a :class:`Slot` per slot of every bus."""
        if not self.hotpluggable:
            return ()
        taken = self._by_slot      # a comprehension: one call (a generator resumes per slot)
        return tuple([n for n in range(self.slot_count) if n not in taken])

    def holding(self, devices: tuple[RawDevice, ...], changed: Collection[int]) -> Bus:
        """This bus with ``devices`` instead of its own, where only the slots ``changed``
        differ: slot lists already built are carried over, only those slots built again (an
        attach or a detach changes one slot of one bus)."""
        new = replace(self, devices=devices)
        if "_by_slot" not in self.__dict__:
            return new
        by = {n: fs for n, fs in self._by_slot.items() if n not in changed}
        by.update(_functions_by_slot(d for d in devices if d.slot in changed))
        new.__dict__["_by_slot"] = by
        if "free_slots" in self.__dict__:
            new.__dict__["free_slots"] = tuple(sorted(
                {n for n in self.free_slots if n not in by}
                | {n for n in changed if n not in by and self.hotpluggable}))
        return new

    def slot(self, number: int) -> Slot:
        functions = self._by_slot.get(number, ())
        # A slot holding a built-in device (the host bridge, the PIIX, anything without an id
        # under /machine/peripheral) cannot be unplugged or plugged into, even on a
        # hotpluggable bus.
        built_in = any(f.id is None for f in functions)
        return Slot(self.name, number, self.hotpluggable and not built_in, functions)

    def slots(self) -> list[Slot]:
        """Every slot of a hotpluggable bus; only the occupied ones of any other bus."""
        if self.hotpluggable:
            return [self.slot(n) for n in range(self.slot_count)]
        used = sorted({d.slot for d in self.devices})
        return [self.slot(n) for n in used]


def mechanism_of(raw: RawBus) -> str | None:
    """Which hotplug mechanism serves this bus, from its hotplug handler; None when QEMU would
    refuse a ``device_add`` on it.

    A handler link alone does not say the bus takes hotplug: QEMU >= 8 links q35's root complex
    (pcie.0) to ICH9's ACPI handler (for acpi-index) while its ``is_hotpluggable_bus`` refuses
    every device there ("Bus 'pcie.0' does not support hotplugging", seen on 10.0 and 11.1). A
    PCIe root complex has no hotplug slots on any version, and an ACPI root bus takes hotplug
    only where the handler says so (``acpi-root-pci-hotplug``).
    """
    if not raw.handler_path or raw.owner_type in UPSTREAM_PORT_TYPES:
        return None
    if raw.bus_type == "PCIE" and not raw.owner_is_pci_device:
        return None
    if raw.handler_type in ACPI_PCIHP_HANDLERS:
        if not raw.owner_is_pci_device and not raw.root_hotplug:
            return None
        return MECH_ACPI
    if raw.handler_type in ACPI_GED_HANDLERS:
        return MECH_ACPI_GED
    if raw.handler_type in PCIE_PORT_TYPES or (
        raw.bus_type == "PCIE" and raw.owner_is_pci_device
        and raw.handler_type == raw.owner_type
    ):
        return MECH_PCIE
    if raw.handler_type in SPAPR_HANDLERS:
        return MECH_SPAPR
    if raw.handler_type in ZPCI_HANDLERS:
        return MECH_ZPCI
    if raw.handler_type in {"pci-bridge", "pci-bridge-seat", "pcie-pci-bridge"}:
        return MECH_SHPC
    return None


def slot_count_of(raw: RawBus) -> int:
    # A PCIe port's link leads to exactly one device number (slot 0, functions 0-7).
    if raw.bus_type == "PCIE" and raw.owner_is_pci_device and raw.owner_type in PCIE_PORT_TYPES:
        return 1
    return 32


@dataclass(frozen=True)
class Topology:
    buses: tuple[Bus, ...] = field(default_factory=tuple)

    @classmethod
    def from_raw(cls, raws: list[RawBus]) -> Topology:
        return cls(tuple(
            Bus(r.name, r.path, mechanism_of(r), slot_count_of(r), r.owner_type, r.devices)
            for r in raws))

    @cached_property
    def _by_name(self) -> dict[str, Bus]:
        by: dict[str, Bus] = {}
        for b in self.buses:
            by.setdefault(b.name, b)      # the first of a name, as a scan in order finds it
        return by

    def bus(self, name: str) -> Bus | None:
        return self._by_name.get(name)

    @cached_property
    def _device_ids(self) -> frozenset[str]:
        return frozenset({i for b in self.buses for d in b.devices if (i := d.id) is not None})

    def device_ids(self) -> frozenset[str]:
        """Every user-given device id in the VM (computed once per topology read)."""
        return self._device_ids

    def find_device(self, dev_id: str) -> tuple[Bus, RawDevice] | None:
        return next(((b, d) for b in self.buses for d in b.devices if d.id == dev_id), None)

    def slots(self) -> list[Slot]:
        return [s for b in self.buses for s in b.slots()]

    # -- keeping it current without re-reading QEMU (each returns a new Topology) -----------
    def with_devices(self, bus: str, devices: Iterable[RawDevice]) -> Topology:
        """The topology after QEMU accepted ``device_add`` of ``devices`` on ``bus``."""
        added = tuple(devices)
        new = Topology(tuple(
            b.holding(tuple(sorted(b.devices + added, key=lambda d: d.devfn)),
                      {d.slot for d in added})
            if b.name == bus else b for b in self.buses))
        if "_device_ids" in self.__dict__:
            # Known already: carried over, not recounted over every device (once per attach).
            new.__dict__["_device_ids"] = self._device_ids | {
                i for d in added if (i := d.id) is not None}
        return new

    def without(self, ids: Collection[str]) -> Topology:
        """The topology after QEMU deleted the devices ``ids`` (DEVICE_DELETED), and with
        them any bus they carried."""
        paths = [d.path + "/" for b in self.buses for d in b.devices if d.id in ids]
        if not paths:
            return self
        kept: list[Bus] = []
        dropped: set[str] = set(ids)
        for b in self.buses:
            if any(b.path.startswith(p) for p in paths):     # behind a deleted bridge or port
                dropped.update(i for d in b.devices if (i := d.id) is not None)
            elif any(d.id in ids for d in b.devices):
                kept.append(b.holding(tuple(d for d in b.devices if d.id not in ids),
                                      {d.slot for d in b.devices if d.id in ids}))
            else:
                kept.append(b)          # unchanged: its slot lists stay built
        new = Topology(tuple(kept))
        if "_device_ids" in self.__dict__:
            new.__dict__["_device_ids"] = self._device_ids - dropped
        return new

    def mechanisms(self) -> list[str]:
        """Mechanisms in use, most common first (the VM's headline policy)."""
        return [m for m, _ in Counter(b.mechanism for b in self.buses if b.mechanism)
                .most_common()]


def peripheral(dev_id: str, driver: str, slot: int, function: int) -> RawDevice:
    """The device QEMU creates for ``device_add`` with an id (under /machine/peripheral)."""
    device = RawDevice(f"/machine/peripheral/{dev_id}", driver, slot << 3 | function)
    device.__dict__["id"] = dev_id      # known: not worked out again from the path
    return device


#: device_add of these creates a new bus, which qmpfd learns only by reading QOM again.
BUS_CREATING_HINTS = ("bridge", "port", "upstream", "downstream", "pxb", "switch")


def creates_bus(driver: str) -> bool:
    return any(h in driver for h in BUS_CREATING_HINTS)
