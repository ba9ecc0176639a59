"""The slot table of one VM: one state per slot, and the one place that says what is taken.

The table holds the VM's :class:`~qmpfd.qemu.topology.Topology` (read from QEMU when the VM is
adopted or reconnected) and keeps it current from qmpfd's own accepted ``device_add`` commands
and from QEMU's DEVICE_DELETED events, so planning never asks QEMU again. On top of it, a *claim*
marks a slot that an operation or a queue owns for the moment.

States and the transitions between them (each a method below, with its rule)::

    EMPTY --queue--> QUEUED --unqueue--> EMPTY
    EMPTY|QUEUED --reserve--> ATTACHING --attach_done--> PRESENT
                              ATTACHING --attach_undone--> EMPTY, or UNPLUGGING (rollback waits)
    PRESENT|ORPHANED --begin_unplug--> UNPLUGGING --unplug_ended--> EMPTY (or back to what QEMU
                                                                     still holds)

EMPTY, PRESENT and ORPHANED are read from the topology: a slot whose functions include function 0
is PRESENT; one holding only non-zero functions (invisible to the guest, left by something outside
qmpfd or an old crash) is ORPHANED. The others belong to the one :class:`~qmpfd.hotplug.slot.Slot`
that owns the work on the slot (its queue, its operation, the future that completes when it
ends); the table makes it, checks where each transition starts, and drops it when the work ends.
Pure code: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from qmpfd.errors import Conflict, InvalidRequest, NotFound, Unsupported
from qmpfd.hotplug.pending import PendingSlot
from qmpfd.hotplug.slot import Slot, SlotKey, SlotState, SlotStateError
from qmpfd.qemu.topology import Bus, Function, RawDevice, Topology

__all__ = ["Slot", "SlotKey", "SlotState", "SlotStateError", "SlotTable"]


class SlotTable:
    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        #: the slots a queue or an operation holds, each owned by its one Slot
        self._claims: dict[SlotKey, Slot] = {}
        #: slot -> the time (monotonic, given by the caller) before which it is not reused
        self._held_back: dict[SlotKey, float] = {}
        #: reads of QEMU's topology in progress, and what changed since the first began
        #: (replayed onto each read's result, so a refresh never loses a change it raced)
        self._reads = 0
        self._changes: list[Callable[[Topology], Topology]] = []

    @property
    def topology(self) -> Topology:
        return self._topology

    # -- what is where ---------------------------------------------------------------------
    def functions(self, key: SlotKey) -> tuple[Function, ...]:
        b = self._topology.bus(key[0])
        return b.slot(key[1]).functions if b is not None else ()

    def state(self, key: SlotKey) -> SlotState:
        claim = self._claims.get(key)
        if claim is not None:
            return claim.state
        return self._state_in_qemu(key)

    def _state_in_qemu(self, key: SlotKey) -> SlotState:
        functions = self.functions(key)
        if not functions:
            return SlotState.EMPTY
        b = self._topology.bus(key[0])
        if b is not None and b.hotpluggable and all(f.function != 0 for f in functions):
            return SlotState.ORPHANED
        return SlotState.PRESENT

    def claim(self, key: SlotKey) -> Slot | None:
        """The work on the slot, if any."""
        return self._claims.get(key)

    def in_flight(self) -> list[Slot]:
        """Slots an operation is changing now (ATTACHING, UNPLUGGING)."""
        return [c for c in self._claims.values()
                if c.state in (SlotState.ATTACHING, SlotState.UNPLUGGING)]

    def queued(self, key: SlotKey) -> PendingSlot | None:
        """The functions queued on the slot for its function 0."""
        c = self._claims.get(key)
        return c.queue if c is not None else None

    def queues(self) -> list[PendingSlot]:
        return [c.queue for c in self._claims.values() if c.queue is not None]

    def queued_ids(self) -> set[str]:
        return {f.id for q in self.queues() for f in q.functions.values()}

    def ids_in_use(self) -> set[str]:
        """Ids QEMU has, and ids claimed by queues and attaches not yet in QEMU."""
        return set(self._topology.device_ids()) | {
            i for c in self._claims.values() for i in c.ids}

    def find(self, dev_id: str) -> SlotKey | None:
        found = self._topology.find_device(dev_id)
        return (found[0].name, found[1].slot) if found is not None else None

    def orphans(self) -> list[tuple[SlotKey, list[str]]]:
        out = []
        for b in self._topology.buses:
            for s in b.slots():
                key = (b.name, s.slot)
                if key not in self._claims and self._state_in_qemu(key) is SlotState.ORPHANED:
                    out.append((key, [f.id or f.driver for f in s.functions]))
        return out

    # -- the checks (each rule once, each message once) ------------------------------------
    def bus(self, name: str) -> Bus:
        b = self._topology.bus(name)
        if b is None:
            raise NotFound(f"bus: no PCI bus '{name}' in this VM")
        return b

    def hotpluggable_bus(self, name: str) -> Bus:
        b = self.bus(name)
        if not b.hotpluggable:
            raise Unsupported(f"bus: '{name}' does not support hotplugging")
        return b

    def check_slot_number(self, b: Bus, slot: int) -> None:
        if not 0 <= slot < b.slot_count:
            raise InvalidRequest(f"slot: bus '{b.name}' has slots 0-{b.slot_count - 1}")

    def check_free(self, key: SlotKey) -> None:
        state = self.state(key)
        if state is SlotState.EMPTY:
            return
        claim = self._claims.get(key)
        owners = (list(claim.ids) if claim is not None
                  else [f.id or f.driver for f in self.functions(key)])
        raise Conflict(f"slot: {key[0]} slot {key[1]} is taken ({state.value}: "
                       f"{', '.join(owners) or 'an operation'})")

    def check_new_ids(self, ids: Sequence[tuple[str, str]]) -> None:
        """``ids`` as (field, id): refuse any id QEMU or a claim already uses."""
        in_qemu = self._topology.device_ids()
        for field, dev_id in ids:
            if dev_id in in_qemu:
                raise Conflict(f"{field}: a device with id '{dev_id}' already exists in this VM")
            for key, c in self._claims.items():
                if dev_id in c.ids:
                    raise Conflict(f"{field}: id '{dev_id}' is in use by {key[0]} slot {key[1]} "
                                   f"({c.state.value})")

    def hold_back(self, key: SlotKey, until: float, now: float) -> None:
        """Keep a slot just emptied from new devices until ``until`` (its policy's reuse
        delay: see :mod:`qmpfd.hotplug.policies.acpi_pcihp`)."""
        self._held_back = {k: t for k, t in self._held_back.items() if t > now}
        self._held_back[key] = max(until, self._held_back.get(key, 0.0))

    def held_back(self, key: SlotKey, now: float) -> float:
        """Seconds before the slot may take a new device (0: now)."""
        return max(0.0, self._held_back.get(key, 0.0) - now)

    # -- transitions (each checked by the Slot that owns the work) -------------------------
    def _end(self, key: SlotKey) -> None:
        self._claims.pop(key).end()

    def _expect(self, key: SlotKey, *allowed: SlotState) -> SlotState:
        state = self.state(key)
        if state not in allowed:
            raise SlotStateError(f"slot: {key[0]} slot {key[1]} is {state.value}")
        return state

    def _owner(self, key: SlotKey) -> Slot:
        c = self._claims.get(key)
        if c is None:
            raise SlotStateError(f"slot: {key[0]} slot {key[1]} is "
                                 f"{self._state_in_qemu(key).value}; no operation holds it")
        return c

    def queue(self, key: SlotKey, entry: PendingSlot) -> None:
        """EMPTY|QUEUED -> QUEUED: the slot's queue is now ``entry`` (one more function, or
        a queue restored from the journal)."""
        if self._expect(key, SlotState.EMPTY, SlotState.QUEUED) is SlotState.EMPTY:
            self._claims[key] = Slot(key, SlotState.QUEUED, ())
        self._claims[key].add_to_queue(entry)

    def unqueue(self, key: SlotKey) -> PendingSlot:
        """QUEUED -> EMPTY: the queue is flushed, cancelled or expired; returns it."""
        slot = self._owner(key)
        entry = slot.queue
        slot.end()
        del self._claims[key]
        assert entry is not None, "a QUEUED slot holds its queue"
        return entry

    def reserve(self, key: SlotKey, ids: Iterable[str]) -> Slot:
        """EMPTY -> ATTACHING: the slot is the attach's before the allocation lock is let go,
        so two attaches never get the same slot."""
        self._expect(key, SlotState.EMPTY)
        slot = self._claims[key] = Slot(key, SlotState.ATTACHING, tuple(ids))
        return slot

    def recorded(self, key: SlotKey, operation: str) -> None:
        """ATTACHING|UNPLUGGING: the operation's journal record is written (nothing if the
        work already ended meanwhile: the guest emptied the slot while it was written)."""
        if key in self._claims:
            self._claims[key].recorded(operation)

    def added(self, key: SlotKey, devices: Iterable[RawDevice]) -> None:
        """QEMU accepted these device_adds (or may have: a late reply). A fact about QEMU, not
        a transition: recorded whoever holds the slot now (recovery may have taken it over)."""
        added = tuple(devices)
        self._change(lambda t: t.with_devices(key[0], [d for d in added
                                                       if d.id not in t.device_ids()]))

    def holds(self, key: SlotKey, owner: Slot | None) -> bool:
        """Whether ``owner`` is still the work on the slot (None: whoever it is). Recovery
        after a reconnect can take a slot over from an attach still waiting for QEMU: that
        attach then leaves the slot to it."""
        return owner is None or self._claims.get(key) is owner

    def attach_done(self, key: SlotKey, owner: Slot | None = None) -> None:
        """ATTACHING -> PRESENT (nothing if ``owner`` no longer holds the slot)."""
        if not self.holds(key, owner):
            return
        self._expect(key, SlotState.ATTACHING)
        self._end(key)

    def attach_undone(self, key: SlotKey, left: Sequence[str],
                      owner: Slot | None = None) -> None:
        """ATTACHING -> EMPTY once rolled back; UNPLUGGING while ``left`` are still in QEMU
        (nothing if ``owner`` no longer holds the slot)."""
        if not self.holds(key, owner):
            return
        self._expect(key, SlotState.ATTACHING)
        if left:
            self._claims[key].rollback_waits(left)
        else:
            self._end(key)

    def begin_unplug(self, key: SlotKey, ids: Sequence[str]) -> Slot:
        """PRESENT|ORPHANED -> UNPLUGGING."""
        self._expect(key, SlotState.PRESENT, SlotState.ORPHANED)
        slot = self._claims[key] = Slot(key, SlotState.UNPLUGGING, tuple(ids))
        return slot

    def wait_unplug(self, key: SlotKey, ids: Sequence[str], operation: str) -> None:
        """Recovery: an unplug journaled before a restart is still in flight -> UNPLUGGING
        (whatever the table thought: the journal and QEMU's topology decided)."""
        old = self._claims.pop(key, None)
        if old is not None:
            old.end()
        slot = self._claims[key] = Slot(key, SlotState.UNPLUGGING, tuple(ids))
        slot.recorded(operation)

    def unplug_ended(self, key: SlotKey, owner: Slot | None = None) -> None:
        """UNPLUGGING -> whatever QEMU holds: EMPTY after every DEVICE_DELETED, PRESENT again
        if the guest refused or the wait was given up. ``owner``: the work that ends; a later
        one on the same slot (recovery took it over) is left alone."""
        current = self._claims.get(key)
        if (current is not None and current.state is SlotState.UNPLUGGING
                and (owner is None or current is owner)):
            self._end(key)

    # -- what QEMU tells ---------------------------------------------------------------------
    def deleted(self, dev_id: str) -> None:
        """DEVICE_DELETED: the device is gone, whoever removed it."""
        self._change(lambda t: t.without({dev_id}))

    def _change(self, change: Callable[[Topology], Topology]) -> None:
        self._topology = change(self._topology)
        if self._reads:
            self._changes.append(change)

    def read_started(self) -> int:
        """A read of QEMU's topology begins; pass the mark to :meth:`refresh` (or
        :meth:`read_abandoned`)."""
        self._reads += 1
        return len(self._changes)

    def read_abandoned(self) -> None:
        self._reads -= 1
        if not self._reads:
            self._changes.clear()

    def refresh(self, topology: Topology, since: int | None = None) -> None:
        """A fresh read of QEMU (adopt, reconnect, passthrough, a refusal that says qmpfd's view
        was stale). Claims stay: they are operations qmpfd still runs. ``since``: the mark of
        :meth:`read_started`; what qmpfd learnt while the read ran (its own device_adds, QEMU's
        DEVICE_DELETED) is applied on top, since the read may have missed it."""
        if since is not None:
            for change in self._changes[since:]:
                topology = change(topology)
            self.read_abandoned()
        self._topology = topology
