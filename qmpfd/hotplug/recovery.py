"""What to do with an operation found in the journal after a crash or a lost QMP connection.

Pure decision: given the operation and the ids of it that QEMU holds now, say what to do. The
executor side (``ManagedVm.reconcile``) carries it out.

- attach, every function present: the attach finished before the crash; keep it (completed).
- attach, some present: roll them back (or wait, if the rollback was already sent).
  Function 0 may be missing, so they can be invisible to the
  guest; a half-plugged slot must never stay.
- attach, none present: nothing happened in QEMU (or QEMU restarted): forget it.
- detach, none present: the unplug finished while we were away: complete it.
- detach, some present: keep waiting for DEVICE_DELETED; if the unplug request was never sent
  (crash before ``device_del`` returned and was journaled), send it now.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from qmpfd.state.journal import Operation


class Action(enum.Enum):
    COMPLETED = "completed"
    ROLL_BACK = "roll-back"
    FORGET = "forget"
    DETACHED = "detached"
    KEEP_WAITING = "keep-waiting"
    SEND_UNPLUG = "send-unplug"


@dataclass(frozen=True)
class Decision:
    action: Action
    ids: tuple[str, ...] = ()   # the ids the action concerns (present in QEMU)


def decide(op: Operation, present: Collection[str]) -> Decision:
    mine = tuple(sorted((i for i in op.functions if i in present),
                        key=lambda i: op.functions[i]))
    if op.kind == "attach":
        if len(mine) == len(op.functions):
            return Decision(Action.COMPLETED, mine)
        if mine and op.sent:  # rollback already asked the guest: wait, do not ask twice
            return Decision(Action.KEEP_WAITING, mine)
        if mine:
            return Decision(Action.ROLL_BACK, mine)
        return Decision(Action.FORGET)
    if not mine:
        return Decision(Action.DETACHED)
    if op.sent:
        return Decision(Action.KEEP_WAITING, mine)
    return Decision(Action.SEND_UNPLUG, mine)
