"""A guest that libvirt runs (the machine's libvirtd: 9.0 on Debian 12, 11.3 on Debian 13), for
tests of libvirt-run VMs.

Starts virtlogd and libvirtd as root without systemd (security driver and cgroups off, so they
run in a container or a CI machine), defines a TCG domain booting the lab's Debian kernel and
busybox initramfs with its serial console in a file (the same guest report as the other lab
VMs), starts it, and undoes all of it on stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from lab.guest import build_initramfs, find_kernel
from lab.vm import latest_pci_report

QEMU_CONF = """user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
dynamic_ownership = 0
"""


class LibvirtGuest:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.console = workdir / "console.log"
        self._pids: list[int] = []
        self._conf = Path("/etc/libvirt/qemu.conf")
        self._saved = self._conf.with_suffix(".conf.qmpfd-lab")

    # -- libvirtd --------------------------------------------------------------------------
    def _daemons(self) -> None:
        for d in ("/var/log/libvirt", "/var/run/libvirt", "/var/lib/libvirt/qemu",
                  "/var/cache/libvirt"):
            os.makedirs(d, exist_ok=True)
        for group in ("kvm", "libvirt-qemu", "tss"):
            subprocess.run(["groupadd", "-f", "--system", group], check=False)
        for user in ("libvirt-qemu", "tss"):
            subprocess.run(["useradd", "--system", "--no-create-home", "-g", user, user],
                           check=False, stderr=subprocess.DEVNULL)
        if self._conf.exists() and not self._saved.exists():
            self._conf.rename(self._saved)
        self._conf.parent.mkdir(parents=True, exist_ok=True)
        self._conf.write_text(QEMU_CONF)
        log = (self.workdir / "libvirtd.log").open("ab")
        for cmd, sock in ((["virtlogd"], "/var/run/libvirt/virtlogd-sock"),
                          (["libvirtd"], "/var/run/libvirt/libvirt-sock")):
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self._pids.append(proc.pid)
            self._wait(lambda s=sock: os.path.exists(s), 30, f"{cmd[0]} socket")

    def _domain_xml(self) -> str:
        return f"""<domain type='qemu'>
  <name>{self.name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{find_kernel("amd64")}</kernel>
      <initrd>{build_initramfs(arch="amd64")}</initrd><cmdline>console=ttyS0 quiet</cmdline></os>
  <features><acpi/></features>
  <devices>
    <serial type='file'><source path='{self.console}'/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>"""

    def start(self, boot_timeout: float = 180) -> None:
        """libvirtd, then the domain, through virsh (no libvirt-python in the caller's
        process: the test process stays free of libvirt's threads)."""
        self._daemons()
        if self.virsh("domstate", self.name).returncode == 0:
            self.virsh("destroy", self.name)
            self.virsh("undefine", self.name)
        self.console.unlink(missing_ok=True)
        xml = self.workdir / f"{self.name}.xml"
        xml.write_text(self._domain_xml())
        for args in (("define", str(xml)), ("start", self.name)):
            out = self.virsh(*args)
            if out.returncode != 0:
                raise RuntimeError(f"virsh {' '.join(args)}: {out.stderr.strip()}")
        self._wait(lambda: self.guest_pci() is not None, boot_timeout, "guest boot")

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                              text=True, timeout=120)

    def version(self) -> str:
        """libvirt's version, as virsh reports the running daemon's ("9.0.0")."""
        out = self.virsh("version", "--daemon").stdout
        line = next((ln for ln in out.splitlines() if "libvirt" in ln.lower()
                     and "daemon" in ln.lower()), "")
        return line.split()[-1] if line else "unknown"

    def stop(self) -> None:
        if self._pids:
            self.virsh("destroy", self.name)
            self.virsh("undefine", self.name)
        for pid in reversed(self._pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self._pids.clear()
        if self._saved.exists():
            self._saved.rename(self._conf)

    def __enter__(self) -> LibvirtGuest:
        """Started; stopped again if starting fails half-way (libvirtd up, domain not)."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- the guest's report ------------------------------------------------------------------
    def guest_pci(self) -> set[str] | None:
        return latest_pci_report(self.console)

    def wait_guest_pci(self, cond: Any, timeout: float = 60) -> set[str]:
        self._wait(lambda: (s := self.guest_pci()) is not None and cond(s), timeout,
                   "the guest's PCI list")
        seen = self.guest_pci()
        assert seen is not None
        return seen

    @staticmethod
    def _wait(cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{what}: not within {timeout:g} s")
