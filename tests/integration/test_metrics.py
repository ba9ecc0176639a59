"""Metrics and health: the optional listener serves Prometheus text and OpenMetrics,
scraped here with an HTTP client and parsed with prometheus_client's own parser; counts follow
what happened on a real QEMU; query-health reports the loop, the journal and every VM's link."""

from __future__ import annotations

import asyncio
import http.client
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import connect, start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(self.path))


def scrape(path: Path, accept: str = "text/plain") -> tuple[str, str]:
    conn = UnixHTTPConnection(path)
    conn.request("GET", "/metrics", headers={"Accept": accept})
    resp = conn.getresponse()
    assert resp.status == 200
    body = resp.read().decode()
    return resp.getheader("Content-Type") or "", body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def paused(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "metrics-paused", LabVmSpec(machine="pc", paused=True))
    yield vm
    vm.stop()


async def test_metrics_follow_real_operations_and_health_reports(tmp_path: Path,
                                                                 paused: LabVm) -> None:
    sock = tmp_path / "metrics.sock"
    d = DaemonProcess(tmp_path / "d", access_config=f'qmp-dirs = ["{paused.workdir}"]',
                      extra_config=f'[metrics]\nlisten = "unix:{sock}"\n')
    d.start()
    try:
        c = await connect(d.socket)
        await c.execute("vm-add", {"name": "m", "qmp": str(paused.qmp_socket)})
        await c.execute("device-attach", {"vm": "m", "functions": [
            {"id": "ok0", "driver": "virtio-rng-pci"}]})
        with pytest.raises(ExecuteError):
            await c.execute("device-attach", {"vm": "m", "functions": [
                {"id": "bad0", "driver": "virtio-rng-pci", "properties": {"rng": "nosuch"}}]})
        await c.execute("function-add", {"vm": "m", "id": "q1", "driver": "e1000",
                                         "bus": "pci.0", "slot": 9, "function": 1})
        ctype, text = await asyncio.to_thread(scrape, sock)
        assert ctype.startswith("text/plain")
        got = samples(text)
        ops = "qmpfd_operations_total"
        assert got[(ops, (("kind", "attach"), ("policy", "acpi-pcihp"), ("result", "ok")))] == 1
        assert got[(ops, (("kind", "attach"), ("policy", "acpi-pcihp"),
                          ("result", "rolled-back")))] == 1
        assert got[("qmpfd_vms", (("link", "up"),))] == 1
        assert got[("qmpfd_queued_functions", ())] == 1
        assert got[("qmpfd_orphaned_slots", ())] == 0
        assert got[("qmpfd_journal_sync_seconds_count", ())] >= 2
        assert got[("qmpfd_operation_phase_seconds_count",
                    (("kind", "attach"), ("phase", "journal")))] >= 2
        ctype, text = await asyncio.to_thread(scrape, sock, "application/openmetrics-text")
        assert ctype.startswith("application/openmetrics-text") and text.endswith("# EOF\n")

        health: dict[str, Any] = await c.execute("query-health")
        assert health["status"] == "ok" and health["vms"] == [{"name": "m", "link": "up"}]
        assert health["loop-lag"] >= 0 and health["journal"]["last-error"] is None
        paused.stop()                              # the VM's QEMU goes away
        await c.wait_event("VM_DISCONNECTED", 30)
        health = await c.execute("query-health")
        assert health["status"] == "degraded" and "VM m: link down" in health["problems"]
        got = samples((await asyncio.to_thread(scrape, sock))[1])
        assert got[("qmpfd_vms", (("link", "down"),))] == 1
        await c.qmp.disconnect()
    finally:
        d.stop()
        paused.start()
