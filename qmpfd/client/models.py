"""The reply models (pydantic): what each command returns, read by the client, described by
``query-qmp-schema`` (its ``ret-type``), and checked against what the daemon's command layer
answers (tests/unit/test_commands.py). Unknown members are kept (``extra='allow'``), so a newer
qmpfd never breaks an older client; wire names with hyphens are read through aliases."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Reply(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)


class Version(Reply):
    package: str
    qemu: dict[str, int]
    qmpfd: dict[str, int] | None = None     # contract v1's member, kept for older clients


class Vm(Reply):
    """A managed VM (query-vms; vm-add's reply has the same members but qmp and connected)."""

    name: str
    qmp: str | None = None
    connected: bool = True
    arch: str | None = None
    machine: str | None = None
    policy: str | None = None
    qemu: str | None = None
    uuid: str | None = None


class SlotFunction(Reply):
    function: int
    id: str | None
    driver: str
    state: str


class Slot(Reply):
    bus: str
    slot: int
    hotpluggable: bool
    functions: list[SlotFunction]


class PlacedFunction(Reply):
    id: str
    function: int
    driver: str | None = None               # a queued function (function-add) says its driver


class Attached(Reply):
    vm: str
    bus: str
    slot: int
    functions: list[PlacedFunction]
    policy: str | None = None
    steps: list[dict[str, Any]] = Field(default_factory=list)      # the QMP commands, in order
    rollback: list[dict[str, Any]] = Field(default_factory=list)   # what undoing them sends
    dry_run: bool = Field(False, alias="dry-run")
    queued: bool = False                    # function-add: queued for function 0, not plugged
    expires_in: float | None = Field(None, alias="expires-in")     # ... until this many seconds
    host: dict[str, Any] | None = None


class Detached(Reply):
    vm: str
    bus: str
    slot: int
    ids: list[str]
    seconds: float
    unplugging: bool = False
    waited_for_guest: float | None = Field(None, alias="waited-for-guest")
    host_released: list[str] = Field(default_factory=list, alias="host-released")


class Pending(Reply):
    vm: str
    bus: str
    slot: int
    functions: list[dict[str, Any]]
    expires_in: float | None = Field(None, alias="expires-in")


class Operation(Reply):
    operation: str
    kind: str
    vm: str
    bus: str
    slot: int
    ids: list[str]
    policy: str | None = None
    started: float | None = None            # time.time() it began
    sent: bool | None = None                # its device_del commands went out
    age: float | None = None
    waiting: str | None = None              # why it waits before it can send
    outcome: str | None = None              # {ended}: "failed"
    reason: str | None = None
    ended: float | None = None


class Removed(Reply):
    host_held: list[str] = Field(default_factory=list, alias="host-held")
    host_released: list[str] = Field(default_factory=list, alias="host-released")
    settled: list[dict[str, Any]] = Field(default_factory=list)


class Event(Reply):
    """An event: its name, its data (with ``vm`` and friends), and the plane's bookkeeping."""

    event: str
    data: dict[str, Any]
    timestamp: dict[str, int]

    @property
    def seq(self) -> int:
        return int(self.data["seq"])

    @property
    def boot(self) -> str:
        return str(self.data["boot"])


class Replay(Reply):
    boot: str
    seq: int
    complete: bool
    events: list[Event]
    reason: str | None = None


class Health(Reply):
    status: str
    problems: list[str] = Field(default_factory=list)
    version: str | None = None
    boot: str | None = None
    event_loop: str | None = Field(None, alias="event-loop")
    loop_lag: float | None = Field(None, alias="loop-lag")
    loop_lag_max: float | None = Field(None, alias="loop-lag-max")
    journal: dict[str, Any] | None = None
    vms: list[dict[str, Any]] = Field(default_factory=list)


#: Each command's reply model (a list of one for a list): the one place the daemon's command
#: table, query-qmp-schema, this client and qmpfctl's renderer take reply shapes from.
RETURNS: dict[str, Any] = {
    "query-version": Version, "query-events": Replay, "query-health": Health, "vm-add": Vm,
    "vm-remove": Removed, "query-vms": list[Vm], "query-slots": list[Slot],
    "device-attach": Attached, "device-attach-xml": Attached, "function-add": Attached,
    "query-pending": list[Pending], "pending-cancel": Pending, "device-detach": Detached,
    "query-operations": list[Operation],
}
