"""A VM under qmpfd's management: its QMP link, its slot table, and the coordination of the
operations on it (carried out by :mod:`qmpfd.vm.operations`, :mod:`qmpfd.vm.queues` and
:mod:`qmpfd.vm.reconcile`).

The VM's topology is read from QEMU when it is adopted and on every reconnect, and kept current
from then on by the slot table (qmpfd's own accepted commands, QEMU's DEVICE_DELETED events). It is
read again only when something says qmpfd's view may be stale: a raw ``vm-qmp`` passthrough, a
``device_add`` refused because its slot or id was taken behind qmpfd's back, a bridge plugged,
or ``query-slots`` with ``refresh``.

Concurrency: slot choice happens under the VM's allocation lock and the chosen slot is claimed in
the table before the lock is let go; operations on different slots, and on different VMs, run
concurrently.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from qmpfd.errors import QmpfdError
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.pending import PendingSlot
from qmpfd.hotplug.pending import restore as restore_queues
from qmpfd.hotplug.plan import FunctionSpec
from qmpfd.hotplug.policies import Policy, vm_policy_name
from qmpfd.hotplug.slots import SlotKey, SlotTable
from qmpfd.hotplug.slotview import SlotView, view
from qmpfd.qemu.gate import GatedLink, UnplugGate
from qmpfd.qemu.introspect import VmIdentity, find_root_buses, read_identity, read_topology
from qmpfd.qemu.libvirt_link import LibvirtLink, domain_gone
from qmpfd.qemu.link import Link, QmpLink, nobody_listens
from qmpfd.qemu.topology import Bus, Topology
from qmpfd.qemu.versions import check_supported
from qmpfd.state.journal import Journal, Operation
from qmpfd.vm import detach as detach_mod
from qmpfd.vm import operations, queues, reconcile
from qmpfd.vm.buspolicy import BusPolicies
from qmpfd.vm.events import Emit, VmEvents
from qmpfd.vm.follow import DeletionFollower
from qmpfd.vm.proptypes import PropertyTypes
from qmpfd.vm.results import EndedOperation, VmInfo

log = logging.getLogger("qmpfd.vm")

#: Called with (vm, ids) once QEMU has deleted functions; returns the host functions given back.
OnRemoved = Callable[[str, list[str]], Coroutine[Any, Any, list[str]]]
#: Called with (vm, ids QEMU holds) after every (re)connection.
OnConnected = Callable[[str, AbstractSet[str]], Coroutine[Any, Any, Any]]

FAILED_KEPT = 64         # failed operations query-operations {ended} can still show
RECONNECT_FIRST = 0.5   # seconds before the first reconnect attempt, doubled up to
RECONNECT_MAX = 10.0    # this bound, so a restarted QEMU is found within seconds
QEMU_PROBE_TIMEOUT = 2.0  # seconds a liveness probe of the QMP socket may take


class ManagedVm:
    def __init__(self, name: str, qmp: Path, emit: Emit, journal: Journal, *,
                 libvirt_domain: str | None = None,
                 command_timeout: float, connect_timeout: float, pending_ttl: float,
                 policies: dict[str, Policy] | None = None,
                 on_removed: OnRemoved | None = None,
                 on_connected: OnConnected | None = None) -> None:
        self.name = name
        self.qmp = qmp
        #: a VM libvirt runs: reached through libvirt's monitor passthrough, and its slots
        #: taken from the top (libvirt allocates its own hotplugs from the lowest free one)
        self.libvirt_domain = libvirt_domain
        self.slots_from_top = libvirt_domain is not None
        self.events = VmEvents(name, emit)
        self.journal = journal
        self.pending_ttl = pending_ttl
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self.bus_policies = BusPolicies(self, policies)
        self._on_removed = on_removed
        self._on_connected = on_connected
        self.tracker = DeletionTracker()
        self.tracker.on_deleted.append(DeletionFollower(self, self.bus_policies.of).deleted)
        self.link = self._new_link()
        self.identity: VmIdentity | None = None
        #: Empty until the first read of QEMU; claims of restored queues go in at once.
        self.table = SlotTable(Topology())
        self._policy_name: str | None = None
        self._roots: list[tuple[str, str, str, str]] | None = None
        self._property_types = PropertyTypes()
        self.alloc = asyncio.Lock()
        for entry in restore_queues(list(journal.pending.get(name, {}).values()),
                                    time.monotonic(), time.time()):
            self.table.queue((entry.bus, entry.slot), entry)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._reconnecting = False
        #: the last operations that failed after their request was answered (bounded)
        self.failed: collections.deque[EndedOperation] = collections.deque(maxlen=FAILED_KEPT)

    def operation_failed(self, op: Operation, reason: str, *, recovered: bool = False) -> None:
        """An operation ended without doing what it was asked, after its request was answered:
        announce it and keep it for query-operations {ended}."""
        self.failed.append(EndedOperation(op.id, op.kind, op.bus, op.slot, tuple(op.ids),
                                          reason, time.time()))
        if op.kind == "detach":
            self.events.detach_failed(op.bus, op.slot, op.ids, reason, recovered=recovered)
        else:
            self.events.attach_failed(op.bus, op.slot, op.ids, reason, recovered=recovered)

    # -- lifecycle -------------------------------------------------------------------------
    def _new_link(self) -> Link:
        link: Link
        if self.libvirt_domain is not None:
            link = LibvirtLink(self.name, self.libvirt_domain, self._command_timeout)
        else:
            link = QmpLink(self.name, self.qmp, self._command_timeout)
        link = GatedLink(link, UnplugGate(self.bus_policies.gated))
        link.subscribe(self.tracker.handle_event)
        link.on_disconnect = self._on_disconnect
        return link

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, *, keep_trying: bool = False) -> VmInfo:
        """Connect and learn the VM. With ``keep_trying`` (re-adoption after a restart), a VM
        that cannot be reached yet stays managed, disconnected, and is retried in the background.
        """
        self.spawn(queues.expire_loop(self), "expiry")
        try:
            await self._connect_and_learn()
        except QmpfdError:
            if not keep_trying:
                await self.stop()
                raise
            self._on_disconnect()
        return self.info()

    def info(self) -> VmInfo:
        ident = self.identity
        return VmInfo(self.name, str(self.qmp), self.link.connected,
                      ident.arch if ident else None, ident.machine if ident else None,
                      ident.qemu if ident else None, self._policy_name,
                      ident.uuid if ident else None)

    async def _connect_and_learn(self) -> None:
        await self.link.connect(self._connect_timeout)
        self._property_types.forget()
        try:
            self.identity = await read_identity(self.link)
            check_supported(self.identity)
            self._roots = await find_root_buses(self.link)
            await self.refresh()
            self._policy_name = vm_policy_name(self.identity.arch, self.identity.machine,
                                               self.table.topology.mechanisms())
            await reconcile.reconcile(self)
            await queues.prune(self)
            self._report_orphans()
            if self._on_connected is not None:
                await self._on_connected(self.name, self.table.topology.device_ids())
        except BaseException:
            await self.link.close()
            raise

    async def refresh(self) -> None:
        """Read the topology from QEMU again (see the module docstring for when)."""
        mark = self.table.read_started()
        try:
            topology = await read_topology(self.link, self._roots)
        except BaseException:
            self.table.read_abandoned()
            raise
        self.table.refresh(topology, mark)

    def _report_orphans(self) -> None:
        for (bus, slot), ids in self.table.orphans():
            log.warning("orphaned slot: QEMU holds functions without function 0",
                        extra={"vm": self.name, "bus": bus, "slot": slot, "ids": ids})
            self.events.orphaned(bus, slot, ids)

    def _on_disconnect(self) -> None:
        if self._stopping or self._reconnecting:
            return
        self._reconnecting = True
        self.events.disconnected(str(self.qmp))
        self.spawn(self._reconnect(), "reconnect")

    async def _reconnect(self) -> None:
        """Bounded exponential backoff until QEMU's QMP socket answers again."""
        delay = RECONNECT_FIRST
        try:
            while not self._stopping:
                await asyncio.sleep(delay)
                self.link = self._new_link()
                try:
                    await self._connect_and_learn()
                except QmpfdError as exc:
                    log.debug("reconnect failed", extra={"vm": self.name, "error": exc.desc})
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                log.info("QMP connection restored", extra={"vm": self.name})
                self.events.reconnected(str(self.qmp))
                return
        finally:
            self._reconnecting = False

    async def qemu_gone(self) -> bool:
        """True only when nothing listens on the VM's QMP socket any more: the socket file is
        gone or refuses connections, which a living QEMU never does. Any doubt (a slow or busy
        QEMU) answers False: giving a device back under a running QEMU is the worse error."""
        if self.link.connected:
            return False
        if self.libvirt_domain is not None:
            return await asyncio.to_thread(domain_gone, self.libvirt_domain)
        return await nobody_listens(self.qmp, QEMU_PROBE_TIMEOUT)

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.link.close()

    async def removed(self, ids: list[str]) -> list[str]:
        """QEMU deleted ``ids``: give back host functions held for them (once)."""
        if self._on_removed is None:
            return []
        return await self._on_removed(self.name, ids)

    # -- facts -----------------------------------------------------------------------------
    def policies(self) -> dict[str, Policy]:
        return self.bus_policies.all()

    async def typed(self, specs: Sequence[FunctionSpec],
                    fields: Mapping[str, str]) -> list[FunctionSpec]:
        """``specs`` with every property in the JSON type QEMU wants (see
        :mod:`qmpfd.vm.proptypes`); errors name ``fields[id]`` + ``properties.NAME``."""
        return await self._property_types.typed(self.link, specs, fields)

    def policy_name(self) -> str | None:
        return self._policy_name

    def slots(self) -> list[SlotView]:
        queued = {(p.bus, p.slot): [(f.function, f.id, f.driver)
                                    for f in p.functions.values()]
                  for p in self.table.queues()}
        return view(self.table, queued)

    def buses(self) -> list[Bus]:
        return list(self.table.topology.buses)

    def orphans(self) -> list[tuple[SlotKey, list[str]]]:
        return self.table.orphans()

    async def read_again(self) -> None:
        """query-slots {refresh}: read QEMU's topology again, between operations' choices."""
        async with self.alloc:
            await self.refresh()

    def queued(self) -> list[PendingSlot]:
        """The functions queued for their function 0, per slot."""
        return self.table.queues()

    async def passthrough(self, command: str, arguments: dict[str, Any] | None) -> Any:
        """Raw QMP (vm-qmp): whatever it did, qmpfd's view is read again afterwards."""
        try:
            return await self.link.execute(command, arguments)
        finally:
            with contextlib.suppress(QmpfdError):
                await self.read_again()

    attach = operations.attach
    detach = detach_mod.detach
    function_add = queues.function_add
    pending_cancel = queues.pending_cancel
