"""Which QEMU runs a lab VM: the host's, or another Debian release's from ``.cache/qemu``.

``scripts/debian-roots`` unpacks each release's QEMU packages, with every library they need,
into ``.cache/qemu/SUITE/root``. Such a QEMU is never chrooted into: it runs through the root's
own dynamic loader with the root's libraries, its firmware directories given with ``-L`` and its
modules with ``QEMU_MODULE_DIR`` (run through the loader, QEMU cannot find its data relative to
its own binary: ``/proc/self/exe`` is the loader). Host paths (kernels, sockets) work unchanged.

A test or the demo picks one with ``QMPFD_LAB_QEMU`` (``host``, a suite name such as ``trixie``,
or a version prefix such as ``10.0``); the matrix tests run every one that is built.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab.guest import LabSetupError

ROOTS = Path(os.environ.get("QMPFD_QEMU_ROOTS",
                            Path(__file__).resolve().parents[1] / ".cache" / "qemu"))

#: The Debian releases whose QEMU the lab can run, oldest first, with what they ship.
SUITES = ("bullseye", "bookworm", "trixie", "sid")
#: Releases older than qmpfd's minimum QEMU: built only to prove they are refused.
TOO_OLD = ("bullseye",)
PACKAGES = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm", "ppc64": "qemu-system-ppc",
            "s390x": "qemu-system-misc"}


@dataclass(frozen=True)
class QemuBuild:
    """One QEMU installation: ``root`` is None for the host's own."""

    name: str                  # "host" or the Debian suite
    root: Path | None

    def command(self, arch: str) -> list[str]:
        """argv prefix that runs ``qemu-system-ARCH`` of this build, with its firmware paths."""
        binary = f"qemu-system-{arch}"
        if self.root is None:
            found = shutil.which(binary)
            if found is None:
                raise LabSetupError(f"{binary} not found: apt-get install {PACKAGES[arch]}")
            return [found]
        libdirs = [self.root / "usr/lib/x86_64-linux-gnu", self.root / "lib/x86_64-linux-gnu"]
        exe = self.root / "usr/bin" / binary
        loader = next((d / "ld-linux-x86-64.so.2" for d in libdirs
                       if (d / "ld-linux-x86-64.so.2").exists()), None)
        if not exe.exists() or loader is None:
            raise LabSetupError(f"{exe} missing: run scripts/setup")
        return [str(loader), "--library-path", ":".join(map(str, libdirs)), str(exe),
                "-L", str(self.root / "usr/share/qemu"), "-L", str(self.root / "usr/share/seabios")]

    def aarch64_uefi(self) -> Path | None:
        """UEFI firmware for arm64 ``virt`` shipped with this build's release, if unpacked."""
        base = self.root if self.root is not None else Path("/")
        fd = base / "usr/share/qemu-efi-aarch64/QEMU_EFI.fd"
        return fd if fd.exists() else None

    def env(self) -> dict[str, str]:
        """Environment for the QEMU process."""
        env = dict(os.environ)
        if self.root is not None:
            env["QEMU_MODULE_DIR"] = str(self.root / "usr/lib/x86_64-linux-gnu/qemu")
        return env

    @functools.cached_property
    def version(self) -> str:
        """QEMU's own version ("10.0.13"), from ``--version``."""
        out = subprocess.run([*self.command("x86_64")[:4], "--version"], env=self.env(),
                             capture_output=True, text=True, check=True).stdout
        m = re.search(r"version (\d+\.\d+\.\d+)", out)
        return m.group(1) if m else "?"


def available(*, supported_only: bool = False) -> list[QemuBuild]:
    """The host's QEMU and every release's QEMU that ``scripts/setup`` built here, oldest
    release first (``supported_only``: without those older than qmpfd's minimum)."""
    builds = [QemuBuild("host", None)]
    builds += [QemuBuild(s, ROOTS / s / "root") for s in SUITES
               if (ROOTS / s / "root" / ".complete").exists() and s != host_suite()
               and not (supported_only and s in TOO_OLD)]
    return builds


def host_suite() -> str:
    """The Debian release of this machine (its QEMU is the "host" build)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.MULTILINE)
    return os.environ.get("QMPFD_HOST_SUITE") or (m.group(1) if m else "")


def resolve(name: str | None = None) -> QemuBuild:
    """The QEMU named by ``name`` or ``$QMPFD_LAB_QEMU`` (default: the host's)."""
    name = name or os.environ.get("QMPFD_LAB_QEMU") or "host"
    if name == host_suite():
        name = "host"   # this machine's release: its QEMU is the host's own
    builds = available()
    for b in builds:
        if name == b.name:
            return b
    for b in builds:
        if b.version == name or b.version.startswith(name + "."):
            return b
    known = ", ".join(f"{b.name} ({b.version})" for b in builds)
    raise LabSetupError(f"QMPFD_LAB_QEMU={name}: no such QEMU here; built: {known} "
                        "(scripts/setup builds bullseye, bookworm, trixie and sid)")
