"""One VM's slot table following every DEVICE_DELETED, asked for or not.

The table drops the device at once. A slot emptied on a mechanism with a reuse delay is held
back. A deletion nobody waited for (the guest ejected the slot, or a raw ``device_del``) is
announced with ``SLOT_EJECTED``, gathered per slot for a moment (one eject removes every
function), and the host functions held for it are given back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from qmpfd import metrics
from qmpfd.hotplug.policies import Policy
from qmpfd.hotplug.slots import SlotKey
from qmpfd.vm.context import VmContext

log = logging.getLogger("qmpfd.vm")

EJECT_GATHER = 0.1      # seconds the deletions of one unasked eject are gathered into one event


class DeletionFollower:
    def __init__(self, vm: VmContext, policy_of: Callable[[str], Policy | None]) -> None:
        self._vm = vm
        self._policy_of = policy_of          # bus name -> its policy (None before QEMU is read)
        self._ejected: dict[SlotKey, list[str]] = {}

    def deleted(self, dev_id: str, asked: bool) -> None:
        vm = self._vm
        key = vm.table.find(dev_id)
        vm.table.deleted(dev_id)
        if key is None:
            return
        policy = self._policy_of(key[0])
        if policy is not None and policy.reuse_delay and not vm.table.functions(key):
            now = time.monotonic()
            vm.table.hold_back(key, now + policy.reuse_delay, now)
        if asked:
            return
        gathered = self._ejected.setdefault(key, [])
        gathered.append(dev_id)
        if len(gathered) == 1:
            asyncio.get_running_loop().call_later(EJECT_GATHER, self._announce, key)

    def _announce(self, key: SlotKey) -> None:
        vm = self._vm
        ids = self._ejected.pop(key, [])
        log.warning("QEMU removed functions without a request (the guest ejected the slot)",
                    extra={"vm": vm.name, "bus": key[0], "slot": key[1], "ids": ids})
        vm.events.ejected(key[0], key[1], ids)
        policy = self._policy_of(key[0])
        metrics.operation("eject", policy.name if policy else "unknown", "unasked")
        vm.spawn(vm.removed(ids), "release")
