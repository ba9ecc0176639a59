"""qmpfctl against a real daemon: the cases that used to end in a traceback or a client-library
message end in one readable line."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import connect, qemu_execute, qemu_view, start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration

QMPFCTL = str(Path(sys.executable).with_name("qmpfctl"))


@pytest.fixture(scope="module")
def guest(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "cli-guest", LabVmSpec(machine="pc"))
    yield vm
    vm.stop()


async def test_a_refused_client_sees_the_daemons_own_reason(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", daemon_config="max-clients = 1")
    d.start()
    holder = socket.socket(socket.AF_UNIX)
    try:
        for _ in range(50):   # the start-up probe's session may still hold the place a moment
            holder.connect(str(d.socket))
            if b'"QMP"' in holder.recv(4096):   # a greeting: this client holds the one place
                break
            holder.close()
            holder = socket.socket(socket.AF_UNIX)
            await asyncio.sleep(0.1)
        else:
            pytest.fail("never admitted")
        out = await asyncio.to_thread(
            subprocess.run, [QMPFCTL, "--socket", str(d.socket), "vm", "list"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert "refused the connection: too many clients (daemon.max-clients = 1)" in out.stderr
        assert "Greeting" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    finally:
        holder.close()
        d.stop()


async def test_ctrl_c_during_a_detach_says_the_daemon_goes_on(tmp_path: Path,
                                                              guest: LabVm) -> None:
    d = DaemonProcess(tmp_path / "d", access_config=f'qmp-dirs = ["{guest.workdir}"]')
    d.start()
    try:
        before = await asyncio.to_thread(guest.wait_guest_pci, lambda _seen: True)
        c = await connect(d.socket)
        await c.execute("vm-add", {"name": "g", "qmp": str(guest.qmp_socket)})
        await c.execute("device-attach", {"vm": "g", "functions": [
            {"id": "cc0", "driver": "virtio-rng-pci"},
            {"id": "cc1", "driver": "virtio-rng-pci"}]})
        await asyncio.to_thread(guest.wait_guest_pci, lambda seen: len(seen - before) == 2)
        # Held through QEMU's second monitor, the guest cannot answer the eject yet: the detach
        # is still under way when the client is interrupted.
        await qemu_execute(guest, "stop")
        # Ctrl-C as a terminal sends it (a test run in the background inherits SIGINT ignored).
        proc = await asyncio.create_subprocess_exec(
            QMPFCTL, "--socket", str(d.socket), "detach", "g", "cc0", "cc1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for _ in range(300):
            slots = await c.execute("query-slots", {"vm": "g"})
            if any(f["id"] == "cc0" and f["state"] == "unplugging"
                   for s in slots for f in s["functions"]):
                break
            await asyncio.sleep(0.1)
        else:
            proc.kill()
            pytest.fail(f"the detach never started: {await proc.communicate()}")
        proc.send_signal(signal.SIGINT)
        _, raw_err = await asyncio.wait_for(proc.communicate(), 30)
        err = raw_err.decode()
        assert proc.returncode == 130, err
        assert "interrupted; qmpfd carries on with device-detach" in err
        assert "Traceback" not in err, err
        assert {"cc0", "cc1"} <= (await qemu_view(guest))[0]
        await qemu_execute(guest, "cont")
        # The referees: the guest lets go of both functions, QEMU's own monitor has neither,
        # and qmpfd, which saw it through, agrees and holds no operation.
        await asyncio.to_thread(guest.wait_guest_pci, lambda seen: seen == before)
        for _ in range(300):
            if not {"cc0", "cc1"} & (await qemu_view(guest))[0]:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("QEMU still holds the functions")
        for _ in range(300):
            if not await c.execute("query-operations", {"vm": "g"}):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("qmpfd never saw the detach through")
        slots = await c.execute("query-slots", {"vm": "g"})
        assert not {f["id"] for s in slots for f in s["functions"]} & {"cc0", "cc1"}
        await c.qmp.disconnect()
    finally:
        await qemu_execute(guest, "cont")
        d.stop()
