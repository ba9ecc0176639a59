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
from tests.integration.conftest import connect, start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration

QMPFCTL = str(Path(sys.executable).with_name("qmpfctl"))


@pytest.fixture(scope="module")
def paused(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "cli-paused", LabVmSpec(machine="pc", paused=True))
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
                                                              paused: LabVm) -> None:
    d = DaemonProcess(tmp_path / "d", access_config=f'qmp-dirs = ["{paused.workdir}"]')
    d.start()
    try:
        c = await connect(d.socket)
        await c.execute("vm-add", {"name": "p", "qmp": str(paused.qmp_socket)})
        await c.execute("device-attach", {"vm": "p", "functions": [
            {"id": "cc0", "driver": "virtio-rng-pci"}]})
        # The guest is held at start: it never answers the ACPI eject, so the detach waits.
        # Ctrl-C as a terminal sends it (a test run in the background inherits SIGINT ignored).
        proc = await asyncio.create_subprocess_exec(
            QMPFCTL, "--socket", str(d.socket), "detach", "p", "cc0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for _ in range(300):
            slots = await c.execute("query-slots", {"vm": "p"})
            if any(f["id"] == "cc0" and f["state"] == "unplugging"
                   for s in slots for f in s["functions"]):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the detach never started")
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, raw_err = await asyncio.wait_for(proc.communicate(), 30)
        err = raw_err.decode()
        assert proc.returncode == 130, err
        assert "interrupted; qmpfd carries on with device-detach" in err
        assert "Traceback" not in err, err
        ops = await c.execute("query-operations", {"vm": "p"})
        assert [o["kind"] for o in ops] == ["detach"]   # the daemon did go on
        await c.qmp.disconnect()
    finally:
        d.stop()
