import re
from pathlib import Path

import pytest

from qmpfd.api.xml import parse_devices_xml
from qmpfd.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[2]


def documented_xml_examples() -> list[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [x for page in pages for x in re.findall(r"```xml\n(.*?)```", page.read_text(), re.S)]


def test_every_documented_xml_example_parses() -> None:
    examples = documented_xml_examples()
    assert examples, "the docs show XML examples"
    for text in examples:
        assert parse_devices_xml(text).functions


def test_partial_assignment_document() -> None:
    doc = parse_devices_xml("""<devices>
      <hostdev mode='subsystem' type='pci' managed='yes'>
        <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
      </hostdev>
      <hostdev mode='subsystem' type='pci' managed='no'>
        <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
        <address type='unassigned'/>
        <alias name='ua-keep'/>
      </hostdev></devices>""")
    assert doc.functions == [
        {"id": "hostdev-0000-01-00-1", "host": "0000:01:00.1", "managed": True, "function": 0},
        {"id": "ua-keep", "host": "0000:01:00.0", "managed": False, "unassigned": True}]
    assert (doc.bus_number, doc.slot) == (0, 5)


def test_single_hostdev() -> None:
    (fn,) = parse_devices_xml("<hostdev mode='subsystem' type='pci'><source>"
                              "<address bus='0x3' slot='0x0' function='0x2'/></source>"
                              "</hostdev>").functions
    assert fn["host"] == "0000:03:00.2"
    assert fn["managed"] is False, "libvirt's default is managed='no'"


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<devices>&lol3;</devices>"""
EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<hostdev type='pci'><source><address bus='&x;' slot='0'/></source></hostdev>"""


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, EXTERNAL], ids=["billion-laughs", "external"])
def test_entities_are_refused(doc: str) -> None:
    with pytest.raises(InvalidRequest, match="refused"):
        parse_devices_xml(doc)


@pytest.mark.parametrize(("doc", "msg"), [
    ("<devices><interface/></devices>", "hostdev"),
    ("<hostdev type='usb'/>", "type='pci'"),
    ("<hostdev type='pci'><source/></hostdev>", "source"),
    ("<hostdev type='pci'><source><address bus='zz' slot='0'/></source></hostdev>", "bus"),
    ("<devices>", "well-formed"),
    ("<domain/>", "expected"),
])
def test_bad_documents_name_the_problem(doc: str, msg: str) -> None:
    with pytest.raises(InvalidRequest, match=msg):
        parse_devices_xml(doc)


# From libvirt's documentation (formatdomain.html, "Host device assignment", PCI), as written
# there: every element maps to what QEMU gets.
LIBVIRT_DOC_PCI = """<hostdev mode='subsystem' type='pci' managed='yes'>
  <source>
    <address domain='0x0000' bus='0x06' slot='0x02' function='0x0'/>
  </source>
  <boot order='1'/>
  <rom bar='on' file='/etc/fake/boot.bin'/>
</hostdev>"""

# A <hostdev> as libvirt 9.0 writes it back in a live domain's XML (virsh dumpxml).
LIVE_DOMAIN_HOSTDEV = """<hostdev mode='subsystem' type='pci' managed='yes'>
  <driver name='vfio'/>
  <source>
    <address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/>
  </source>
  <alias name='ua-gpu-audio'/>
  <acpi index='3'/>
  <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x1'/>
</hostdev>"""


def test_libvirt_documentation_snippet_maps_every_element() -> None:
    (fn,) = parse_devices_xml(LIBVIRT_DOC_PCI).functions
    assert fn["host"] == "0000:06:02.0" and fn["managed"] is True
    assert fn["properties"] == {"bootindex": 1, "rombar": 1, "romfile": "/etc/fake/boot.bin"}


def test_live_domain_hostdev_maps_alias_acpi_driver_and_guest_address() -> None:
    doc = parse_devices_xml(LIVE_DOMAIN_HOSTDEV)
    (fn,) = doc.functions
    assert fn["id"] == "ua-gpu-audio" and fn["function"] == 1
    assert fn["properties"] == {"acpi-index": 3}
    assert (doc.bus_number, doc.slot) == (0, 7)


@pytest.mark.parametrize(("rom", "props"), [
    ("<rom bar='off'/>", {"rombar": 0}),
    ("<rom enabled='no'/>", {"romfile": ""}),
    ("<rom file='/x.rom'/>", {"romfile": "/x.rom"}),
])
def test_rom_forms(rom: str, props: dict[str, object]) -> None:
    (fn,) = parse_devices_xml(f"<hostdev mode='subsystem' type='pci'><source><address "
                              f"bus='1' slot='0'/></source>{rom}</hostdev>").functions
    assert fn["properties"] == props


@pytest.mark.parametrize(("text", "value"), [
    ("0x10", 16), ("16", 16), ("010", 8), ("0", 0), ("0X1f", 31)])
def test_numbers_parse_as_libvirt_parses_them(text: str, value: int) -> None:
    (fn,) = parse_devices_xml(f"<hostdev mode='subsystem' type='pci'><source><address "
                              f"bus='{text}' slot='0'/></source></hostdev>").functions
    assert fn["host"] == f"0000:{value:02x}:00.0"


def _with(extra: str, attrs: str = "") -> str:
    return (f"<hostdev mode='subsystem' type='pci'{attrs}><source><address bus='1' "
            f"slot='0'/></source>{extra}</hostdev>")


@pytest.mark.parametrize(("doc", "named"), [
    (_with("<driver name='kvm'/>"), "hostdev[0]/driver@name='kvm'"),
    (_with("<teaming type='transient' persistent='ua-net0'/>"), "hostdev[0]/teaming"),
    (_with("<origstates/>"), "hostdev[0]/origstates"),
    (_with("<bogus/>"), "hostdev[0]/bogus: unknown element"),
    (_with("", " rawio='yes'"), "hostdev[0]@rawio"),
    (_with("<rom bar='maybe'/>"), "hostdev[0]/rom@bar='maybe'"),
    (_with("<boot order='1' loadparm='x'/>"), "hostdev[0]/boot@loadparm"),
    (_with("<address type='ccw'/>"), "hostdev[0]/address@type='ccw'"),
    (_with("<address type='pci' domain='1' bus='0' slot='3'/>"), "hostdev[0]/address@domain"),
    (_with("", " managed='true'"), "hostdev[0]@managed='true'"),
    ("<hostdev mode='subsystem' type='pci'><source><address bus='1' slot='0'>"
     "<zpci uid='1'/></address></source></hostdev>", "zpci"),
    ("<devices>" + _with("<address type='pci' bus='0' slot='3' function='0'/>")
     + _with("<address type='pci' bus='0' slot='4' function='1'/>") + "</devices>",
     "hostdev[1]/address@slot=4: the functions of one device share one slot"),
    (_with("<address type='unassigned'/><boot order='1'/>"), "unassigned function takes no"),
])
def test_every_other_element_is_refused_by_name(doc: str, named: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_devices_xml(doc)
    assert named in err.value.desc, err.value.desc
