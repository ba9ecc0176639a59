"""The set of VMs one qmpfd manages, by name."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from qmpfd.config import Config
from qmpfd.errors import Conflict, NotFound, QmpfdError
from qmpfd.hotplug.policies import POLICIES, Policy
from qmpfd.qemu.socketfile import listener_pid
from qmpfd.state.journal import Journal
from qmpfd.vm.events import Emit
from qmpfd.vm.managed import ManagedVm, OnConnected, OnRemoved
from qmpfd.vm.results import VmInfo

log = logging.getLogger("qmpfd.vm")

#: how a libvirt-run VM is journaled in place of a QMP socket path
LIBVIRT_PREFIX = "libvirt:"


def configured_policies(config: Config) -> dict[str, Policy]:
    """The policy table with the config's per-policy timeout overrides applied."""
    table = dict(POLICIES)
    for name, override in config.timeouts.policy.items():
        if name in table:
            table[name] = table[name].with_timeouts(override.plug, override.unplug,
                                                    override.reuse_delay,
                                                    override.serial_unplug)
    return table


class VmRegistry:
    def __init__(self, config: Config, emit: Emit, journal: Journal,
                 check_path: Callable[[Path], Path] | None = None,
                 on_removed: OnRemoved | None = None,
                 on_connected: OnConnected | None = None) -> None:
        self._config = config
        self._on_removed = on_removed
        self._on_connected = on_connected
        self._check_path = check_path
        self._emit = emit
        self.journal = journal
        self._vms: dict[str, ManagedVm] = {}
        self._adding: set[str] = set()
        self._lock = asyncio.Lock()
        self.policies = configured_policies(config)

    def get(self, name: str) -> ManagedVm:
        """A VM by its name, or by its UUID (QEMU's -uuid, as query-vms shows it)."""
        vm = self._vms.get(name)
        if vm is not None:
            return vm
        wanted = name.lower()
        by_uuid = [v for v in self._vms.values()
                   if v.identity is not None and v.identity.uuid == wanted]
        if len(by_uuid) == 1:
            return by_uuid[0]
        if len(by_uuid) > 1:
            raise Conflict(f"vm: UUID {name} belongs to {', '.join(v.name for v in by_uuid)}; "
                           "use the name")
        raise NotFound(f"vm: no VM named '{name}' (or with that UUID) is managed by qmpfd")

    def all(self) -> list[ManagedVm]:
        return list(self._vms.values())

    def _new(self, name: str, qmp: Path, libvirt: str | None = None) -> ManagedVm:
        t = self._config.timeouts
        return ManagedVm(name, qmp, self._emit, self.journal, libvirt_domain=libvirt,
                         command_timeout=t.command,
                         connect_timeout=t.qmp_connect, pending_ttl=t.pending_expiry,
                         policies=self.policies, on_removed=self._on_removed,
                         on_connected=self._on_connected)

    async def add(self, name: str, qmp: Path | None, libvirt: str | None = None) -> VmInfo:
        """vm-add: connect now or fail; nothing is kept on failure (not even when only the
        journal write fails: the VM is not adopted then). ``libvirt``: a domain libvirt runs,
        reached through libvirt (journaled as ``libvirt:DOMAIN`` in place of the socket)."""
        target = Path(f"{LIBVIRT_PREFIX}{libvirt}") if libvirt is not None else qmp
        assert target is not None
        async with self._lock:
            if name in self._vms or name in self._adding:
                raise Conflict(f"name: a VM named '{name}' is already managed")
            for vm in self._vms.values():
                if vm.qmp == target:
                    raise Conflict(f"qmp: {target} is already managed as VM '{vm.name}'")
            self._adding.add(name)
        try:
            vm = self._new(name, target, libvirt)
            info = await vm.start()
            try:
                await self._check_not_managed(vm)
                await self.journal.vm_added(name, str(target))
            except BaseException:
                await vm.stop()
                raise
            self._vms[name] = vm
            log.info("VM adopted", extra={"vm": name, "policy": info.policy,
                                          "machine": info.machine})
            return info
        finally:
            self._adding.discard(name)

    async def _check_not_managed(self, new: ManagedVm) -> None:
        """One QEMU is managed once, whatever name reaches it: another of its QMP monitors
        (the same listening pid) or the same VM by UUID (a libvirt domain, or a QEMU started
        with -uuid) is a Conflict naming the VM that has it."""
        others = [vm for vm in self._vms.values() if vm is not new]
        uuid = new.identity.uuid if new.identity is not None else None
        for vm in others:
            if uuid is not None and vm.identity is not None and vm.identity.uuid == uuid:
                raise Conflict(f"qmp: this QEMU (uuid {uuid}) is already managed as VM "
                               f"'{vm.name}'")
        if new.libvirt_domain is not None:
            return
        pid = await asyncio.to_thread(listener_pid, new.qmp)
        if pid is None:
            return
        for vm in others:
            if vm.libvirt_domain is None and \
                    await asyncio.to_thread(listener_pid, vm.qmp) == pid:
                raise Conflict(f"qmp: this QEMU (pid {pid}) is already managed as VM "
                               f"'{vm.name}' (through another of its QMP monitors)")

    async def readopt(self) -> None:
        """After a restart: take back every VM the journal lists (and the config's), reconciling
        their operations; one that cannot be reached yet is retried in the background."""
        wanted = dict(self.journal.vms)
        for entry in self._config.vm:
            wanted.setdefault(entry.name, str(entry.qmp))

        async def one(name: str, qmp: str) -> None:
            libvirt = qmp.removeprefix(LIBVIRT_PREFIX) if qmp.startswith(LIBVIRT_PREFIX) \
                else None
            try:
                path = Path(qmp) if libvirt is not None or not self._check_path \
                    else self._check_path(Path(qmp))
            except QmpfdError as exc:
                log.error("not re-adopting VM", extra={"vm": name, "error": exc.desc})
                return
            vm = self._new(name, path, libvirt)
            self._vms[name] = vm
            info = await vm.start(keep_trying=True)
            log.info("VM re-adopted" if info.connected else "VM not reachable; retrying",
                     extra={"vm": name})

        await asyncio.gather(*(one(n, q) for n, q in wanted.items()))
        for name, qmp in wanted.items():
            if name in self._vms:
                try:
                    await self.journal.vm_added(name, qmp)
                except QmpfdError as exc:   # still managed now; the config names it again
                    log.error("VM not journaled", extra={"vm": name, "error": exc.desc})

    async def remove(self, name: str) -> None:
        vm = self.get(name)
        await self.journal.vm_removed(name)   # durable first: a failed write changes nothing
        del self._vms[name]
        await vm.stop()

    async def close(self) -> None:
        """Daemon shutdown: drop connections, keep the journal (the VMs stay managed)."""
        for vm in list(self._vms.values()):
            await vm.stop()
        self._vms.clear()
