"""Several clients driving qmpfd at once on real VMs, checked against QEMU and the guest.

Each client loops for a while over random requests on random VMs: attach of 1-4 functions (slot
chosen by qmpfd), detach of one of its own slots, a non-zero function queued with
``function-add`` and then either completed by function 0 or cancelled, and ``query-slots`` with
``refresh``. After every reply the referee is QEMU itself, asked on the VM's second monitor:

- an attach answered ok has every function in QEMU right then, unless qmpfd announced (with
  ``SLOT_EJECTED``) that QEMU removed them without a request;
- a detach answered ok has none of its functions left in QEMU;
- a detach never finds its own devices gone without such an event.

At the end, once nothing is in flight: what qmpfd lists == what QEMU holds, and the guest sees
exactly the slots qmpfd lists, each with its number of functions. Used by
tests/integration/test_concurrency.py (short) and bench/stress.py (long).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener, ExecuteError, QMPClient

from lab.vm import LabVm, slot_groups

DRIVERS = ["virtio-net-pci", "virtio-rng-pci", "e1000", "virtio-rng-pci"]
#: Error classes a request may meet when others race for the same slots: not violations.
EXPECTED = {"Conflict", "NotFound", "Timeout", "Unsupported"}


@dataclass
class StressVm:
    name: str            # the VM's name in qmpfd
    lab: LabVm           # for QEMU's second monitor and the guest's PCI list
    baseline_pci: frozenset[str]
    baseline_peripheral: frozenset[str]


@dataclass
class StressResult:
    counts: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    ejected: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{k} {v}" for k, v in sorted(self.counts.items())]
        return (", ".join(parts) + f"; SLOT_EJECTED events {len(self.ejected)}; "
                f"violations {len(self.violations)}")


class Referee:
    """QEMU's own view of each VM, through its second monitor (one connection per VM)."""

    def __init__(self, vms: list[StressVm]) -> None:
        self.vms = {v.name: v for v in vms}
        self._qmp: dict[str, QMPClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def open(self) -> None:
        for name, vm in self.vms.items():
            qmp = QMPClient(f"referee-{name}")
            await qmp.connect(str(vm.lab.inspect_socket))
            self._qmp[name] = qmp
            self._locks[name] = asyncio.Lock()

    async def close(self) -> None:
        for qmp in self._qmp.values():
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    async def peripheral(self, vm: str) -> set[str]:
        async with self._locks[vm]:
            listed = await asyncio.wait_for(self._qmp[vm].execute(
                "qom-list", {"path": "/machine/peripheral"}), 30)
        assert isinstance(listed, list)
        return {p["name"] for p in listed if p["type"].startswith("child<")}


async def _connect(socket: Path, name: str) -> QMPClient:
    qmp = QMPClient(name)
    await qmp.connect(str(socket))
    return qmp


class _Observer:
    """Collects qmpfd's SLOT_EJECTED events (every client gets every event)."""

    def __init__(self, result: StressResult) -> None:
        self.result = result
        self.ejected_ids: set[str] = set()

    async def announced(self, ids: set[str], within: float = 2.0) -> bool:
        """Whether qmpfd announces the removal of ``ids`` (it gathers an eject's deletions
        for a moment before it does)."""
        deadline = time.monotonic() + within
        while not ids <= self.ejected_ids:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def run(self, qmp: QMPClient) -> None:
        listener = EventListener()
        with qmp.listen(listener):
            async for event in listener:
                if event["event"] == "SLOT_EJECTED":
                    data: dict[str, Any] = dict(cast(dict[str, Any], event["data"]))
                    self.result.ejected.append(data)
                    self.ejected_ids.update(data["ids"])


@dataclass
class _Client:
    n: int
    qmp: QMPClient
    vms: list[StressVm]
    referee: Referee
    observer: _Observer
    result: StressResult
    rng: random.Random
    owned: dict[str, list[list[str]]] = field(default_factory=dict)   # vm -> slots (ids)
    counter: int = 0

    def _ids(self, k: int) -> list[str]:
        self.counter += 1
        return [f"c{self.n}x{self.counter}f{i}" for i in range(k)]

    def _violation(self, what: str) -> None:
        self.result.violations.append(f"{time.strftime('%H:%M:%S')} client {self.n}: {what}")

    async def _call(self, cmd: str, args: dict[str, Any]) -> Any:
        try:
            reply = await asyncio.wait_for(self.qmp.execute(cmd, args), 120)
        except ExecuteError as exc:
            cls = exc.error_class
            self.result.counts[f"{cmd} {cls}"] += 1
            if cls not in EXPECTED:
                self._violation(f"{cmd} {args}: unexpected {cls}: {exc}")
            return None
        self.result.counts[f"{cmd} ok"] += 1
        return reply

    async def attach(self, vm: StressVm) -> None:
        ids = self._ids(self.rng.randint(1, 4))
        funcs = [{"id": i, "driver": DRIVERS[k]} for k, i in enumerate(ids)]
        reply = await self._call("device-attach", {"vm": vm.name, "functions": funcs})
        if reply is None:
            return
        held = await self.referee.peripheral(vm.name)
        missing = set(ids) - held
        if missing and not await self.observer.announced(missing):
            self._violation(f"attach of {ids} answered ok; QEMU lacks {sorted(missing)}")
        if not missing:
            self.owned.setdefault(vm.name, []).append(ids)

    async def detach(self, vm: StressVm) -> None:
        mine = self.owned.get(vm.name) or []
        if not mine:
            return await self.attach(vm)
        ids = mine.pop(self.rng.randrange(len(mine)))
        try:
            reply: Any = await asyncio.wait_for(self.qmp.execute(
                "device-detach", {"vm": vm.name, "ids": ids}), 120)
        except ExecuteError as exc:
            self.result.counts[f"device-detach {exc.error_class}"] += 1
            if exc.error_class == "NotFound" and not await self.observer.announced(set(ids)):
                self._violation(f"detach of {ids}: NotFound with no SLOT_EJECTED for them")
            elif exc.error_class == "Timeout":
                mine.append(ids)   # still unplugging: try again later
            elif exc.error_class not in EXPECTED:
                self._violation(f"detach of {ids}: unexpected {exc.error_class}: {exc}")
            return None
        self.result.counts["device-detach ok"] += 1
        left = set(ids) & await self.referee.peripheral(vm.name)
        if left and not reply.get("unplugging"):
            self._violation(f"detach of {ids} answered ok; QEMU still holds {sorted(left)}")
        return None

    async def queue_then_finish(self, vm: StressVm) -> None:
        slots = await self._call("query-slots", {"vm": vm.name})
        if not slots:
            return
        free = [s for s in slots if not s["functions"] and s["hotpluggable"]]
        if not free:
            return
        target = self.rng.choice(free)
        ids = self._ids(2)
        where = {"vm": vm.name, "bus": target["bus"], "slot": target["slot"]}
        queued = await self._call("function-add", {**where, "id": ids[1], "function": 1,
                                                   "driver": DRIVERS[1]})
        if queued is None:
            return
        if self.rng.random() < 0.5:
            await self._call("pending-cancel", where)
            return
        done = await self._call("function-add", {**where, "id": ids[0], "function": 0,
                                                 "driver": DRIVERS[0]})
        if done is None:
            await self._call("pending-cancel", where)
            return
        held = await self.referee.peripheral(vm.name)
        if set(ids) - held and not await self.observer.announced(set(ids) - held):
            self._violation(f"function 0 of {ids} answered ok; QEMU lacks "
                            f"{sorted(set(ids) - held)}")
        elif set(ids) <= held:
            self.owned.setdefault(vm.name, []).append(ids)

    async def refresh(self, vm: StressVm) -> None:
        await self._call("query-slots", {"vm": vm.name, "refresh": True})

    async def loop(self, until: float) -> None:
        ops: list[tuple[float, Callable[[StressVm], Any]]] = [
            (0.4, self.attach), (0.35, self.detach), (0.15, self.queue_then_finish),
            (0.1, self.refresh)]
        while time.monotonic() < until:
            vm = self.rng.choice(self.vms)
            pick = self.rng.random()
            for weight, op in ops:
                pick -= weight
                if pick <= 0:
                    await op(vm)
                    break

    async def clean_up(self) -> None:
        for vm, slots in self.owned.items():
            for ids in slots:
                with contextlib.suppress(ExecuteError, TimeoutError):
                    await asyncio.wait_for(self.qmp.execute(
                        "device-detach", {"vm": vm, "ids": ids}), 120)


async def settle(qmp: QMPClient, timeout: float) -> None:
    """Wait until qmpfd has nothing in flight and nothing queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ops: Any = await qmp.execute("query-operations")
        pending: Any = await qmp.execute("query-pending")
        if not ops and not pending:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"qmpfd still has operations or queues after {timeout:g} s")


async def final_check(qmp: QMPClient, vms: list[StressVm], referee: Referee,
                      result: StressResult, guest_wait: float) -> None:
    """qmpfd == QEMU == guest, once nothing is in flight."""
    for vm in vms:
        slots: Any = await qmp.execute("query-slots", {"vm": vm.name})
        listed = {f["id"] for s in slots for f in s["functions"]
                  if f["id"] and f["id"] not in vm.baseline_peripheral}
        held = await referee.peripheral(vm.name) - vm.baseline_peripheral
        if listed != held:
            result.violations.append(f"{vm.name}: qmpfd lists {sorted(listed - held)} QEMU "
                                     f"lacks; QEMU holds {sorted(held - listed)} qmpfd lacks")
        want = sorted(len([f for f in s["functions"] if f["id"] in listed])
                      for s in slots if any(f["id"] in listed for f in s["functions"]))

        def matches(seen: set[str], want: list[int] = want,
                    base: frozenset[str] = vm.baseline_pci) -> bool:
            return sorted(len(g) for g in slot_groups(seen - base).values()) == want
        try:
            await asyncio.to_thread(vm.lab.wait_guest_pci, matches, guest_wait)
        except TimeoutError as exc:
            result.violations.append(f"{vm.name}: the guest never showed slots of {want} "
                                     f"functions ({exc})")


async def run(socket: Path, vms: list[StressVm], *, clients: int, seconds: float,
              seed: int = 1, guest_wait: float = 120.0) -> StressResult:
    """Drive qmpfd at ``socket`` with ``clients`` clients for ``seconds``; then detach what
    they hold and check qmpfd, QEMU and the guest agree (see the module docstring)."""
    result = StressResult()
    referee = Referee(vms)
    await referee.open()
    watcher = await _connect(socket, "stress-observer")
    observer = _Observer(result)
    watching = asyncio.create_task(observer.run(watcher))
    conns = [await _connect(socket, f"stress-{n}") for n in range(clients)]
    try:
        workers = [_Client(n, q, vms, referee, observer, result, random.Random(seed * 100 + n))
                   for n, q in enumerate(conns)]
        until = time.monotonic() + seconds
        await asyncio.gather(*(w.loop(until) for w in workers))
        await settle(watcher, 300)
        await final_check(watcher, vms, referee, result, guest_wait)
        await asyncio.gather(*(w.clean_up() for w in workers))
        await settle(watcher, 300)
        await final_check(watcher, vms, referee, result, guest_wait)
    finally:
        watching.cancel()
        for q in [*conns, watcher]:
            with contextlib.suppress(Exception):
                await q.disconnect()
        await referee.close()
    return result
