"""Argument models of every command: pydantic validates shapes and limits before any handler runs.

Errors are reported as ``InvalidRequest`` naming the field (``functions[2].driver: ...``).
Models forbid unknown members, as QEMU does, so a misspelt argument is an error, not ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qmpfd.config import VM_NAME_PATTERN
from qmpfd.errors import InvalidRequest
from qmpfd.hotplug.plan import MAX_FUNCTIONS, FunctionSpec

VmName = Annotated[str, Field(pattern=VM_NAME_PATTERN)]
# QEMU ids: a letter first, then letters, digits, '-', '.', '_' (util/id.c id_wellformed).
DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")]
Driver = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.,-]{0,63}$")]
BusName = Annotated[str, Field(min_length=1, max_length=128)]
SlotNumber = Annotated[int, Field(ge=0, le=31, strict=True)]
FunctionNumber = Annotated[int, Field(ge=0, le=7, strict=True)]
Seconds = Annotated[float, Field(gt=0, le=3600)]
PropValue = str | int | float | bool


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


class NoArgs(Args):
    pass


class VmAddArgs(Args):
    name: VmName
    #: the VM's QMP socket; or, for a VM libvirt runs, ``libvirt``: its domain name
    qmp: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    libvirt: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> VmAddArgs:
        if (self.qmp is None) == (self.libvirt is None):
            raise ValueError("qmp: give the QMP socket (qmp) or the libvirt domain (libvirt), "
                             "one of them")
        return self


class VmArgs(Args):
    name: VmName


class VmRemoveArgs(VmArgs):
    #: settle operations in flight first (wait for them to complete or roll back)
    force: bool = False


class VmRef(Args):
    vm: VmName


class QuerySlotsArgs(VmRef):
    #: read QEMU's topology again first (qmpfd keeps it current; this is for changes made
    #: behind its back on another monitor)
    refresh: bool = False


class VmQmpArgs(Args):
    vm: VmName
    command: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]
    arguments: dict[str, Any] | None = None


HostAddress = Annotated[
    str, Field(pattern=r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")]


class FunctionArg(Args):
    """An emulated function ({id, driver, ...}) or a host function ({id, host, ...}, v1.1)."""

    id: DeviceId
    driver: Driver | None = None
    function: FunctionNumber | None = None
    properties: Annotated[dict[Annotated[str, Field(max_length=64)], PropValue],
                          Field(max_length=64)] = Field(default_factory=dict)
    host: HostAddress | None = None
    unassigned: bool = False
    managed: bool = True

    @model_validator(mode="after")
    def _kind(self) -> FunctionArg:
        if self.host is None:
            if self.driver is None:
                raise ValueError("driver: missing required argument (or give 'host')")
            if self.unassigned or not self.managed:
                raise ValueError("unassigned: only for host functions ('host')")
        elif self.driver not in (None, "vfio-pci"):
            raise ValueError("driver: a host function is always vfio-pci")
        if self.unassigned and self.function is not None:
            raise ValueError("function: an unassigned function has no guest function number")
        return self


class DeviceAttachArgs(Args):
    vm: VmName
    functions: Annotated[list[FunctionArg], Field(min_length=1, max_length=MAX_FUNCTIONS)]
    bus: BusName | None = None
    slot: SlotNumber | None = None
    dry_run: bool = Field(False, alias="dry-run")
    timeout: Seconds | None = None
    force: bool = False

    @model_validator(mode="after")
    def _numbers_all_or_none(self) -> DeviceAttachArgs:
        given = [f.function is not None for f in self.functions if not f.unassigned]
        if any(given) and not all(given):
            missing = given.index(False)
            raise ValueError(f"functions[{missing}].function: give 'function' on all functions "
                             "or on none")
        return self

    @property
    def has_host(self) -> bool:
        return any(f.host is not None for f in self.functions)

    def specs(self, host_numbers: dict[str, int] | None = None,
              host_addresses: dict[str, str] | None = None) -> list[FunctionSpec]:
        """QEMU functions: emulated ones as given, host ones as vfio-pci with their guest number
        (``host_numbers``). Without numbers, emulated functions take the lowest free ones."""
        host_numbers = host_numbers or {}
        host_addresses = host_addresses or {}
        used = set(host_numbers.values())
        free = (n for n in range(8) if n not in used)
        out = []
        for f in self.functions:
            if f.unassigned:
                continue
            if f.host is not None:
                out.append(FunctionSpec(f.id, "vfio-pci", host_numbers[f.id],
                                        {"host": host_addresses[f.id], **f.properties}))
            else:
                number = f.function if f.function is not None else next(free, 8)
                out.append(FunctionSpec(f.id, str(f.driver), number, dict(f.properties)))
        return out


class DeviceAttachXmlArgs(Args):
    vm: VmName
    xml: Annotated[str, Field(min_length=1, max_length=65536)]
    bus: BusName | None = None
    slot: SlotNumber | None = None
    dry_run: bool = Field(False, alias="dry-run")
    force: bool = False


class QueryHostDevicesArgs(Args):
    multifunction_only: bool = Field(False, alias="multifunction-only")


class FunctionAddArgs(Args):
    vm: VmName
    id: DeviceId
    driver: Driver
    bus: BusName
    slot: SlotNumber
    function: FunctionNumber
    properties: Annotated[dict[Annotated[str, Field(max_length=64)], PropValue],
                          Field(max_length=64)] = Field(default_factory=dict)

    def spec(self) -> FunctionSpec:
        return FunctionSpec(self.id, self.driver, self.function, dict(self.properties))


class QueryPendingArgs(Args):
    vm: VmName | None = None


class QueryEventsArgs(Args):
    #: the last seq the client saw (replay everything after it); omitted: all that is kept
    since: Annotated[int, Field(ge=0, strict=True)] | None = None
    #: the boot id the client's seq belongs to (a different one: qmpfd restarted since)
    boot: Annotated[str, Field(max_length=64)] | None = None


class QueryOperationsArgs(QueryPendingArgs):
    #: also list operations that failed after their request was answered (the last 64 per VM)
    ended: bool = False


class SlotRef(Args):
    vm: VmName
    bus: BusName
    slot: SlotNumber


class DeviceDetachArgs(Args):
    vm: VmName
    ids: Annotated[list[DeviceId], Field(min_length=1, max_length=8)] | None = None
    bus: BusName | None = None
    slot: SlotNumber | None = None
    whole_slot: bool = Field(False, alias="whole-slot")
    timeout: Seconds | None = None
    force: bool = False

    @model_validator(mode="after")
    def _target(self) -> DeviceDetachArgs:
        if self.ids is None and (self.bus is None or self.slot is None):
            raise ValueError("ids: give the ids to detach, or bus and slot")
        if self.ids is not None and (self.bus is not None or self.slot is not None):
            raise ValueError("ids: give ids or bus and slot, not both")
        return self


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


M = TypeVar("M", bound=BaseModel)


def parse_args(model: type[M], args: dict[str, Any]) -> M:
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _loc(tuple(p for p in err["loc"] if p not in ("function-after",)))
        msg = str(err["msg"]).removeprefix("Value error, ")
        if msg.startswith(where.split(".")[0]) and ":" in msg:
            raise InvalidRequest(msg) from exc  # our own validators already name the field
        if err["type"] == "extra_forbidden":
            msg = "unexpected argument"
        elif err["type"] == "missing":
            msg = "missing required argument"
        raise InvalidRequest(f"{where or 'arguments'}: {msg}") from exc
