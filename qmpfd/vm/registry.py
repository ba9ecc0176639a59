"""The set of VMs one qmpfd manages, by name."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from qmpfd.config import Config
from qmpfd.errors import Conflict, NotFound
from qmpfd.hotplug.policies import POLICIES, Policy
from qmpfd.vm.managed import Emit, ManagedVm

log = logging.getLogger("qmpfd.vm")


def configured_policies(config: Config) -> dict[str, Policy]:
    """The policy table with the config's per-policy timeout overrides applied."""
    table = dict(POLICIES)
    for name, override in config.timeouts.policy.items():
        if name in table:
            table[name] = table[name].with_timeouts(override.plug, override.unplug)
    return table


class VmRegistry:
    def __init__(self, config: Config, emit: Emit) -> None:
        self._config = config
        self._emit = emit
        self._vms: dict[str, ManagedVm] = {}
        self._adding: set[str] = set()
        self._lock = asyncio.Lock()
        self.policies = configured_policies(config)

    def get(self, name: str) -> ManagedVm:
        vm = self._vms.get(name)
        if vm is None:
            raise NotFound(f"vm: no VM named '{name}' is managed by qmpfd")
        return vm

    def all(self) -> list[ManagedVm]:
        return list(self._vms.values())

    async def add(self, name: str, qmp: Path) -> dict[str, Any]:
        async with self._lock:
            if name in self._vms or name in self._adding:
                raise Conflict(f"name: a VM named '{name}' is already managed")
            for vm in self._vms.values():
                if vm.qmp == qmp:
                    raise Conflict(f"qmp: {qmp} is already managed as VM '{vm.name}'")
            self._adding.add(name)
        try:
            t = self._config.timeouts
            vm = ManagedVm(name, qmp, self._emit, command_timeout=t.command,
                           pending_ttl=t.pending_expiry, policies=self.policies)
            info = await vm.start(t.qmp_connect)
            self._vms[name] = vm
            log.info("VM adopted", extra={"vm": name, "policy": info["policy"],
                                          "machine": info["machine"]})
            return info
        finally:
            self._adding.discard(name)

    async def remove(self, name: str) -> None:
        vm = self.get(name)
        del self._vms[name]
        await vm.stop()

    async def close(self) -> None:
        for vm in list(self._vms.values()):
            await vm.stop()
        self._vms.clear()
