"""Which slot a new device goes to (pure): the one asked for, if free, else the first free
hotpluggable slot by the rules below. Reads the :class:`~qmpfd.hotplug.slots.SlotTable`;
changes nothing (the attach reserves the slot it is given)."""

from __future__ import annotations

from collections.abc import Callable

from qmpfd.errors import Conflict, InvalidRequest, Unsupported
from qmpfd.hotplug.slots import SlotKey, SlotTable
from qmpfd.qemu.topology import Bus


def choose_slot(table: SlotTable, bus: str | None, slot: int | None, from_top: bool = False,
                suits: Callable[[Bus], bool] | None = None, now: float = 0.0) -> SlotKey:
    """The given slot if it is free, else the first free hotpluggable slot (topology order;
    ``from_top``: the highest, for VMs whose manager allocates from the lowest, as
    libvirt does, so its own later hotplugs do not collide with qmpfd's). An automatic
    choice prefers buses that ``suits`` the request (a multifunction attach: buses whose
    policy can take one); with none, any, so the plan can say why it cannot. A free slot
    held back (:meth:`SlotTable.hold_back`) is chosen automatically only when no other is free: the
    one free soonest."""
    if bus is not None:
        candidates = [table.hotpluggable_bus(bus)]
    else:
        if slot is not None:
            raise InvalidRequest("slot: given without bus")
        candidates = [b for b in table.topology.buses if b.hotpluggable]
        if suits is not None:
            suited = [b for b in candidates if suits(b)]
            candidates = suited + [b for b in candidates if b not in suited]
        if not candidates:
            raise Unsupported("bus: this VM has no hotpluggable PCI bus (pc needs ACPI "
                              "hotplug; q35 needs free pcie-root-ports created at start)")
    later: list[tuple[float, SlotKey]] = []
    for b in candidates:
        if slot is not None:
            table.check_slot_number(b, slot)
            table.check_free((b.name, slot))
            return b.name, slot
        # Empty in QEMU and hotpluggable (the bus's free slots), and claimed by nothing.
        for n in (reversed(b.free_slots) if from_top else b.free_slots):
            key = (b.name, n)
            if table.claim(key) is None:
                wait = table.held_back(key, now)
                if not wait:
                    return key
                later.append((wait, key))
    if later:
        return min(later)[1]
    where = f"bus '{bus}'" if bus else "any hotpluggable bus"
    raise Conflict(f"slot: no free slot on {where}")
