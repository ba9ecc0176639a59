"""Running a :class:`~qmpfd.hotplug.plan.Plan` against QEMU, with rollback.

The executor is the only hotplug code that sends QMP. It sends the plan's steps in order, checks
the result with ``query-pci`` (and QOM for buses the guest has not numbered yet), and on any failure
takes back what it added, using the policy's rollback commands and waiting for DEVICE_DELETED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from qmpfd.errors import QemuError, QmpfdError, VmGone
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.plan import Plan, Step
from qmpfd.vm.connection import VmConnection
from qmpfd.vm.introspect import pci_functions

log = logging.getLogger("qmpfd.hotplug")


@dataclass
class RollbackResult:
    removed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)   # still in QEMU: the slot stays 'unplugging'


class AttachFailed(QmpfdError):
    """An attach failed and was rolled back (fully, or with ``rollback.left`` still pending)."""

    def __init__(self, cause: QmpfdError, desc: str, rollback: RollbackResult) -> None:
        super().__init__(desc)
        self.error_class = cause.error_class
        self.cause = cause
        self.rollback = rollback


async def verify_attached(plan: Plan, conn: VmConnection) -> None:
    """Every function of the plan is in QEMU on the planned bus, slot and function."""
    seen = await pci_functions(conn)
    for f in plan.functions:
        path = f"/machine/peripheral/{f.id}"
        addr, parent = await asyncio.gather(
            conn.execute("qom-get", {"path": path, "property": "addr"}),
            conn.execute("qom-get", {"path": path, "property": "parent_bus"}),
        )
        if int(addr) != (plan.slot << 3 | f.function) or not str(parent).endswith("/" + plan.bus):
            raise QemuError(f"'{f.id}' landed at {parent} devfn {addr}, not {plan.bus} "
                            f"{plan.slot}.{f.function}")
        if f.id in seen:
            _, slot, function = seen[f.id]
            if (slot, function) != (plan.slot, f.function):
                raise QemuError(f"query-pci shows '{f.id}' at {slot}.{function}, "
                                f"not {plan.slot}.{f.function}")


async def execute_attach(plan: Plan, conn: VmConnection, tracker: DeletionTracker,
                         after_step: Callable[[int], Awaitable[None]] | None = None) -> None:
    """Send the plan's steps in order, verify, and roll back on any failure.

    ``after_step(n)`` is called once the n-th step (1-based) has been accepted by QEMU.
    """
    added: list[str] = []
    step: Step | None = None
    try:
        for n, step in enumerate(plan.steps, 1):
            await conn.execute(step.execute, dict(step.arguments),
                               timeout=plan.policy.timeouts.plug)
            added.append(step.id)
            if after_step is not None:
                await after_step(n)
        step = None
        await verify_attached(plan, conn)
    except QmpfdError as exc:
        where = (f"function {step.function} ('{step.id}', {step.arguments.get('driver')})"
                 if step is not None else "verification")
        if isinstance(exc, VmGone):
            raise AttachFailed(exc, f"{where}: {exc.desc}", RollbackResult(left=added)) from exc
        result = await rollback(plan, added, conn, tracker)
        tail = "; rolled back" if not result.left else (
            f"; rollback still waiting for the guest to release {', '.join(result.left)}")
        raise AttachFailed(exc, f"{where}: {exc.desc}{tail}", result) from exc


async def rollback(plan: Plan, added: list[str], conn: VmConnection,
                   tracker: DeletionTracker) -> RollbackResult:
    if not added:
        return RollbackResult()
    done = tracker.expect(added)
    for step in plan.rollback_steps(added):
        try:
            await conn.execute(step.execute, dict(step.arguments))
        except QemuError as exc:
            log.warning("rollback device_del refused", extra={"id": step.id, "error": exc.desc})
        except VmGone:
            done.cancel()
            return RollbackResult(left=list(added))
    try:
        await asyncio.wait_for(asyncio.shield(done), plan.policy.timeouts.unplug)
    except (TimeoutError, QmpfdError):
        left = sorted(tracker.pending(done)) or list(added)
        done.cancel()
        return RollbackResult(removed=[i for i in added if i not in left], left=left)
    return RollbackResult(removed=list(added))


async def execute_unplug(targets: list[str], ids: list[str], conn: VmConnection,
                         tracker: DeletionTracker) -> asyncio.Future[None]:
    """Send the policy's device_del commands; return the future of all DEVICE_DELETED events.

    The caller waits on it with its own timeout and may leave it running: a late DEVICE_DELETED
    still completes the slot.
    """
    done = tracker.expect(ids)
    try:
        for target in targets:
            await conn.execute("device_del", {"id": target})
    except QmpfdError:
        done.cancel()
        raise
    return done

