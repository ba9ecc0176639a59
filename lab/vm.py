"""Start and watch a lab VM: QEMU with a QMP socket, a serial log and hotplug-ready PCI buses."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab import qemu as lab_qemu
from lab.guest import DEBIAN_ARCH, build_initramfs, find_kernel

PCI_LINE = re.compile(r"^PCI-DEVICES: ?(.*)$")


def latest_pci_report(serial_log: Path) -> set[str] | None:
    """The guest init's latest ``PCI-DEVICES:`` line in a serial log (any lab guest, started
    by the lab or by libvirt), or None before its first one."""
    try:
        text = serial_log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    last = None
    for line in text.splitlines():
        # The firmware's escape sequences can share a line with the report: search, not match.
        m = PCI_LINE.match(line[line.index("PCI-DEVICES:"):]) if "PCI-DEVICES:" in line \
            else None
        if m:
            last = set(m.group(1).split())
    return last


@dataclass
class LabVmSpec:
    """What to start.

    ``machine``: "pc", "q35" (ACPI hotplug, the QEMU >= 6.1 default), "q35-native" (ACPI hotplug
    off: native PCIe hotplug on the root ports), "virt" (aarch64) or "pseries" (ppc64).
    """

    machine: str = "pc"
    root_ports: int = 4
    pci_bridges: int = 0
    switch_downstream_ports: int = 0
    bridge_behind_port: bool = False
    extra_phbs: int = 0
    #: q35: an emulated Intel IOMMU (caching-mode, for VFIO inside the guest) and intel_iommu=on
    iommu: bool = False
    #: appended to the guest kernel's command line
    cmdline: str = ""
    memory_mb: int | None = None   # default: 512 for pseries, 256 otherwise
    accel: str = "tcg"
    paused: bool = False
    extra: list[str] = field(default_factory=list)
    #: which QEMU runs it (lab.qemu.resolve): "host", a Debian suite or a version; None:
    #: ``$QMPFD_LAB_QEMU``, else the host's
    qemu: str | None = None
    #: guest kernel (lab.guest.kernel_dir): "host", "bookworm"/"6.1", "trixie"/"6.12"; None:
    #: ``$QMPFD_LAB_KERNEL``, else the host release's
    kernel: str | None = None

    @property
    def arch(self) -> str:
        """QEMU target of the machine."""
        return {"virt": "aarch64", "pseries": "ppc64"}.get(self.machine, "x86_64")


class LabVm:
    def __init__(self, name: str, workdir: Path, spec: LabVmSpec) -> None:
        self.name = name
        self.spec = spec
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket = workdir / f"{name}.qmp"
        #: A second QMP monitor, so tests can inspect QEMU while qmpfd holds the first one.
        self.inspect_socket = workdir / f"{name}.qmp-inspect"
        self.serial_log = workdir / f"{name}.serial"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qemu = lab_qemu.resolve(spec.qemu)

    def _machine_args(self) -> list[str]:
        s = self.spec
        if s.machine == "virt":
            return ["-machine", f"virt,accel={s.accel}", "-cpu",
                    "cortex-a57" if s.accel == "tcg" else "host",
                    "-append", f"console=ttyAMA0 quiet panic=-1 {s.cmdline}".strip(),
                    "-serial", f"file:{self.serial_log}"]
        if s.machine == "pseries":
            # TCG cannot provide these security/transactional-memory capabilities; turning them
            # off keeps QEMU from refusing to start (on KVM hosts they can stay on).
            caps = (",cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off,"
                    "cap-htm=off") if s.accel == "tcg" else ""
            return ["-machine", f"pseries,accel={s.accel}{caps}",
                    "-append", f"console=hvc0 quiet panic=-1 {s.cmdline}".strip(),
                    "-chardev", f"file,id=console,path={self.serial_log}",
                    "-device", "spapr-vty,chardev=console"]
        machine = "q35" if s.machine.startswith("q35") else "pc"
        append = "console=ttyS0 quiet panic=-1" + (" intel_iommu=on" if s.iommu else "")
        args = ["-machine", f"{machine},accel={s.accel}",
                "-append", f"{append} {s.cmdline}".strip(),
                "-serial", f"file:{self.serial_log}"]
        if s.iommu:
            # Before any other PCI device, so every device's DMA goes through it.
            args += ["-device", "intel-iommu,intremap=off,caching-mode=on"]
        if s.machine == "q35-native":
            args += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
        return args

    def _topology_args(self) -> list[str]:
        s = self.spec
        args: list[str] = []
        if s.machine in ("q35", "q35-native", "virt"):
            for i in range(s.root_ports):
                args += ["-device", f"pcie-root-port,id=rp{i + 1},chassis={i + 1},"
                                    f"bus=pcie.0,addr={i + 0x10:#x}"]
            if s.switch_downstream_ports:
                args += ["-device", "pcie-root-port,id=rpsw,chassis=90,bus=pcie.0,addr=0x1e",
                         "-device", "x3130-upstream,id=up1,bus=rpsw"]
                for i in range(s.switch_downstream_ports):
                    args += ["-device", f"xio3130-downstream,id=dn{i + 1},bus=up1,"
                                        f"chassis={100 + i},slot={i}"]
            if s.bridge_behind_port:
                args += ["-device", "pcie-root-port,id=rpbr,chassis=91,bus=pcie.0,addr=0x1d",
                         "-device", "pci-bridge,id=brp1,bus=rpbr,chassis_nr=92,addr=0"]
        for i in range(s.pci_bridges):
            args += ["-device", f"pci-bridge,id=br{i + 1},chassis_nr={i + 1},addr={i + 0x18:#x}"]
        for i in range(s.extra_phbs):
            args += ["-device", f"spapr-pci-host-bridge,index={i + 1},id=phb{i + 1}"]
        return args

    def command(self) -> list[str]:
        s = self.spec
        debian_arch = DEBIAN_ARCH[s.arch]
        memory = s.memory_mb or (512 if s.machine == "pseries" else 256)
        cmd = [*self.qemu.command(s.arch), *self._machine_args(), "-m", str(memory),
               "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot",
               "-kernel", str(find_kernel(debian_arch, choice=s.kernel)),
               "-initrd", str(build_initramfs(arch=debian_arch, kernel=s.kernel)),
               "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
               "-qmp", f"unix:{self.inspect_socket},server=on,wait=off",
               *self._topology_args()]
        if s.paused:
            cmd.append("-S")
        return cmd + s.extra

    def start(self, boot_timeout: float = 120.0) -> None:
        self.serial_log.unlink(missing_ok=True)
        self.qmp_socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, env=self.qemu.env(),
                                     stdout=subprocess.DEVNULL,
                                     stderr=(self.workdir / f"{self.name}.stderr").open("wb"))
        self._wait(lambda: self.qmp_socket.exists(), 30, "QMP socket")
        if not self.spec.paused:
            self._wait(lambda: self.guest_pci() is not None, boot_timeout, "guest boot")

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc is not None and self.proc.poll() is not None:
                err = (self.workdir / f"{self.name}.stderr").read_text()[-2000:]
                raise RuntimeError(f"{self.name}: QEMU exited ({self.proc.returncode}): {err}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no {what} within {timeout:g} s")

    def kernel_messages(self, containing: str = "") -> list[str]:
        """The guest kernel's PCI hotplug messages so far (pciehp, acpiphp), oldest first."""
        try:
            text = self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line[line.index("KMSG: ") + 6:] for line in text.splitlines()
                if "KMSG: " in line and containing in line]

    def guest_pci(self) -> set[str] | None:
        """The guest's latest report of /sys/bus/pci/devices, or None before its first one."""
        return latest_pci_report(self.serial_log)

    def wait_guest_pci(self, cond: Callable[[set[str]], bool], timeout: float = 60.0) -> set[str]:
        """Wait until the guest's PCI list satisfies ``cond``; return it."""
        deadline = time.monotonic() + timeout
        seen: set[str] | None = None
        while time.monotonic() < deadline:
            seen = self.guest_pci()
            if seen is not None and cond(seen):
                return seen
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: guest PCI list never matched; last: {sorted(seen or [])}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LabVm:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def slot_groups(bdfs: set[str]) -> dict[str, set[int]]:
    """'0000:01:00.2' entries grouped as {'0000:01:00': {functions}}."""
    groups: dict[str, set[int]] = {}
    for bdf in bdfs:
        slot, _, fn = bdf.rpartition(".")
        groups.setdefault(slot, set()).add(int(fn))
    return groups
