"""s390x: multifunction is refused before anything reaches QEMU; one function takes the ordinary
zPCI path. Real qemu-system-s390x, held at start (-S): no guest is needed for either claim."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.integration.conftest import Client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s390(workdir: Path) -> Iterator[tuple[Path, Path]]:
    qemu = shutil.which("qemu-system-s390x")
    assert qemu, "qemu-system-s390x missing: apt-get install qemu-system-misc (scripts/setup does)"
    d = workdir / "s390x"
    d.mkdir()
    qmp, inspect = d / "vm.qmp", d / "inspect.qmp"
    proc = subprocess.Popen([qemu, "-machine", "s390-ccw-virtio,accel=tcg", "-nodefaults",
                             "-display", "none", "-S",
                             "-qmp", f"unix:{qmp},server=on,wait=off",
                             "-qmp", f"unix:{inspect},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not inspect.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield qmp, inspect
    proc.terminate()
    proc.wait(10)


async def peripheral(inspect: Path) -> set[str]:
    q = QMPClient("inspect")
    await q.connect(str(inspect))
    try:
        return {p["name"] for p in await q.execute("qom-list", {"path": "/machine/peripheral"})
                if p["type"].startswith("child<")}
    finally:
        await q.disconnect()


async def test_s390x_refuses_multifunction_and_takes_single_functions(
        client: Client, s390: tuple[Path, Path]) -> None:
    qmp, inspect = s390
    info = await client.execute("vm-add", {"name": "zvm", "qmp": str(qmp)})
    assert info["arch"] == "s390x" and info["policy"] == "s390-zpci"
    with pytest.raises(ExecuteError) as err:
        await client.execute("device-attach", {"vm": "zvm", "functions": [
            {"id": "m0", "driver": "virtio-rng-pci"}, {"id": "m1", "driver": "virtio-rng-pci"}]})
    assert err.value.error_class == "Unsupported" and "s390" in str(err.value)
    with pytest.raises(ExecuteError) as queued:
        await client.execute("function-add", {"vm": "zvm", "id": "q1", "driver": "virtio-rng-pci",
                                              "bus": "pci.0", "slot": 3, "function": 1})
    assert queued.value.error_class == "Unsupported"
    assert await peripheral(inspect) == set(), "nothing may reach QEMU"
    reply = await client.execute("device-attach", {"vm": "zvm", "functions": [
        {"id": "z0", "driver": "virtio-rng-pci"}]})
    assert "multifunction" not in reply["steps"][0]["arguments"]
    assert await peripheral(inspect) == {"z0"}
    await client.execute("vm-remove", {"name": "zvm"})
