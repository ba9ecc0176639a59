import re
from pathlib import Path

import pytest

from qmpfd.api.xml import parse_devices_xml
from qmpfd.errors import InvalidRequest

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_xml_examples() -> list[str]:
    return re.findall(r"```xml\n(.*?)```", README.read_text(), re.S)


def test_every_readme_example_parses() -> None:
    examples = readme_xml_examples()
    assert examples, "the README shows XML examples"
    for text in examples:
        assert parse_devices_xml(text)


def test_partial_assignment_document() -> None:
    fns = parse_devices_xml("""<devices>
      <hostdev mode='subsystem' type='pci' managed='yes'>
        <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
      </hostdev>
      <hostdev mode='subsystem' type='pci' managed='no'>
        <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
        <address type='unassigned'/>
        <alias name='ua-keep'/>
      </hostdev></devices>""")
    assert fns == [
        {"id": "hostdev-0000-01-00-1", "host": "0000:01:00.1", "managed": True, "function": 0},
        {"id": "ua-keep", "host": "0000:01:00.0", "managed": False, "unassigned": True}]


def test_single_hostdev() -> None:
    (fn,) = parse_devices_xml("<hostdev mode='subsystem' type='pci'><source>"
                              "<address bus='0x3' slot='0x0' function='0x2'/></source></hostdev>")
    assert fn["host"] == "0000:03:00.2"


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
