"""A Link that answers qmpfd's adoption reads with what a real QEMU answered (recorded by
lab/record_qmp.py into tests/unit/fixtures/) and hands hotplug commands to the scripted QEMU."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qmpfd.errors import QemuError
from qmpfd.qemu.link import Command, EventHandler, LinkState, execute_together
from tests.unit.scripted_qemu import ScriptedQemu

FIXTURES = Path(__file__).parent / "fixtures"


class ReplayLink:
    def __init__(self, machine: str, name: str = "replay") -> None:
        self.name = name
        self.answers: dict[str, Any] = json.loads((FIXTURES / f"qmp-{machine}.json").read_text())
        self.qemu = ScriptedQemu(self, slot_wide_eject=machine == "pc")  # type: ignore[arg-type]
        self.commands_sent = 0
        self.on_disconnect: Callable[[], None] | None = None
        self._handlers: list[EventHandler] = []
        self._state = LinkState.NEW

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is LinkState.UP

    async def connect(self, timeout: float) -> None:
        self._state = LinkState.UP

    async def close(self) -> None:
        self._state = LinkState.CLOSED

    def subscribe(self, handler: EventHandler) -> Callable[[], None]:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    def handle_event(self, event: dict[str, Any]) -> None:
        """QEMU's events (the scripted QEMU's DEVICE_DELETED) to every subscriber."""
        for h in list(self._handlers):
            h(dict(event))

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None,
                      on_return: Callable[[], None] | None = None) -> Any:
        self.commands_sent += 1
        key = json.dumps([cmd, args or {}], sort_keys=True)
        if key in self.answers:
            answer = self.answers[key]
            if "error" in answer:
                raise QemuError(answer["error"])
            return answer["return"]
        return await self.qemu.execute(cmd, args, timeout, on_return)

    async def execute_batch(self, commands: Sequence[Command],
                            timeout: float | None = None) -> list[object]:
        return await execute_together(self.execute, commands, timeout)
