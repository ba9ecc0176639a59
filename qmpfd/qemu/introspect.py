"""Read what a VM is and what its PCI buses hold, from QEMU itself (QOM and query-* commands).

Only I/O lives here; turning the answers into decisions is :mod:`qmpfd.qemu.topology`'s job.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from qmpfd.errors import QemuError
from qmpfd.qemu.link import Link
from qmpfd.qemu.topology import ACPI_PCIHP_HANDLERS, RawBus, RawDevice, Topology

_LINK = re.compile(r"^(child|link)<(.+)>$")
_HOST_HINTS = ("pcihost", "pci-host", "host-bridge", "i440fx", "q35", "phb")


@dataclass(frozen=True)
class VmIdentity:
    arch: str
    machine: str        # e.g. "pc-q35-7.2"
    qemu: str           # "7.2.22"
    qemu_version: tuple[int, int, int]
    uuid: str | None = None   # the VM's UUID (-uuid); None when QEMU has none (all zeros)


T = TypeVar("T")


async def gather_all(*aws: Awaitable[T]) -> list[T]:
    """asyncio.gather that lets every awaitable finish and then raises the first error, so a
    lost connection does not leave 'exception was never retrieved' warnings behind."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


async def read_identity(conn: Link) -> VmIdentity:
    """Architecture, machine type and QEMU version.

    ``query-machines`` lists every machine type but only marks the running one (``is-current``)
    from QEMU 9.0 on, so the type comes from the QOM type of /machine.
    """
    target, version, mtype, vmuuid = await asyncio.gather(
        conn.execute("query-target"),
        conn.execute("query-version"),
        conn.execute("qom-get", {"path": "/machine", "property": "type"}),
        conn.execute("query-uuid"),
    )
    machine = str(mtype).removesuffix("-machine")
    q = version["qemu"]
    vtuple = (int(q["major"]), int(q["minor"]), int(q["micro"]))
    raw_uuid = str(vmuuid.get("UUID", "")).lower()
    return VmIdentity(
        arch=target["arch"], machine=machine,
        qemu=".".join(map(str, vtuple)), qemu_version=vtuple,
        uuid=None if not raw_uuid or set(raw_uuid) <= {"0", "-"} else raw_uuid)


def _link_type(prop_type: str) -> str | None:
    m = _LINK.match(prop_type)
    return m.group(2) if m else None


async def _qom_list(conn: Link, path: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await conn.execute("qom-list", {"path": path})
    return result


async def _child_buses(conn: Link, path: str) -> list[tuple[str, str]]:
    """(bus name, bus type) of the PCI buses that are QOM children of ``path``."""
    out = []
    for prop in await _qom_list(conn, path):
        t = prop["type"]
        if t.startswith("child<PCI"):
            out.append((prop["name"], _link_type(t) or "PCI"))
    return out


async def find_root_buses(conn: Link) -> list[tuple[str, str, str, str]]:
    """(bus path, bus type, owner type) for every host bridge's root bus.

    Host bridges hang under /machine (i440fx, q35), among unattached devices (gpex on arm virt),
    or under /machine/peripheral when given with -device (spapr PHBs, pxb); their QOM type names
    say what they are, so only those candidates are listed further.
    """
    candidates: list[tuple[str, str]] = []
    for base in ("/machine", "/machine/unattached", "/machine/peripheral",
                 "/machine/peripheral-anon"):
        try:
            props = await _qom_list(conn, base)
        except QemuError:
            continue
        for prop in props:
            t = _link_type(prop["type"])
            if prop["type"].startswith("child<") and t and any(h in t.lower() for h in _HOST_HINTS):
                candidates.append((f"{base}/{prop['name']}", t))
    roots = []
    for owner_path, owner_type in candidates:
        for bus_name, bus_type in await _child_buses(conn, owner_path):
            roots.append((f"{owner_path}/{bus_name}", bus_name, bus_type, owner_type))
    return roots


async def _read_device(conn: Link, bus_path: str, child: str,
                       dev_type: str) -> tuple[RawDevice, list[tuple[str, str]]] | None:
    """A device on a bus, or None if it went away while we looked (an unplug completing)."""
    try:
        path = await conn.execute("qom-get", {"path": bus_path, "property": child})
        devfn, buses = await asyncio.gather(
            conn.execute("qom-get", {"path": path, "property": "addr"}),
            _child_buses(conn, path),
        )
    except QemuError:
        return None
    return RawDevice(path=path, type=dev_type, devfn=int(devfn)), buses


async def _read_bus(conn: Link, path: str, name: str, bus_type: str, owner_type: str,
                    owner_is_pci: bool) -> tuple[RawBus, list[tuple[str, str, str, str]]]:
    props = await _qom_list(conn, path)
    handler = await conn.execute("qom-get", {"path": path, "property": "hotplug-handler"})
    handler_type = None
    root_hotplug = True
    if handler:
        handler_type = await conn.execute("qom-get", {"path": handler, "property": "type"})
        if handler_type in ACPI_PCIHP_HANDLERS and not owner_is_pci:
            root_hotplug = await _root_hotplug(conn, str(handler))
    children = [(p["name"], _link_type(p["type"]) or "?") for p in props
                if p["name"].startswith("child[")]
    found = await gather_all(*(_read_device(conn, path, c, t) for c, t in children))
    results = [r for r in found if r is not None]
    devices = tuple(sorted((d for d, _ in results), key=lambda d: d.devfn))
    below = [(f"{d.path}/{bname}", bname, btype, d.type)
             for d, buses in results for bname, btype in buses]
    raw = RawBus(name=name, path=path, bus_type=bus_type, owner_type=owner_type,
                 owner_is_pci_device=owner_is_pci, handler_path=str(handler or ""),
                 handler_type=handler_type, devices=devices, root_hotplug=root_hotplug)
    return raw, below


async def _root_hotplug(conn: Link, handler: str) -> bool:
    """Whether an ACPI handler hotplugs its root bus: PIIX4's ``acpi-root-pci-hotplug``;
    a handler without it (ICH9) never does."""
    try:
        return bool(await conn.execute("qom-get", {"path": handler,
                                                   "property": "acpi-root-pci-hotplug"}))
    except QemuError:
        return False


async def read_topology(conn: Link,
                        roots: list[tuple[str, str, str, str]] | None = None) -> Topology:
    """Walk every PCI bus from the host bridges down through bridges and ports."""
    if roots is None:
        roots = await find_root_buses(conn)
    raws: list[RawBus] = []
    level = [(p, n, t, o, False) for p, n, t, o in roots]
    while level:
        results = await gather_all(*(_read_bus(conn, *item) for item in level))
        level = []
        for raw, below in results:
            raws.append(raw)
            level.extend((p, n, t, o, True) for p, n, t, o in below)
    return Topology.from_raw(raws)
