"""libvirt-style XML for device-attach: a ``<devices>`` element of several ``<hostdev>`` (the design
libvirt's unmerged multifunction series proposed), or a single ``<hostdev>``.

Parsed with defusedxml with DTDs forbidden: no entity expansion (billion laughs), no external
entities, no network or file access from a document.

    <devices>
      <hostdev mode='subsystem' type='pci' managed='yes'>
        <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
      </hostdev>
      <hostdev mode='subsystem' type='pci' managed='yes'>
        <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
        <address type='unassigned'/>
      </hostdev>
    </devices>

Every element and attribute libvirt documents for a PCI ``<hostdev>`` either maps to what QEMU
gets (table :data:`MAPPING`, also in docs/host-devices.md) or is refused with InvalidRequest
naming it: nothing is silently dropped. Numbers parse as libvirt parses them (``strtoul`` with
base 0: ``0x1f`` hex, ``010`` octal, ``10`` decimal). ``managed`` defaults to ``no``, as in libvirt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from qmpfd.errors import InvalidRequest, NotFound
from qmpfd.qemu.topology import Bus

MAX_XML_BYTES = 64 * 1024

#: libvirt element/attribute -> what qmpfd does with it (docs/host-devices.md has this table).
MAPPING: list[tuple[str, str]] = [
    ("hostdev@mode='subsystem' @type='pci'", "a host PCI function (vfio-pci); other kinds refused"),
    ("hostdev@managed", "managed: yes binds to vfio-pci and back; default no, as in libvirt"),
    ("source/address@domain,bus,slot,function", "host: the host function DDDD:BB:SS.F"),
    ("driver@name='vfio'", "vfio-pci (the default); 'kvm' and 'xen' refused"),
    ("address@type='pci' bus,slot,function", "bus (0: the root bus, N: libvirt's pci.N), slot, "
                                             "guest function"),
    ("address@multifunction", "accepted (qmpfd sets multifunction=on on function 0 itself)"),
    ("address@type='unassigned'", "unassigned: held for the VM, not given to the guest"),
    ("alias@name", "id (the QEMU device id)"),
    ("boot@order", "bootindex"),
    ("rom@bar", "rombar (on=1, off=0)"),
    ("rom@file", "romfile"),
    ("rom@enabled='no'", "romfile='' (no option ROM)"),
    ("acpi@index", "acpi-index"),
]

_REFUSED = {
    "teaming": "failover teaming needs a virtio-net standby device qmpfd does not manage",
    "origstates": "a legacy KVM-assignment element",
    "readonly": "not a PCI hostdev element", "shareable": "not a PCI hostdev element",
}


def libvirt_uint(value: str | None, where: str) -> int:
    """A number as libvirt reads it (virXMLPropUInt, base 0 = C's strtoul): 0x.. hex,
    0.. octal, else decimal."""
    if value is None:
        raise InvalidRequest(f"xml: {where} is missing")
    text = value.strip()
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16)
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        return int(text, 10)
    except ValueError:
        raise InvalidRequest(f"xml: {where}='{value}' is not a number (libvirt reads 0x1f as "
                             "hex, 010 as octal, 10 as decimal)") from None


@dataclass
class XmlRequest:
    """What a document asks for: the functions, and the guest bus (libvirt's bus number) and
    slot when the ``<address type='pci'>`` elements give them."""

    functions: list[dict[str, Any]] = field(default_factory=list)
    bus_number: int | None = None
    slot: int | None = None


def _attrs(el: Element, allowed: set[str], where: str) -> None:
    unknown = sorted(set(el.attrib) - allowed)
    if unknown:
        raise InvalidRequest(f"xml: {where}@{unknown[0]}: not supported by qmpfd")


def _on_off(value: str, where: str, yes: str = "on", no: str = "off") -> bool:
    if value not in (yes, no):
        raise InvalidRequest(f"xml: {where}='{value}': expected '{yes}' or '{no}'")
    return value == yes


def _hostdev(el: Element, index: int, req: XmlRequest) -> dict[str, Any]:
    where = f"hostdev[{index}]"
    _attrs(el, {"mode", "type", "managed"}, where)
    if el.get("mode", "subsystem") != "subsystem" or el.get("type") != "pci":
        raise InvalidRequest(f"xml: {where}: only <hostdev mode='subsystem' type='pci'> is "
                             "supported")
    fn: dict[str, Any] = {"managed": _on_off(el.get("managed", "no"), f"{where}@managed",
                                             "yes", "no")}
    props: dict[str, Any] = {}
    guest: Element | None = None
    for child in el:
        if child.tag == "address":
            guest = child
        else:
            _hostdev_child(child, f"{where}/{child.tag}", fn, props)
    if "host" not in fn:
        raise InvalidRequest(f"xml: {where}: <source><address .../></source> is missing")
    fn.setdefault("id", "hostdev-" + fn["host"].replace(":", "-").replace(".", "-"))
    if guest is not None:
        _guest_address(guest, f"{where}/address", fn, req)
    if props:
        if fn.get("unassigned"):
            raise InvalidRequest(f"xml: {where}: an unassigned function takes no "
                                 f"<boot>/<rom>/<acpi> ({', '.join(props)})")
        fn["properties"] = props
    return fn


def _hostdev_child(child: Element, here: str, fn: dict[str, Any],
                   props: dict[str, Any]) -> None:
    """One element inside <hostdev> (not its guest <address>): into ``fn`` or ``props``."""
    if child.tag == "source":
        _attrs(child, set(), here)
        fn["host"] = _source(child, here)
    elif child.tag == "driver":
        _attrs(child, {"name"}, here)
        if child.get("name", "vfio") != "vfio":
            raise InvalidRequest(f"xml: {here}@name='{child.get('name')}': only 'vfio' "
                                 "(vfio-pci) is supported")
    elif child.tag == "alias":
        _attrs(child, {"name"}, here)
        if child.get("name"):
            fn["id"] = child.get("name")
    elif child.tag == "boot":
        _attrs(child, {"order", "loadparm"}, here)
        if child.get("loadparm") is not None:
            raise InvalidRequest(f"xml: {here}@loadparm: s390 only, not supported")
        props["bootindex"] = libvirt_uint(child.get("order"), f"{here}@order")
    elif child.tag == "rom":
        _attrs(child, {"bar", "file", "enabled"}, here)
        if child.get("bar") is not None:
            props["rombar"] = int(_on_off(child.get("bar", ""), f"{here}@bar"))
        if child.get("file") is not None:
            props["romfile"] = child.get("file")
        if child.get("enabled") is not None and \
                not _on_off(child.get("enabled", ""), f"{here}@enabled", "yes", "no"):
            props["romfile"] = ""
    elif child.tag == "acpi":
        _attrs(child, {"index"}, here)
        props["acpi-index"] = libvirt_uint(child.get("index"), f"{here}@index")
    elif child.tag in _REFUSED:
        raise InvalidRequest(f"xml: {here}: not supported ({_REFUSED[child.tag]})")
    else:
        raise InvalidRequest(f"xml: {here}: unknown element")


def _source(src: Element, where: str) -> str:
    addr = src.find("address")
    if addr is None or len(src) != 1:
        raise InvalidRequest(f"xml: {where}: expected one <address .../>")
    here = f"{where}/address"
    _attrs(addr, {"domain", "bus", "slot", "function"}, here)
    if len(addr):
        raise InvalidRequest(f"xml: {here}/{addr[0].tag}: not supported (zPCI is s390)")
    return (f"{libvirt_uint(addr.get('domain', '0'), here + '@domain'):04x}:"
            f"{libvirt_uint(addr.get('bus'), here + '@bus'):02x}:"
            f"{libvirt_uint(addr.get('slot'), here + '@slot'):02x}."
            f"{libvirt_uint(addr.get('function', '0'), here + '@function'):x}")


def _guest_address(addr: Element, where: str, fn: dict[str, Any], req: XmlRequest) -> None:
    kind = addr.get("type")
    if kind == "unassigned":
        _attrs(addr, {"type"}, where)
        fn["unassigned"] = True
        return
    if kind != "pci":
        raise InvalidRequest(f"xml: {where}@type='{kind}': only 'pci' and 'unassigned'")
    _attrs(addr, {"type", "domain", "bus", "slot", "function", "multifunction"}, where)
    if libvirt_uint(addr.get("domain", "0"), f"{where}@domain") != 0:
        raise InvalidRequest(f"xml: {where}@domain: only PCI domain 0 in the guest")
    if addr.get("multifunction") is not None:
        _on_off(addr.get("multifunction", ""), f"{where}@multifunction")
    fn["function"] = libvirt_uint(addr.get("function", "0"), f"{where}@function")
    for name in ("bus", "slot"):
        if addr.get(name) is None:
            continue
        value = libvirt_uint(addr.get(name), f"{where}@{name}")
        have = req.bus_number if name == "bus" else req.slot
        if have is not None and have != value:
            raise InvalidRequest(f"xml: {where}@{name}={value}: the functions of one device "
                                 f"share one slot ({name} {have} above)")
        if name == "bus":
            req.bus_number = value
        else:
            req.slot = value


def parse_devices_xml(text: str) -> XmlRequest:
    """The request a ``<devices>`` or single ``<hostdev>`` document stands for."""
    if len(text.encode()) > MAX_XML_BYTES:
        raise InvalidRequest(f"xml: larger than {MAX_XML_BYTES} bytes")
    try:
        root = fromstring(text, forbid_dtd=True, forbid_entities=True,
                          forbid_external=True)
    except DefusedXmlException as exc:
        raise InvalidRequest(f"xml: refused: {type(exc).__name__} (DTDs and entities are not "
                             "allowed)") from exc
    except ParseError as exc:
        raise InvalidRequest(f"xml: not well-formed: {exc}") from exc
    req = XmlRequest()
    if root.tag == "hostdev":
        req.functions = [_hostdev(root, 0, req)]
        return req
    if root.tag != "devices":
        raise InvalidRequest(f"xml: expected <devices> or <hostdev>, got <{root.tag}>")
    hostdevs = list(root)
    if not hostdevs or any(h.tag != "hostdev" for h in hostdevs):
        raise InvalidRequest("xml: <devices> must hold one or more <hostdev> elements")
    req.functions = [_hostdev(h, i, req) for i, h in enumerate(hostdevs)]
    return req


def libvirt_bus(buses: Sequence[Bus], number: int) -> str:
    """libvirt's guest bus number as a bus of the VM: 0 is the root bus, N is the bus libvirt
    names pci.N (its controller with index N)."""
    if number == 0:
        root = next((b for b in buses if "host" in b.owner_type.lower()), None)
        if root is not None:
            return root.name
    elif any(b.name == f"pci.{number}" for b in buses):
        return f"pci.{number}"
    raise NotFound(f"xml: address@bus={number}: this VM has no such bus (libvirt's bus N "
                   f"is the bus named pci.N; buses here: {', '.join(b.name for b in buses)})")
