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
"""

from __future__ import annotations

from typing import Any
from xml.etree.ElementTree import Element

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from qmpfd.errors import InvalidRequest

MAX_XML_BYTES = 64 * 1024


def _int(value: str | None, where: str) -> int:
    if value is None:
        raise InvalidRequest(f"xml: {where} is missing")
    try:
        return int(value, 0)
    except ValueError as exc:
        raise InvalidRequest(f"xml: {where}='{value}' is not a number") from exc


def _hostdev(el: Element, index: int) -> dict[str, Any]:
    where = f"hostdev[{index}]"
    if el.get("mode", "subsystem") != "subsystem" or el.get("type") != "pci":
        raise InvalidRequest(f"xml: {where}: only <hostdev mode='subsystem' type='pci'> is "
                             "supported")
    src = el.find("source/address")
    if src is None:
        raise InvalidRequest(f"xml: {where}: <source><address .../></source> is missing")
    host = (f"{_int(src.get('domain', '0'), where + '/source/address@domain'):04x}:"
            f"{_int(src.get('bus'), where + '/source/address@bus'):02x}:"
            f"{_int(src.get('slot'), where + '/source/address@slot'):02x}."
            f"{_int(src.get('function', '0'), where + '/source/address@function'):x}")
    alias = el.find("alias")
    fid = alias.get("name") if alias is not None and alias.get("name") else (
        "hostdev-" + host.replace(":", "-").replace(".", "-"))
    fn: dict[str, Any] = {"id": fid, "host": host,
                          "managed": el.get("managed", "yes") == "yes"}
    guest = el.find("address")
    if guest is not None:
        kind = guest.get("type")
        if kind == "unassigned":
            fn["unassigned"] = True
        elif kind == "pci":
            fn["function"] = _int(guest.get("function", "0"), where + "/address@function")
        else:
            raise InvalidRequest(f"xml: {where}/address: type '{kind}' is not supported")
    return fn


def parse_devices_xml(text: str) -> list[dict[str, Any]]:
    """The functions of a device-attach request, from ``<devices>`` or a single ``<hostdev>``."""
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
    if root.tag == "hostdev":
        return [_hostdev(root, 0)]
    if root.tag != "devices":
        raise InvalidRequest(f"xml: expected <devices> or <hostdev>, got <{root.tag}>")
    hostdevs = list(root)
    if not hostdevs or any(h.tag != "hostdev" for h in hostdevs):
        raise InvalidRequest("xml: <devices> must hold one or more <hostdev> elements")
    return [_hostdev(h, i) for i, h in enumerate(hostdevs)]
