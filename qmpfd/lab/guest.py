"""Guest images: a Debian kernel and a busybox initramfs built here.

The kernel comes from ``$QMPFD_GUEST_KERNEL``, else from the cache dir (unpacked from the Debian
package by ``scripts/setup``), else from ``/boot``. The initramfs is built from ``busybox-static``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("QMPFD_LAB_CACHE",
                                    Path(__file__).resolve().parents[2] / ".cache" / "lab"))

#: The guest's init. It reports on the serial console: "GUEST-READY" once, then a line
#: "PCI-DEVICES: <bdf> <bdf> ..." each time /sys/bus/pci/devices changes (polled every 0.2 s).
INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "GUEST-READY"
last=""
while true; do
  cur=$(ls /sys/bus/pci/devices | tr '\\n' ' ')
  if [ "$cur" != "$last" ]; then echo "PCI-DEVICES: $cur"; last="$cur"; fi
  sleep 0.2
done
"""


class LabSetupError(RuntimeError):
    """Something the lab needs is not installed; the message says what to install."""


def find_kernel(arch: str = "amd64", cache: Path = DEFAULT_CACHE) -> Path:
    env = os.environ.get("QMPFD_GUEST_KERNEL")
    if env:
        return Path(env)
    for pattern in (str(cache / f"kernel-{arch}" / "boot" / "vmlinu*"), "/boot/vmlinuz-*"):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1])
    raise LabSetupError(f"no {arch} guest kernel: run scripts/setup (it unpacks "
                        "linux-image-amd64 into .cache/lab) or set QMPFD_GUEST_KERNEL")


def find_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).exists():
            return Path(candidate)
    raise LabSetupError("busybox not found: apt-get install busybox-static")


def build_initramfs(cache: Path = DEFAULT_CACHE, busybox: Path | None = None) -> Path:
    """Build (once) a gzipped cpio initramfs holding busybox and the reporting init."""
    bb = busybox or find_busybox()
    out = cache / f"initramfs-{bb.stat().st_size}-{abs(hash(INIT_SCRIPT)) % 10**8}.cpio.gz"
    if out.exists():
        return out
    if shutil.which("cpio") is None:
        raise LabSetupError("cpio not found: apt-get install cpio")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev"):
            (root / d).mkdir()
        shutil.copy2(bb, root / "bin" / "busybox")
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                                 check=True, capture_output=True).stdout
        partial = out.with_suffix(".tmp")
        subprocess.run(["gzip", "-1"], input=archive, stdout=partial.open("wb"), check=True)
        partial.rename(out)
    return out
