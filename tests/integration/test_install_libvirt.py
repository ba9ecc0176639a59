"""An installed qmpfd manages a VM libvirt runs, with no compiler: scripts/install into a
scratch root links Debian's python3-libvirt (built for the system's libvirt) into the venv; the
installed daemon and the installed qmpfctl adopt a real libvirt domain, attach two functions
the guest sees in one slot, and detach them; scripts/uninstall then leaves only the config.
Runs under the host's Debian release and, through scripts/other-python, the other one (12 and 13:
libvirt 9.0 and 11.3, Python 3.11 and 3.13)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.libvirt import LibvirtGuest
from lab.vm import slot_groups

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def domain(workdir: Path) -> Iterator[LibvirtGuest]:
    with LibvirtGuest("qmpfd-lab-installed", workdir / "libvirt-installed") as guest:
        yield guest


def run(*cmd: str | Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out


def start(*cmd: str | Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"))


async def test_the_installed_qmpfd_adopts_a_libvirt_vm_without_a_compiler(
        tmp_path: Path, domain: LibvirtGuest) -> None:
    root = tmp_path / "root"
    out = await asyncio.to_thread(run, ROOT / "scripts/install", "--root", root)
    assert "libvirt support from Debian's python3-libvirt" in out.stdout
    venv = root / "opt/qmpfd"
    site = Path(run(venv / "bin/python", "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # Debian's binding, linked: no libvirt-python built into the venv
    assert (site / "libvirt.py").resolve() == Path("/usr/lib/python3/dist-packages/libvirt.py")
    assert not list(site.glob("libvirt_python*"))
    assert run(venv / "bin/python", "-c", "import libvirt; print(libvirt.getVersion())").stdout

    sock = tmp_path / "qmpfd.sock"
    cfg = tmp_path / "qmpfd.toml"
    cfg.write_text(f'[daemon]\nsocket = "{sock}"\nstate-dir = "{tmp_path}/state"\n')
    daemon = start(venv / "bin/qmpfd", "--config", cfg, log=tmp_path / "qmpfd.log")
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert daemon.poll() is None, (tmp_path / "qmpfd.log").read_text()
            assert time.monotonic() < deadline, "the installed qmpfd did not start"
            await asyncio.sleep(0.1)
        qmpfctl = [str(venv / "bin/qmpfctl"), "--socket", str(sock), "--json"]
        before = await asyncio.to_thread(domain.wait_guest_pci, lambda _s: True, 5)
        added = json.loads((await asyncio.to_thread(
            run, *qmpfctl, "vm", "add", "--libvirt", domain.name, "lv")).stdout)
        assert added["policy"] == "acpi-pcihp", added
        functions = tmp_path / "functions.json"
        functions.write_text(json.dumps([{"id": "in0", "driver": "e1000"},
                                         {"id": "in1", "driver": "virtio-rng-pci"}]))
        await asyncio.to_thread(run, *qmpfctl, "attach", "lv", functions)
        seen = await asyncio.to_thread(domain.wait_guest_pci,
                                       lambda s: len(s - before) >= 2, 120)
        assert sorted(len(x) for x in slot_groups(seen - before).values()) == [2]
        # libvirt's own view of QEMU holds both, through its monitor passthrough
        qom = (await asyncio.to_thread(domain.virsh, "qemu-monitor-command", domain.name,
                                       '{"execute":"qom-list","arguments":'
                                       '{"path":"/machine/peripheral"}}')).stdout
        assert '"in0"' in qom and '"in1"' in qom
        await asyncio.to_thread(run, *qmpfctl, "detach", "lv", "in0", "in1")
        await asyncio.to_thread(domain.wait_guest_pci, lambda s: s == before, 120)
        await asyncio.to_thread(run, *qmpfctl, "vm", "remove", "lv")
    finally:
        daemon.terminate()
        daemon.wait(30)
    await asyncio.to_thread(run, ROOT / "scripts/uninstall", "--root", root)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == ["etc/qmpfd/qmpfd.toml"], left
