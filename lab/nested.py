"""The nested VFIO lab: a first-level (L1) guest with an emulated Intel IOMMU and a real 4-function
device (e1000e functions behind a root port, so they share one IOMMU group as on real hardware).

L1 runs the host's Debian kernel with the modules it needs (virtio, 9p, vfio, e1000e), mounts
the host's root read-only over virtio-9p and chroots into it, so the same qemu, python and qmpfd
run inside; :mod:`lab.nested_inner` then drives qmpfd against a second-level (L2) QEMU there.
Results come back on L1's serial console as ``LAB5 {json}`` lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.guest import DEFAULT_CACHE, LabSetupError, find_busybox, find_kernel

REPO = Path(__file__).resolve().parents[1]
MODULES = ["virtio_pci", "9pnet_virtio", "9p", "vfio_iommu_type1", "vfio-pci", "e1000e"]

L1_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "LAB5-INSMOD-FAILED $m"; done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /host || echo "LAB5-9P-FAILED"
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev
# /tmp stays the host's (read-only): the repository may live there. Writable space is /run.
mount -t tmpfs run /host/run
echo "LAB5-L1-READY"
chroot /host /bin/sh -c 'mkdir -p /run/tmp && cd {repo} &&
  LAB5_BOOT_L2={boot_l2} TMPDIR=/run/tmp PYTHONPATH={repo} {python} -m lab.nested_inner' 2>&1
echo "LAB5-DONE"
poweroff -f
"""


def kernel_version(kernel: Path) -> str:
    m = re.search(r"vmlinuz-(.+)$", kernel.name)
    if not m:
        raise LabSetupError(f"cannot tell the version of {kernel}")
    return m.group(1)


def modules_dir(version: str, cache: Path = DEFAULT_CACHE) -> Path:
    for d in (cache / "kernel-amd64" / "lib" / "modules" / version,
              Path("/lib/modules") / version):
        if (d / "modules.dep").exists():
            return d
    raise LabSetupError(f"no modules for {version}: run scripts/setup")


def module_closure(moddir: Path, names: list[str]) -> list[str]:
    """Module files (relative to moddir) for ``names`` and their dependencies, deps first."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.removesuffix(".ko").removesuffix(".ko.xz"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in reversed(deps[mod]):
            visit(d)
        if mod not in order:
            order.append(mod)

    for n in names:
        if n not in by_name:
            raise LabSetupError(f"module {n} not found in {moddir}")
        visit(by_name[n])
    return order


def build_l1_initramfs(workdir: Path, boot_l2: bool = False) -> Path:
    kernel = find_kernel("amd64")
    moddir = modules_dir(kernel_version(kernel))
    root = workdir / "l1-root"
    for d in ("bin", "proc", "sys", "dev", "modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(find_busybox("amd64"), root / "bin" / "busybox")
    mods = module_closure(moddir, MODULES)
    for m in mods:
        shutil.copy2(moddir / m, root / "modules" / Path(m).name)
    (root / "modules.order").write_text("\n".join(Path(m).name for m in mods) + "\n")
    init = root / "init"
    init.write_text(L1_INIT.format(repo=REPO, python=sys.executable,
                                   boot_l2="1" if boot_l2 else ""))
    init.chmod(0o755)
    files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                             check=True, capture_output=True).stdout
    out = workdir / "l1-initramfs.cpio.gz"
    with out.open("wb") as f:
        subprocess.run(["gzip", "-1"], input=archive, stdout=f, check=True)
    return out


def l1_command(workdir: Path, console: Path, boot_l2: bool = False) -> list[str]:
    kernel = find_kernel("amd64")
    initrd = build_l1_initramfs(workdir, boot_l2)
    return [
        # intremap: vfio_iommu_type1 refuses a platform without interrupt remapping (EPERM).
        "qemu-system-x86_64", "-machine", "q35,accel=tcg,kernel-irqchip=split", "-cpu", "max",
        "-smp", "2",
        "-m", "2048", "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet intel_iommu=on panic=-1",
        "-serial", f"file:{console}",
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on",
        "-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=0x10",
        "-device", "e1000e,id=h0,bus=rp1,addr=0.0,multifunction=on",
        "-device", "e1000e,id=h1,bus=rp1,addr=0.1",
        "-device", "e1000e,id=h2,bus=rp1,addr=0.2",
        "-device", "e1000e,id=h3,bus=rp1,addr=0.3",
    ]


def run_lab(timeout: float = 1500.0, boot_l2: bool = False) -> tuple[list[str], float]:
    """Run the whole lab; returns (L1 console lines, seconds)."""
    with tempfile.TemporaryDirectory(prefix="qmpfd-lab5-") as tmp:
        work = Path(tmp)
        console = work / "l1.console"
        started = time.monotonic()
        proc = subprocess.Popen(l1_command(work, console, boot_l2), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        elapsed = time.monotonic() - started
        text = console.read_text(errors="replace") if console.exists() else ""
        return text.splitlines(), elapsed


if __name__ == "__main__":
    lines, seconds = run_lab(boot_l2="--boot-l2" in sys.argv)
    print("\n".join(lines))
    print(f"lab took {seconds:.1f} s")
