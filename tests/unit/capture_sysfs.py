"""Capture a guest's PCI sysfs as a unit-test fixture, and rebuild it as a directory tree.

    python -m tests.unit.capture_sysfs NAME     # boots the lab guest described in LABS[NAME]

The guest's init dumps the files and links of /sys/bus/pci/devices and /sys/kernel/iommu_groups
(and /proc/mounts) on its console when booted with ``qmpfd.dump-sysfs``; the dump is stored in
tests/unit/data/NAME.sysfs. Unit tests rebuild it with :func:`rebuild`. Nothing is invented.
"""

from __future__ import annotations

import base64
import sys
import tempfile
from pathlib import Path

from lab.vm import LabVm, LabVmSpec

DATA = Path(__file__).parent / "data"

#: The nested VFIO lab's first level: q35 with an emulated IOMMU and a 4-function device (e1000e
#: functions) behind a root port, plus a single-function device on another port.
LABS = {
    "q35-iommu-4fn": LabVmSpec(machine="q35", iommu=True, root_ports=2, cmdline="qmpfd.dump-sysfs",
                               extra=[
        "-device", "e1000e,id=h0,bus=rp1,addr=0.0,multifunction=on",
        "-device", "e1000e,id=h1,bus=rp1,addr=0.1",
        "-device", "e1000e,id=h2,bus=rp1,addr=0.2",
        "-device", "e1000e,id=h3,bus=rp1,addr=0.3",
        "-device", "virtio-rng-pci,id=solo,bus=rp2,addr=0.0"]),
}


def capture(name: str) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        vm = LabVm(name, Path(tmp), LABS[name])
        vm.start()
        try:
            vm.wait_guest_pci(lambda s: True, 60)
            lines = [ln.strip() for ln in vm.serial_log.read_text(errors="replace").splitlines()
                     if ln.startswith(("SYSFS-F ", "SYSFS-L "))]
        finally:
            vm.stop()
    out = DATA / f"{name}.sysfs"
    out.write_text("\n".join(lines) + "\n")
    return out


def rebuild(name: str, root: Path) -> tuple[Path, Path]:
    """Rebuild the capture under ``root``; returns (sysfs root, proc root)."""
    for line in (DATA / f"{name}.sysfs").read_text().splitlines():
        kind, path, value = [*line.split(" ", 2), ""][:3]
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "SYSFS-F":
            target.write_bytes(base64.b64decode(value))
        elif kind == "SYSFS-L" and not target.exists():
            target.symlink_to(value)
    return root / "sys", root / "proc"


if __name__ == "__main__":
    print(capture(sys.argv[1]))
