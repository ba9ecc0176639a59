"""What the domain returns: plain result objects. Only :mod:`qmpfd.api.replies` turns them into
wire JSON, so a reply's shape is decided in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmpfd.hotplug.pending import PendingSlot
from qmpfd.hotplug.plan import Plan
from qmpfd.vm.removal import Settled


@dataclass(frozen=True)
class VmInfo:
    name: str
    qmp: str
    connected: bool
    arch: str | None
    machine: str | None
    qemu: str | None
    policy: str | None
    uuid: str | None = None


@dataclass(frozen=True)
class AttachResult:
    vm: str
    plan: Plan
    dry_run: bool = False


@dataclass(frozen=True)
class QueuedResult:
    vm: str
    entry: PendingSlot


@dataclass
class DetachResult:
    vm: str
    bus: str
    slot: int
    ids: list[str]
    seconds: float
    unplugging: bool = False          # force: returned before the guest released the slot
    waited: float = 0.0               # seconds device_del waited for a busy guest
    host_released: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RemoveResult:
    host_held: list[str] = field(default_factory=list)
    host_released: list[str] = field(default_factory=list)
    settled: list[Settled] = field(default_factory=list)   # force: what each operation came to


@dataclass(frozen=True)
class EndedOperation:
    """An operation that ended without doing what it was asked (kept for query-operations
    ``ended``: a client that missed the event can still learn why)."""

    operation: str
    kind: str
    bus: str
    slot: int
    ids: tuple[str, ...]
    reason: str
    ended: float              # wall-clock time
