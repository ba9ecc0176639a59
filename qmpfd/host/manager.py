"""Host functions held for VMs: planning against a fresh sysfs read, binding, and giving back.

A function is *held* from the moment it leaves its host driver until it is given back; holdings are
kept in the journal (address -> VM, original driver, the attach they belong to) so that a restarted
qmpfd still knows what to give back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from qmpfd.config import HostConfig
from qmpfd.errors import QmpfdError
from qmpfd.host import vfio
from qmpfd.host.assign import HostAssignment, HostFunctionRequest, plan_host_assignment
from qmpfd.host.inventory import deny_rules, describe
from qmpfd.host.pciids import PciIds
from qmpfd.host.sysfs import HostPci, read_host
from qmpfd.state.journal import Journal

log = logging.getLogger("qmpfd.host")


@dataclass(frozen=True)
class Holding:
    vm: str
    original: str | None
    ids: tuple[str, ...]     # the device ids of the attach it belongs to (the whole slot)


class HostDevices:
    def __init__(self, cfg: HostConfig, journal: Journal) -> None:
        self.cfg = cfg
        self.journal = journal
        self.deny = deny_rules(cfg)
        self._ids: PciIds | None = None
        self._lock = asyncio.Lock()

    @property
    def held(self) -> dict[str, Holding]:
        return {a: Holding(h["vm"], h["original"], tuple(h["ids"]))
                for a, h in self.journal.host.items()}

    async def read(self) -> HostPci:
        return await asyncio.to_thread(read_host, self.cfg.sysfs, self.cfg.proc)

    async def query(self, multifunction_only: bool) -> list[dict[str, Any]]:
        if self._ids is None:
            self._ids = await asyncio.to_thread(PciIds.load)
        host = await self.read()
        held = {a: h.vm for a, h in self.held.items()}
        return describe(host, self._ids, held, multifunction_only, self.deny)

    async def plan(self, requests: Sequence[HostFunctionRequest], vm: str,
                   force: bool) -> HostAssignment:
        host = await self.read()
        held = {a: h.vm for a, h in self.held.items()}
        return plan_host_assignment(requests, host, vm=vm, held_by=held, deny=self.deny,
                                    force=force, allow_force=self.cfg.allow_force)

    async def acquire(self, plan: HostAssignment, vm: str, ids: Sequence[str]) -> None:
        """Move the plan's functions to vfio-pci and record them as held for ``vm``.

        Each function is journaled as held (with its original driver) *before* its first sysfs
        write: if the bind fails half-way (driver_override set, unbound, vfio-pci never took
        it) or qmpfd dies in the middle, the record is there to give it back to its driver.
        """
        async with self._lock:
            held_now: list[tuple[str, str | None]] = []
            try:
                for address, original in plan.bind:
                    await self.journal.hold(address, vm, original, list(ids))
                    held_now.append((address, original))
                    await asyncio.to_thread(vfio.bind_vfio, self.cfg.sysfs, address)
                for address in plan.address.values():
                    if address not in self.journal.host:  # already on vfio-pci: still held
                        await self.journal.hold(address, vm, "vfio-pci", list(ids))
            except QmpfdError:
                for address, original in reversed(held_now):
                    await self._give_back(address, original)
                raise

    async def release(self, vm: str, ids: Sequence[str]) -> list[str]:
        """Give back every function held for ``vm`` by the attach that ``ids`` belong to."""
        async with self._lock:
            wanted = set(ids)
            released = []
            for address, h in list(self.held.items()):
                if h.vm == vm and wanted & set(h.ids):
                    await self._give_back(address, h.original)
                    released.append(address)
            return released

    def held_for(self, vm: str) -> list[str]:
        """Addresses of the host functions held for ``vm``."""
        return sorted(a for a, h in self.held.items() if h.vm == vm)

    async def release_vm(self, vm: str) -> list[str]:
        """Give back every function held for ``vm`` (its QEMU is gone for good)."""
        ids = [i for h in self.held.values() if h.vm == vm for i in h.ids]
        return await self.release(vm, ids) if ids else []

    async def release_absent(self, vm: str, present: AbstractSet[str]) -> list[str]:
        """After (re)connecting to ``vm``'s QEMU: give back what it holds for attaches none of
        whose functions QEMU has any more (the VM was restarted or shut down meanwhile)."""
        gone = [i for h in self.held.values() if h.vm == vm and not set(h.ids) & present
                for i in h.ids]
        return await self.release(vm, gone) if gone else []

    async def _give_back(self, address: str, original: str | None) -> None:
        try:
            if original != "vfio-pci":
                await asyncio.to_thread(vfio.restore_driver, self.cfg.sysfs, address, original)
        except QmpfdError as exc:
            log.error("cannot give a host function back", extra={"address": address,
                                                                  "error": exc.desc})
            return  # stays held (and journaled) so that it is not forgotten
        self.journal.unhold(address)
