"""LibvirtLink on libvirt's own in-process test driver (``test:///default``: a real libvirt
connection with a running domain "test", no libvirtd, no QEMU). The test driver has no QEMU
monitor, which exercises the refusals; events are handed in as libvirt's event thread would.
The QEMU path itself runs against a real libvirtd in tests/integration/test_libvirt.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from qmpfd.errors import QemuError, Timeout, VmGone
from qmpfd.qemu import libvirt_link
from qmpfd.qemu.link import LinkState

libvirt = pytest.importorskip("libvirt")
URI = "test:///default"


def link(domain: str = "test") -> libvirt_link.LibvirtLink:
    return libvirt_link.LibvirtLink("v", domain, command_timeout=1, uri=URI)


NODE = """<node>
  <domain type='test'><name>test</name><memory>65536</memory><os><type>hvm</type></os>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>qmpfd-stopped</name><memory>65536</memory><os><type>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
</node>"""


@pytest.fixture
def node(tmp_path: Path) -> str:
    """A test-driver node of its own: 'test' running, 'qmpfd-stopped' defined and shut off
    (each connection to it starts from this file, whatever libvirt version)."""
    (tmp_path / "node.xml").write_text(NODE)
    return f"test://{tmp_path / 'node.xml'}"


def test_domain_gone_only_when_libvirt_says_so(node: str) -> None:
    assert libvirt_link.domain_gone("test", node) is False            # running
    assert libvirt_link.domain_gone("qmpfd-stopped", node) is True    # defined, not running
    assert libvirt_link.domain_gone("no-such-domain", node) is True
    assert libvirt_link.domain_gone("test", "test:///no/such/file.xml") is False  # doubt


async def test_connect_refusals_name_the_domain_and_the_reason(node: str) -> None:
    def link_to(domain: str) -> libvirt_link.LibvirtLink:
        return libvirt_link.LibvirtLink("v", domain, command_timeout=1, uri=node)
    with pytest.raises(VmGone, match="QemuMonitorEventRegister"):
        await link_to("test").connect(5)           # the test driver has no QEMU monitor
    stopped = link_to("qmpfd-stopped")
    with pytest.raises(VmGone, match="'qmpfd-stopped' is not running"):
        await stopped.connect(5)
    assert stopped.state is LinkState.DOWN           # query-health: down, not new
    with pytest.raises(VmGone, match="no-such-domain"):
        await link_to("no-such-domain").connect(5)


async def test_commands_events_and_a_lost_domain() -> None:
    conn = libvirt.open(URI)
    lk = link()
    assert lk.socket_path == "libvirt:test" and lk.state is LinkState.NEW
    with pytest.raises(VmGone, match="not connected"):
        await lk.execute("query-status")
    # What connect() sets up, short of the monitor the test driver lacks:
    lk._loop, lk._conn, lk._dom = asyncio.get_running_loop(), conn, conn.lookupByName("test")
    lk._state = LinkState.UP
    heard: list[dict[str, Any]] = []
    lost = asyncio.Event()
    lk.subscribe(heard.append)
    lk.on_disconnect = lost.set
    lk._on_monitor_event(conn, lk._dom, "DEVICE_DELETED", 1, 2, '{"device": "a"}', None)
    lk._on_monitor_event(conn, lk._dom, "RESUME", 1, 3, None, None)
    await asyncio.sleep(0.01)
    assert [(e["event"], e["data"]) for e in heard] == [("DEVICE_DELETED", {"device": "a"}),
                                                       ("RESUME", {})]
    with pytest.raises(VmGone, match="not supported"):   # libvirt refuses: the link is lost
        await lk.execute("query-status", {"x": 1})
    await asyncio.wait_for(lost.wait(), 5)
    assert lk.state is LinkState.DOWN and heard[-1]["event"] == "QMPFD_DISCONNECTED"
    lk._on_close(conn, 0, None)                          # a second loss changes nothing
    await asyncio.sleep(0.01)
    assert [e["event"] for e in heard].count("QMPFD_DISCONNECTED") == 1
    await lk.close()
    assert lk.state is LinkState.CLOSED


async def test_qemu_errors_timeouts_and_lifecycle_events() -> None:
    lk = link()
    lk._loop = asyncio.get_running_loop()
    lk._state = LinkState.UP
    replies: list[dict[str, Any]] = [{"error": {"class": "DeviceNotFound", "desc": "no 'x'"}},
                                     {"return": {"status": "running"}}]

    def command(_request: str) -> dict[str, Any]:
        if not replies:
            time.sleep(0.3)
            return {"return": {}}
        return replies.pop(0)
    lk._command = command  # type: ignore[method-assign]
    with pytest.raises(QemuError, match="DeviceNotFound: no 'x'") as err:
        await lk.execute("device_del", {"id": "x"})
    assert err.value.qemu_class == "DeviceNotFound"
    assert await lk.execute("query-status") == {"status": "running"}
    with pytest.raises(Timeout, match=r"did not answer query-pci within 0\.1 s"):
        await lk.execute("query-pci", timeout=0.1)
    assert lk.commands_sent == 3
    lost = asyncio.Event()
    lk.on_disconnect = lost.set
    lk._on_lifecycle(None, None, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, None)
    await asyncio.sleep(0.01)
    assert not lost.is_set()
    lk._on_lifecycle(None, None, libvirt.VIR_DOMAIN_EVENT_STOPPED, 0, None)
    await asyncio.wait_for(lost.wait(), 5)
