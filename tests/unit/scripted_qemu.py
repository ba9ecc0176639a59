"""A scripted QEMU for unit tests: answers QMP commands as told, keeps the devices it was given,
and reports DEVICE_DELETED a moment after a device_del (the whole slot where ACPI ejects it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qmpfd.errors import QemuError, Timeout, VmGone
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.qemu.link import Command, execute_together

# What a scripted command does, keyed by (command, device id).
ACCEPT, REFUSE, LATE, LOST, GONE, NO_EVENT = "accept", "refuse", "late", "lost", "gone", "no-event"


@dataclass
class ScriptedQemu:
    tracker: DeletionTracker
    slot_wide_eject: bool                         # ACPI: device_del ejects the whole slot
    script: dict[tuple[str, str], str] = field(default_factory=dict)
    devices: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (addr, function)
    sent: list[tuple[str, str]] = field(default_factory=list)
    added: dict[str, dict[str, Any]] = field(default_factory=dict)   # id -> device_add args
    connected: bool = True
    hotplugged: bool = True                       # qom-get .../hotplugged of every device

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None,
                      on_return: Callable[[], None] | None = None) -> Any:
        """``on_return``: called on success before the caller resumes, as a real link does."""
        args = args or {}
        dev_id = str(args.get("id") or str(args.get("path", "")).rsplit("/", 1)[-1])
        self.sent.append((cmd, dev_id))
        if not self.connected:
            raise VmGone("not connected")
        await asyncio.sleep(0)                    # replies come back on a later loop turn
        action = self.script.get((cmd, dev_id), ACCEPT)
        if action.startswith("busy:"):          # refused as busy this many more times
            left = int(action.split(":")[1])
            self.script[(cmd, dev_id)] = f"busy:{left - 1}" if left > 1 else ACCEPT
            raise QemuError("GenericError: Hot-unplug failed: guest is busy (power indicator "
                            "blinking)")
        if action == GONE:
            self.connected = False
            raise VmGone(f"QMP connection lost during {cmd}")
        if action == REFUSE:
            raise QemuError(f"GenericError: {cmd} {dev_id} refused (scripted)")
        if action == LOST:
            raise Timeout(f"QEMU did not answer {cmd} within {timeout} s")
        handler = getattr(self, cmd.replace("-", "_"), None)
        if handler is None:
            raise QemuError(f"CommandNotFound: The command {cmd} has not been found (scripted)")
        result = handler(args, action)
        if action == LATE:
            raise Timeout(f"QEMU did not answer {cmd} within {timeout} s")
        if on_return is not None:
            on_return()
        return result

    async def execute_batch(self, commands: Sequence[Command],
                            timeout: float | None = None) -> list[object]:
        """Each through :meth:`execute` (where tests intercept commands)."""
        return await execute_together(self.execute, commands, timeout)

    def device_list_properties(self, args: dict[str, Any], _: str) -> list[dict[str, Any]]:
        if args["typename"] == "vfio-pci":
            return [{"name": "host", "type": "str"}, {"name": "rombar", "type": "uint32"}]
        if args["typename"] != "virtio-rng-pci":
            raise QemuError(f"Parameter 'typename' expects a device type: {args['typename']}")
        return [{"name": "max-bytes", "type": "uint64"}, {"name": "period", "type": "uint64"},
                {"name": "rombar", "type": "uint32"}, {"name": "x-pcie-lnksta-dllla",
                                                        "type": "bool"}]

    async def close(self) -> None:
        self.connected = False

    def device_add(self, args: dict[str, Any], _: str) -> dict[str, Any]:
        addr = str(args["addr"])
        slot, _, fn = addr.partition(".")
        self.devices[str(args["id"])] = (slot, int(fn, 16) if fn else 0)
        self.added[str(args["id"])] = dict(args)
        return {}

    def device_del(self, args: dict[str, Any], action: str) -> dict[str, Any]:
        target = str(args["id"])
        if target not in self.devices:
            raise QemuError(f"DeviceNotFound: Device '{target}' not found")
        slot, fn = self.devices[target]
        gone = [i for i, (s, _) in self.devices.items() if s == slot] \
            if self.slot_wide_eject or fn == 0 else [target]
        if action != NO_EVENT:              # the guest releases them a moment later
            loop = asyncio.get_running_loop()
            for i in gone:
                loop.call_later(0.01, self._deleted, i)
        return {}

    def qom_get(self, args: dict[str, Any], _: str) -> str | bool:
        dev_id = str(args["path"]).rsplit("/", 1)[-1]
        if dev_id not in self.devices:
            raise QemuError(f"DeviceNotFound: Device '{args['path']}' not found")
        if args.get("property") == "hotplugged":
            return self.hotplugged
        return "virtio-rng-pci"

    def _deleted(self, dev_id: str) -> None:
        if self.devices.pop(dev_id, None) is not None:
            self.tracker.handle_event({"event": "DEVICE_DELETED",
                                       "data": {"device": dev_id, "path": "/x"}})
