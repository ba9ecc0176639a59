"""One slot that qmpfd is doing something with: :class:`Slot`, the single owner of that work.

A slot the topology alone describes (empty, present, orphaned) has no object; one that a queue
or an operation holds has exactly one :class:`Slot`, from the first claim until the transition
that ends it. It owns everything about that work: the state, the ids it concerns, the queued
functions (``function-add``) waiting for function 0, the journaled operation, and the future
that completes when the work ends (what ``vm-remove --force`` awaits). Each transition is a
method that checks the state it starts from (:func:`require`), like qemu.qmp's ``Runstate``.

Pure code: no I/O, no clock. The future is created only when somebody asks for it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Callable, Sequence
from typing import Concatenate, ParamSpec, TypeVar

from qmpfd.errors import Conflict
from qmpfd.hotplug.pending import PendingSlot

SlotKey = tuple[str, int]


class SlotState(enum.Enum):
    EMPTY = "empty"
    QUEUED = "queued"            # non-zero functions wait in qmpfd for function 0
    ATTACHING = "attaching"      # an attach runs (some functions may be in QEMU already)
    PRESENT = "present"          # function 0 and the rest are in QEMU: the guest sees the slot
    UNPLUGGING = "unplugging"    # device_del sent, waiting for DEVICE_DELETED
    ORPHANED = "orphaned"        # QEMU holds non-zero functions without function 0


class SlotStateError(Conflict):
    """A transition asked of a slot that is not in a state allowing it (a race lost)."""


P = ParamSpec("P")
R = TypeVar("R")


def require(*allowed: SlotState) -> Callable[[Callable[Concatenate[Slot, P], R]],
                                             Callable[Concatenate[Slot, P], R]]:
    """The transition may start only from ``allowed``; from anywhere else it changes nothing
    and raises :class:`SlotStateError` naming the slot, its state and the transition."""
    def decorate(method: Callable[Concatenate[Slot, P], R]) -> Callable[Concatenate[Slot, P], R]:
        @functools.wraps(method)
        def checked(self: Slot, /, *args: P.args, **kwargs: P.kwargs) -> R:
            if self.ended or self.state not in allowed:
                raise SlotStateError(
                    f"slot: {self.key[0]} slot {self.key[1]} is {self.state.value}"
                    f"{' (ended)' if self.ended else ''}; {method.__name__} needs "
                    f"{' or '.join(s.value for s in allowed)}")
            return method(self, *args, **kwargs)
        return checked
    return decorate


class Slot:
    """The work on one slot. Made by :class:`~qmpfd.hotplug.slots.SlotTable` when it starts;
    the table drops it in the same step as the transition that :meth:`end` s it."""

    def __init__(self, key: SlotKey, state: SlotState, ids: Sequence[str]) -> None:
        self.key = key
        self.state = state
        self.ids: tuple[str, ...] = tuple(ids)
        #: the queued functions while QUEUED (also kept in the journal)
        self.queue: PendingSlot | None = None
        #: the journaled operation (its id) once its record is written
        self.operation: str | None = None
        self.ended = False
        self._future: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"Slot({self.key[0]}/{self.key[1]} {self.state.value} {list(self.ids)})"

    def when_ended(self) -> asyncio.Future[None]:
        """Completes when the work on the slot ends (at once if it has)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self.ended:
                self._future.set_result(None)
        return self._future

    # -- transitions (the table calls them; each names where it may start) -------------------
    @require(SlotState.QUEUED)
    def add_to_queue(self, entry: PendingSlot) -> None:
        """QUEUED -> QUEUED: one more function waits for function 0."""
        self.queue = entry
        self.ids = tuple(f.id for f in entry.functions.values())

    @require(SlotState.ATTACHING, SlotState.UNPLUGGING)
    def recorded(self, operation: str) -> None:
        """The operation's journal record is written."""
        self.operation = operation

    @require(SlotState.ATTACHING)
    def rollback_waits(self, left: Sequence[str]) -> None:
        """ATTACHING -> UNPLUGGING: functions of a failed attach stay until the guest lets go."""
        self.state = SlotState.UNPLUGGING
        self.ids = tuple(left)

    @require(SlotState.QUEUED, SlotState.ATTACHING, SlotState.UNPLUGGING)
    def end(self) -> None:
        """The work is over (queue flushed, cancelled or expired; attach done or undone;
        unplug over): whoever waits on :meth:`when_ended` is woken, once."""
        self.ended = True
        self.queue = None
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
