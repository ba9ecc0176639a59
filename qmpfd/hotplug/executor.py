"""Running a :class:`~qmpfd.hotplug.plan.Plan` against QEMU, with rollback.

The executor is the only hotplug code that sends QMP.

Plug is pipelined: the non-zero functions' ``device_add`` commands go out together (QEMU keeps
them hidden from the guest while the slot has no function 0), and once every one of them has been
answered, function 0 goes last. A ``device_add`` QEMU accepted with an explicit bus and address
is there: nothing is read back.

Rollback assumes the worst: a ``device_add`` whose reply did not come in time may still have
happened, so it counts as added. Because QEMU runs a monitor's commands in order, anything sent
after it (a probe, a ``device_del``) sees its outcome; a probe tells which of those late ones
exist, and the policy's ``device_del`` commands take back everything that does. A reply never
says "rolled back" while QEMU holds a function of the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from qmpfd.errors import GuestEjected, QemuError, QmpfdError, Timeout, VmGone
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.plan import Plan, Step
from qmpfd.hotplug.policies.base import is_transient
from qmpfd.hotplug.slots import SlotTable
from qmpfd.qemu.direct import OnReturn
from qmpfd.qemu.link import Link
from qmpfd.qemu.topology import RawDevice, peripheral

log = logging.getLogger("qmpfd.hotplug")


@dataclass
class RollbackResult:
    removed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)   # still in QEMU: the slot stays 'unplugging'
    #: QEMU stopped answering before it could say which of ``left`` it holds: nothing was sent
    #: to take them back; the caller finds out once QEMU answers again
    unknown: bool = False


class AttachFailed(QmpfdError):
    """An attach failed and was rolled back (fully, or with ``rollback.left`` still pending)."""

    def __init__(self, cause: QmpfdError, desc: str, rollback: RollbackResult) -> None:
        super().__init__(desc)
        self.error_class = cause.error_class
        self.cause = cause
        self.rollback = rollback


def _where(step: Step) -> str:
    return f"function {step.function} ('{step.id}', {step.arguments.get('driver')})"


async def _send(link: Link, steps: Sequence[Step], timeout: float,
                on_return: OnReturn | None = None
                ) -> tuple[list[Step], list[Step], tuple[Step, QmpfdError] | None]:
    """Send ``steps`` together; (accepted, unanswered in time, first refusal or loss).
    ``on_return``: for a batch of one, see :meth:`Link.execute <qmpfd.qemu.link.Link.execute>`."""
    results: list[object]
    if len(steps) == 1:      # the common single-function plug
        try:
            results = [await link.execute(steps[0].execute, dict(steps[0].arguments),
                                          timeout=timeout, on_return=on_return)]
        except QmpfdError as exc:
            results = [exc]
    else:                    # written together, replies read in order: no task per function
        results = await link.execute_batch([(s.execute, dict(s.arguments)) for s in steps],
                                           timeout=timeout)
    accepted: list[Step] = []
    late: list[Step] = []
    failure: tuple[Step, QmpfdError] | None = None
    for step, res in zip(steps, results, strict=True):
        if isinstance(res, Timeout):
            late.append(step)
        elif isinstance(res, QmpfdError):
            if failure is None or isinstance(res, VmGone):
                failure = (step, res)
        elif isinstance(res, BaseException):
            raise res
        else:
            accepted.append(step)
    if failure is None and late:
        failure = (late[0], Timeout(f"QEMU did not answer device_add within {timeout:g} s"))
    return accepted, late, failure


class _LastReply:
    """The ``on_return`` of an attach's last ``device_add``: unless QEMU deleted one of the
    slot's functions before that reply, tells ``on_plugged`` and records the slot's
    functions in the table, all in the callback that read the reply."""

    def __init__(self, plan: Plan, steps: Sequence[Step], table: SlotTable,
                 tracker: DeletionTracker, start: int, on_plugged: Callable[[], None]) -> None:
        self._plan, self._steps, self._table = plan, steps, table
        self._tracker, self._start, self._on_plugged = tracker, start, on_plugged
        self.seen = False

    def __call__(self) -> None:
        if {s.id for s in self._steps} & self._tracker.deleted_since(self._start):
            return                   # the executor decides, as without the callback
        self._on_plugged()
        plan = self._plan
        self._table.added((plan.bus, plan.slot), [_device(plan, s) for s in self._steps])
        self.seen = True


async def execute_attach(plan: Plan, link: Link, tracker: DeletionTracker, table: SlotTable,
                         after_step: Callable[[int], Awaitable[None]] | None = None,
                         on_plugged: Callable[[], None] | None = None) -> None:
    """Plug the plan's functions (non-zero together, then function 0), and roll back on any
    failure. ``after_step(n)`` runs once n device_adds have been accepted (fault injection).

    ``on_plugged``: called in the callback that read QEMU's acceptance of the last
    ``device_add`` (nothing of the slot deleted by then), before the slot table records it and
    before anything QEMU sent after that reply is handled: the attach has succeeded in QEMU
    there, and whatever follows (a guest's eject) is the slot's next change, not part of it."""
    key = (plan.bus, plan.slot)
    timeout = plan.policy.timeouts.plug
    batches = [list(plan.steps[:-1]), [plan.steps[-1]]] if len(plan.steps) > 1 \
        else [list(plan.steps)]
    added: list[str] = []
    late: list[str] = []
    unrecorded: list[Step] = []     # QEMU has (or may have) them; the slot table not yet
    start = tracker.seq
    for batch in batches:
        last = (_LastReply(plan, [*unrecorded, *batch], table, tracker, start, on_plugged)
                if on_plugged is not None and batch is batches[-1] else None)
        ok, unanswered, failure = await _send(link, batch, timeout, last)
        if last is not None and last.seen:   # its reply arrived, whatever a timer says
            if after_step is not None:
                await after_step(len(added) + 1)
            return
        unrecorded += (*ok, *unanswered)
        # A DEVICE_DELETED read before the reply it follows: never record what QEMU dropped.
        gone = tracker.deleted_since(start)
        added += [s.id for s in ok]
        late += [s.id for s in unanswered]
        if failure is None:
            failure = _ejected(batch, set(added) & gone)
        if failure is not None or batch is batches[-1]:
            # One change of the table per attach (each builds the VM's topology anew), before
            # any rollback: the slot is this attach's meanwhile, nothing else reads its functions.
            table.added(key, [_device(plan, s) for s in unrecorded if s.id not in gone])
        if failure is not None:
            await _undo(plan, failure, [i for i in added if i not in gone], late, link,
                        tracker, table)
        if after_step is not None:
            for n in range(len(added) - len(ok) + 1, len(added) + 1):
                await after_step(n)
    ejected = set(added) & tracker.deleted_since(start)
    if ejected:   # after the last reply, before the caller answers: undo the rest too
        result = await rollback(plan, [i for i in added if i not in ejected], [], link,
                                tracker, table)
        raise AttachFailed(GuestEjected(_ejected_desc(ejected)),
                           _ejected_desc(ejected) + ("; rolled back" if not result.left else
                                                     "; rollback still waiting"), result)


async def _undo(plan: Plan, failure: tuple[Step, QmpfdError], added: list[str],
                late: list[str], link: Link, tracker: DeletionTracker,
                table: SlotTable) -> NoReturn:
    """A step failed: take back what QEMU has (``added``) or may have (``late``), and raise
    the attach's failure."""
    step, exc = failure
    if isinstance(exc, VmGone):
        raise AttachFailed(exc, f"{_where(step)}: {exc.desc}",
                           RollbackResult(left=added + late)) from exc
    result = await rollback(plan, added, late, link, tracker, table)
    tail = "; rolled back" if not result.left else (
        f"; rollback still waiting for the guest to release {', '.join(result.left)}")
    raise AttachFailed(exc, f"{_where(step)}: {exc.desc}{tail}", result) from exc


def _device(plan: Plan, step: Step) -> RawDevice:
    return peripheral(step.id, str(step.arguments["driver"]), plan.slot, step.function)


def _ejected_desc(ids: set[str]) -> str:
    return (f"QEMU removed {', '.join(sorted(ids))} without a request while the slot was being "
            "plugged (the guest ejected it)")


def _ejected(batch: Sequence[Step], ids: set[str]) -> tuple[Step, QmpfdError] | None:
    """The failure to report when the guest ejected functions of this attach mid-way."""
    if not ids:
        return None
    return batch[0], GuestEjected(_ejected_desc(ids))


async def _exists(link: Link, dev_id: str) -> bool:
    """Whether QEMU holds the device now (sent after its device_add, so it sees the outcome)."""
    try:
        await link.execute("qom-get", {"path": f"/machine/peripheral/{dev_id}",
                                       "property": "type"})
    except QemuError:
        return False
    return True


async def rollback(plan: Plan, added: list[str], late: list[str], link: Link,
                   tracker: DeletionTracker, table: SlotTable) -> RollbackResult:
    """Take back ``added`` and whichever of ``late`` QEMU did carry out; wait for their
    DEVICE_DELETED within the policy's unplug timeout."""
    try:
        for dev_id in late:
            if await _exists(link, dev_id):
                added.append(dev_id)
            else:
                table.deleted(dev_id)
    except VmGone:
        return RollbackResult(left=list(dict.fromkeys(added + late)))
    except Timeout:   # the monitor is stalled: QEMU may still carry out any of them
        return RollbackResult(left=list(dict.fromkeys(added + late)), unknown=True)
    if not added:
        return RollbackResult()
    done = tracker.expect(added)
    deadline = time.monotonic() + plan.policy.timeouts.unplug
    for step in plan.rollback_steps(added):
        try:
            await send_when_ready(link, step.execute, dict(step.arguments), deadline)
        except QemuError as exc:
            log.warning("rollback device_del refused", extra={"id": step.id, "error": exc.desc})
        except (VmGone, Timeout):
            done.cancel()
            return RollbackResult(left=list(added))
    try:
        await asyncio.wait_for(asyncio.shield(done), plan.policy.timeouts.unplug)
    except (TimeoutError, QmpfdError):
        left = sorted(tracker.pending(done)) or list(added)
        done.cancel()
        return RollbackResult(removed=[i for i in added if i not in left], left=left)
    return RollbackResult(removed=list(added))


#: Backoff between attempts of a command the guest was not ready for (seconds, doubling).
READY_FIRST_DELAY = 0.1
READY_MAX_DELAY = 1.0


async def send_when_ready(link: Link, cmd: str, args: dict[str, object], deadline: float,
                          on_wait: Callable[[str], None] | None = None) -> object:
    """Send ``cmd``; while QEMU refuses it as transient (the guest is still busy with the
    slot), wait and send it again, with backoff, until ``deadline`` (monotonic). ``on_wait``
    hears each refusal, so a caller can show the wait. Any other refusal is final."""
    delay = READY_FIRST_DELAY
    while True:
        try:
            return await link.execute(cmd, args)
        except QemuError as exc:
            if not is_transient(exc.desc):
                raise
            if time.monotonic() + delay > deadline:
                raise Timeout(f"{cmd} {args.get('id', '')}: QEMU still refused it when the "
                              f"request's time ran out ({exc.desc})") from exc
            if on_wait is not None:
                on_wait(exc.desc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, READY_MAX_DELAY)


async def execute_unplug(targets: list[str], done: asyncio.Future[None], link: Link,
                         tracker: DeletionTracker, deadline: float,
                         on_wait: Callable[[str], None] | None = None) -> None:
    """Send the policy's device_del commands (each retried while the guest is busy, until
    ``deadline``); ``done`` (from :meth:`DeletionTracker.expect`, registered before anything
    was sent) completes with the last DEVICE_DELETED.

    The caller waits on it with its own timeout and may leave it running: a late DEVICE_DELETED
    still completes the slot. A target QEMU already deleted (the guest ejected the slot
    meanwhile) is not asked for again.
    """
    try:
        for target in targets:
            if done.done():
                break
            try:
                await send_when_ready(link, "device_del", {"id": target}, deadline, on_wait)
            except QemuError:
                # Refused because QEMU already let it go (the guest ejected the slot just
                # before): its DEVICE_DELETED is on its way and completes ``done``.
                if target in tracker.pending(done) and await _exists(link, target):
                    raise
    except QmpfdError:
        done.cancel()
        raise
