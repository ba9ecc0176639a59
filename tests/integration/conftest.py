"""Fixtures for integration tests: a real qmpfd process and real QEMU VMs with Linux guests.

The daemon runs as a subprocess (``python -m qmpfd.daemon``) and tests talk to it with
``qemu.qmp.QMPClient``, exactly as a management plane would. Each lab VM has a second QMP monitor
that tests use to check what QEMU itself holds (qom-list, query-pci), independently of qmpfd.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, QMPClient

from lab.vm import LabVm, LabVmSpec
from tests.integration.faults_support import DaemonProcess

PENDING_EXPIRY = 15
SPAPR_UNPLUG = 300


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="session")
def daemon(workdir: Path) -> Iterator[Path]:
    """A running qmpfd; yields its socket path."""
    sock = workdir / "qmpfd.sock"
    config = workdir / "qmpfd.toml"
    config.write_text(f"""
[daemon]
socket = "{sock}"
state-dir = "{workdir / 'state'}"
log-format = "json"
log-level = "debug"

[timeouts]
pending-expiry = {PENDING_EXPIRY}

# Under TCG the pseries guest's drmgr releases one function every ~7 s (8 functions: ~55 s
# here); spapr's 90 s default is for KVM hosts. Overridden the way an operator would.
[timeouts.policy.spapr]
unplug = {SPAPR_UNPLUG}

[access]
qmp-dirs = ["{workdir}"]
""")
    log = (workdir / "qmpfd.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "qmpfd.daemon", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"qmpfd did not start: {(workdir / 'qmpfd.log').read_text()}")
        time.sleep(0.05)
    yield sock
    proc.terminate()
    assert proc.wait(15) == 0, "qmpfd did not shut down cleanly on SIGTERM"
    assert not sock.exists(), "qmpfd left its socket behind"


@pytest.fixture
async def daemon_proc(tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    """A qmpfd process of the test's own that it may SIGKILL and restart (fault tests)."""
    d = DaemonProcess(tmp_path / "qmpfd")
    yield d
    d.stop()


def refused_by_qemu(driver: str) -> dict[str, str]:
    """Properties of the right type that QEMU refuses when it creates the device (a backend
    that does not exist): a refusal only QEMU can make, after earlier functions went in.
    (A property that does not exist or does not convert is refused by qmpfd itself.)"""
    return {"rng": "nosuch"} if "rng" in driver else {"netdev": "nosuch"}


def start_lab_vm(workdir: Path, name: str, spec: LabVmSpec) -> LabVm:
    vm = LabVm(name, workdir / name, spec)
    vm.start(boot_timeout=float(os.environ.get("QMPFD_BOOT_TIMEOUT", "180")))
    return vm


class Client:
    """A qmpfd client for tests: execute() returns the value or raises ExecuteError."""

    def __init__(self, qmp: QMPClient) -> None:
        self.qmp = qmp
        self.events = EventListener()
        qmp.register_listener(self.events)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(cmd, args)

    async def wait_event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            while True:
                ev = await self.events.get()
                if ev["event"] == name:
                    return dict(ev)
        return await asyncio.wait_for(get(), timeout)


async def connect(socket: Path) -> Client:
    qmp = QMPClient("test")
    await qmp.connect(str(socket))
    return Client(qmp)


@pytest.fixture
async def client(daemon: Path) -> AsyncIterator[Client]:
    c = await connect(daemon)
    yield c
    await c.qmp.disconnect()


async def qemu_view(vm: LabVm) -> tuple[set[str], set[str]]:
    """What QEMU itself holds, asked on the lab VM's second monitor: (peripheral ids, ids in
    query-pci)."""
    qmp = QMPClient("inspect")
    await qmp.connect(str(vm.inspect_socket))
    try:
        peripheral = {p["name"] for p in await qmp.execute("qom-list",
                                                          {"path": "/machine/peripheral"})
                      if p["type"].startswith("child<")}
        in_pci: set[str] = set()

        def walk(devs: list[dict[str, Any]]) -> None:
            for d in devs:
                if d.get("qdev_id"):
                    in_pci.add(d["qdev_id"])
                if d.get("pci_bridge"):
                    walk(d["pci_bridge"].get("devices", []))

        for bus in await qmp.execute("query-pci"):
            walk(bus["devices"])
        return peripheral, in_pci
    finally:
        await qmp.disconnect()


async def qemu_execute(vm: LabVm, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """Run a command on the lab VM's second monitor (pausing the guest, for example)."""
    qmp = QMPClient("inspect")
    await qmp.connect(str(vm.inspect_socket))
    try:
        return await qmp.execute(cmd, args)
    finally:
        await qmp.disconnect()


def adopt(daemon: Path, name: str, qmp: Path) -> dict[str, Any]:
    """vm-add, for the synchronous module-scoped fixtures that start lab VMs."""
    async def run() -> dict[str, Any]:
        c = await connect(daemon)
        try:
            result: dict[str, Any] = await c.execute("vm-add", {"name": name, "qmp": str(qmp)})
            return result
        finally:
            await c.qmp.disconnect()
    return asyncio.run(run())
