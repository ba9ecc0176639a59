"""The journal's records: what each line of ``journal.log`` says, and how a line is framed.

A line is ``CRC32 JSON\\n``: eight hex digits of the CRC-32 of the JSON text, a space, the record
as compact JSON, a newline. The checksum tells a torn or damaged line from a good one without
trusting the JSON parser to notice; the newline tells a complete line from a write cut short.

Records are validated with pydantic on load, so a line of the wrong shape is reported with the
field at fault instead of failing later somewhere in the daemon.
"""

from __future__ import annotations

import zlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

FORMAT = 2   # format 1 was the single state.json document


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SlotNumber = Annotated[int, Field(ge=0, le=31)]
FunctionNumber = Annotated[int, Field(ge=0, le=7)]


class OpRecord(_Record):
    """An operation in flight, as journaled (see :class:`qmpfd.state.journal.Operation`)."""

    kind: Literal["attach", "detach"]
    vm: str
    bus: str
    slot: SlotNumber
    functions: Annotated[dict[str, FunctionNumber], Field(min_length=1, max_length=8)]
    policy: str
    id: str
    started: float
    sent: bool = False


class HostRecord(_Record):
    vm: str
    original: str | None
    ids: list[str]


class VmAdded(_Record):
    t: Literal["vm+"]
    name: str
    qmp: str


class VmRemoved(_Record):
    t: Literal["vm-"]
    name: str


class OpBegun(_Record):
    t: Literal["op+"]
    op: OpRecord


class OpSent(_Record):
    t: Literal["op~"]
    id: str


class OpEnded(_Record):
    t: Literal["op-"]
    id: str


class HostHeld(_Record):
    t: Literal["host+"]
    address: str
    holding: HostRecord


class HostReleased(_Record):
    t: Literal["host-"]
    address: str


class QueueSaved(_Record):
    t: Literal["queue+"]
    vm: str
    queue: dict[str, Any]     # a PendingSlot record (hotplug.pending validates it on restore)


class QueueDropped(_Record):
    t: Literal["queue-"]
    vm: str
    bus: str
    slot: SlotNumber


class Snapshot(_Record):
    """The whole state at one point: the first record after a compaction."""

    t: Literal["snapshot"]
    format: Literal[2]
    vms: dict[str, str]
    ops: list[OpRecord]
    host: dict[str, HostRecord]
    pending: dict[str, dict[str, dict[str, Any]]]


Record = Annotated[
    VmAdded | VmRemoved | OpBegun | OpSent | OpEnded | HostHeld | HostReleased | QueueSaved
    | QueueDropped | Snapshot,
    Field(discriminator="t"),
]
_RECORD: TypeAdapter[Record] = TypeAdapter(Record)


class BadLine(Exception):
    """A line that is not a valid record; ``cause`` says why in one phrase."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def encode(record: _Record) -> bytes:
    data = record.model_dump_json().encode()     # compact, in field order
    return b"%08x %s\n" % (zlib.crc32(data), data)


def decode(line: bytes) -> Record:
    """One complete line (without its newline) to a record, or :class:`BadLine`."""
    head, sep, body = line.partition(b" ")
    if not sep or len(head) != 8:
        raise BadLine("no checksum")
    try:
        crc = int(head, 16)
    except ValueError:
        raise BadLine("no checksum") from None
    if zlib.crc32(body) != crc:
        raise BadLine("checksum mismatch")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise BadLine("not UTF-8") from None
    try:
        return _RECORD.validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "record"
        raise BadLine(f"{where}: {err['msg']}") from None
