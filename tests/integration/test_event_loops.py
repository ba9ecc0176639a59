"""Both event loops qmpfd runs on ([daemon] event-loop): the same multifunction attach and
detach on a real guest, refereed by QEMU's second monitor and the guest's PCI list. The rest
of the suite runs the default (uvloop where installed); this keeps asyncio's own loop real."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import start_lab_vm
from tests.integration.fault_checks import FUNCS, IDS, adopt, agreement
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "loops-pc", LabVmSpec(machine="pc"))
    yield vm
    vm.stop()


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
async def test_attach_and_detach_on_each_event_loop(tmp_path: Path, lab: LabVm,
                                                     choice: str) -> None:
    if choice == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is a dependency on x86_64 and aarch64")
    d = DaemonProcess(tmp_path / "qmpfd", daemon_config=f'event-loop = "{choice}"')
    d.start()
    try:
        before = lab.guest_pci() or set()
        c = await adopt(d, lab.qmp_socket)
        assert (await c.execute("query-health"))["event-loop"] == choice
        await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
        await agreement(c, lab, before, expect_attached=True)
        await asyncio.wait_for(c.execute("device-detach", {"vm": "f", "ids": sorted(IDS)}),
                               120)
        await agreement(c, lab, before)
        await c.qmp.disconnect()
        d.stop()
        assert d.proc is not None and d.proc.returncode == 0, d.log()
    finally:
        d.stop()
