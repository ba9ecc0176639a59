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
import zlib
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("QMPFD_LAB_CACHE",
                                    Path(__file__).resolve().parents[1] / ".cache" / "lab"))

#: Debian architecture names of the guests the lab can boot, by QEMU target.
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64": "ppc64el"}

#: The guest's init. It reports on the serial console: "GUEST-READY" once, then a line
#: "PCI-DEVICES: <bdf> <bdf> ..." each time /sys/bus/pci/devices changes (polled every 0.2 s),
#: and "KMSG: <message>" for each kernel message of the PCI hotplug drivers.
INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
if grep -q qmpfd.dump-sysfs /proc/cmdline; then
  # Capture the PCI part of sysfs (files base64, links as targets) for unit-test fixtures.
  for d in /sys/bus/pci/devices/*; do
    for f in class vendor device subsystem_vendor subsystem_device reset_method boot_vga; do
      [ -f "$d/$f" ] && echo "SYSFS-F $d/$f $(base64 -w0 < "$d/$f")"
    done
    echo "SYSFS-F $d/config $(head -c 64 "$d/config" | base64 -w0)"
    for l in "$d"/driver "$d"/iommu_group "$d"/physfn "$d"/virtfn*; do
      [ -L "$l" ] && echo "SYSFS-L $l $(readlink "$l")"
    done
    for n in "$d"/net/*; do
      [ -f "$n/operstate" ] && echo "SYSFS-F $n/operstate $(base64 -w0 < "$n/operstate")"
    done
  done
  for l in /sys/kernel/iommu_groups/*/devices/*; do
    [ -L "$l" ] && echo "SYSFS-L $l $(readlink "$l")"
  done
  echo "SYSFS-F /proc/mounts $(base64 -w0 < /proc/mounts)"
  echo "SYSFS-END"
fi
if [ -x /usr/sbin/rtas_errd ]; then
  # pseries: QEMU announces a PCI hotplug or unplug with an RTAS event. rtas_errd reads it and
  # runs drmgr, which configures (or releases) the function's DRC and adds (removes) the
  # function through rpadlpar_io: the same chain a pseries distribution runs.
  insmod /lib/modules/*/kernel/drivers/pci/hotplug/rpaphp.ko
  insmod /lib/modules/*/kernel/drivers/pci/hotplug/rpadlpar_io.ko
  mkdir -p /var/lock /var/log /tmp
  /usr/sbin/rtas_errd
fi
# The kernel's own hotplug messages (pciehp: attention button, power), whatever the console
# log level: tests read the guest's account of how a slot went, not a clock.
cat /dev/kmsg | while read -r line; do
  case "$line" in *pciehp*|*acpiphp*) echo "KMSG: ${line#*;}";; esac
done &
echo "GUEST-READY"
last="-"
while true; do
  cur=$(ls /sys/bus/pci/devices | tr '\\n' ' ')
  if [ "$cur" != "$last" ]; then echo "PCI-DEVICES: $cur"; last="$cur"; fi
  sleep 0.2
done
"""


class LabSetupError(RuntimeError):
    """Something the lab needs is not installed; the message says what to install."""


#: Guest kernels ``scripts/setup`` unpacks beside the host release's own, by Debian suite.
KERNEL_SUITES = {"bookworm": "6.1", "trixie": "6.12"}


def kernel_dir(arch: str = "amd64", cache: Path = DEFAULT_CACHE,
               choice: str | None = None) -> Path:
    """Where the guest kernel of ``arch`` is unpacked: the host release's (``kernel-ARCH``), or
    the one ``choice`` or else ``$QMPFD_LAB_KERNEL`` names (a suite, ``bookworm``/``trixie``,
    or its kernel series, ``6.1``/``6.12``)."""
    choice = choice or os.environ.get("QMPFD_LAB_KERNEL", "")
    if not choice or choice == "host":
        return cache / f"kernel-{arch}"
    suite = next((s for s, series in KERNEL_SUITES.items() if choice in (s, series)), None)
    if suite is None:
        raise LabSetupError(f"QMPFD_LAB_KERNEL={choice}: one of host, "
                            + ", ".join(f"{s} ({v})" for s, v in KERNEL_SUITES.items()))
    return cache / f"kernel-{arch}-{suite}"


def find_kernel(arch: str = "amd64", cache: Path = DEFAULT_CACHE,
                choice: str | None = None) -> Path:
    """The guest kernel for a Debian architecture (amd64, arm64, ppc64el)."""
    env = os.environ.get(f"QMPFD_GUEST_KERNEL_{arch.upper()}") or (
        os.environ.get("QMPFD_GUEST_KERNEL") if arch == "amd64" else None)
    if env:
        return Path(env)
    kdir = kernel_dir(arch, cache, choice)
    patterns = [str(kdir / "boot" / "vmlinu*")]
    if arch == "amd64" and kdir.name == "kernel-amd64":
        patterns.append("/boot/vmlinuz-*")
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1])
    raise LabSetupError(f"no {arch} guest kernel: run scripts/setup (it unpacks Debian's "
                        f"kernel package into {kdir})")


def find_busybox(arch: str = "amd64", cache: Path = DEFAULT_CACHE) -> Path:
    """A static busybox of the guest's architecture (the host's own one for amd64)."""
    candidates = [cache / f"busybox-{arch}" / "bin" / "busybox"]
    if arch == "amd64":
        candidates += [Path("/bin/busybox"), Path("/usr/bin/busybox")]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise LabSetupError(f"no {arch} busybox: run scripts/setup (apt-get install busybox-static "
                        f"for amd64; busybox-static:{arch} is unpacked into .cache/lab)")


def guest_userland(arch: str = "amd64", cache: Path = DEFAULT_CACHE,
                   kernel_choice: str | None = None) -> list[Path]:
    """Trees copied into the initramfs beside busybox, for guests that need more than a shell.

    A pseries guest learns of PCI hotplug only through rtas_errd and drmgr (dynamically linked,
    with their ppc64el libraries) and the kernel's RPA hotplug modules; ``scripts/setup``
    unpacks them from Debian's packages. Other guests need nothing more.
    """
    if arch != "ppc64el":
        return []
    userland = cache / "userland-ppc64el"
    kernel = kernel_dir(arch, cache, kernel_choice)  # only its lib/modules is copied
    if not (userland / ".complete").exists() or not any(
            kernel.glob("lib/modules/*/kernel/drivers/pci/hotplug/rpaphp.ko")):
        raise LabSetupError("the ppc64el guest's hotplug userland (rtas_errd, drmgr, rpaphp) is "
                            "missing: run scripts/setup")
    return [userland, kernel]


def _tree_digest(trees: list[Path]) -> int:
    """A checksum of the trees' file names and sizes, so a changed tree makes a new initramfs."""
    listing = sorted(f"{p.relative_to(t)}:{p.lstat().st_size}" for t in trees
                     for p in t.rglob("*") if not p.is_dir())
    return zlib.crc32("\n".join(listing).encode())


def build_initramfs(cache: Path = DEFAULT_CACHE, busybox: Path | None = None,
                    arch: str = "amd64", kernel: str | None = None) -> Path:
    """Build (once) a gzipped cpio initramfs holding busybox, the reporting init and the
    architecture's :func:`guest_userland` (with the modules of the ``kernel`` chosen)."""
    bb = busybox or find_busybox(arch, cache)
    extras = guest_userland(arch, cache, kernel)
    tag = (f"{arch}-{bb.stat().st_size}-{zlib.crc32(INIT_SCRIPT.encode()):08x}"
           + (f"-{_tree_digest(extras):08x}" if extras else ""))
    out = cache / f"initramfs-{tag}.cpio.gz"
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
        for tree in extras:
            for top in ("lib", "lib64", "usr"):
                if (tree / top).is_dir():
                    shutil.copytree(tree / top, root / top, symlinks=True, dirs_exist_ok=True)
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
