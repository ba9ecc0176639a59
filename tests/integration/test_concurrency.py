"""Several clients at once on several VMs of each machine kind (lab/stress.py says what each does
and what is checked after every reply and at the end).

Short here (``QMPFD_STRESS_SECONDS``, 60 by default); bench/stress.py runs it long and reports the
counts. The referees are QEMU's second monitor on each VM and each guest's PCI list.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import stress
from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import connect, qemu_view, start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration

MACHINES = {"pc": LabVmSpec(machine="pc"), "q35": LabVmSpec(machine="q35", root_ports=4),
            "virt": LabVmSpec(machine="virt", root_ports=4)}
SECONDS = float(os.environ.get("QMPFD_STRESS_SECONDS", "60"))
CLIENTS = int(os.environ.get("QMPFD_STRESS_CLIENTS", "3"))


@pytest.fixture(scope="module")
def labs(workdir: Path) -> Iterator[dict[str, LabVm]]:
    started: dict[str, LabVm] = {}
    try:
        for machine, spec in MACHINES.items():
            started[machine] = start_lab_vm(workdir, f"stress-{machine}", spec)
        yield started
    finally:
        for vm in started.values():
            vm.stop()


async def test_clients_at_once_agree_with_qemu_and_guest(labs: dict[str, LabVm],
                                                         workdir: Path) -> None:
    d = DaemonProcess(workdir / "stress-qmpfd", access_config=f'qmp-dirs = ["{workdir}"]')
    d.start()
    try:
        c = await connect(d.socket)
        vms = []
        for machine, lab in labs.items():
            await c.execute("vm-add", {"name": machine, "qmp": str(lab.qmp_socket)})
            peripheral, _ = await qemu_view(lab)
            base = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 30)
            vms.append(stress.StressVm(machine, lab, frozenset(base), frozenset(peripheral)))
        await c.qmp.disconnect()
        result = await stress.run(d.socket, vms, clients=CLIENTS, seconds=SECONDS)
    finally:
        d.stop()
    print(f"\nconcurrency ({CLIENTS} clients, {SECONDS:g} s, {', '.join(MACHINES)}): "
          f"{result.summary()}")
    assert result.counts["device-attach ok"] > 0
    assert not result.violations, "\n".join(result.violations[:20])
