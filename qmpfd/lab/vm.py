"""Start and watch a lab VM: QEMU with a QMP socket, a serial log and hotplug-ready PCI buses."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qmpfd.lab.guest import LabSetupError, build_initramfs, find_kernel

PCI_LINE = re.compile(r"^PCI-DEVICES: ?(.*)$")


@dataclass
class LabVmSpec:
    """What to start. ``machine``: "pc", "q35" (ACPI hotplug, the QEMU >= 6.1 default) or
    "q35-native" (ACPI hotplug off: native PCIe hotplug on the root ports)."""

    machine: str = "pc"
    root_ports: int = 4
    pci_bridges: int = 0
    switch_downstream_ports: int = 0
    memory_mb: int = 256
    accel: str = "tcg"
    paused: bool = False
    extra: list[str] = field(default_factory=list)


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

    def command(self) -> list[str]:
        s = self.spec
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise LabSetupError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
        machine = "q35" if s.machine.startswith("q35") else "pc"
        cmd = [qemu, "-machine", f"{machine},accel={s.accel}", "-m", str(s.memory_mb),
               "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot",
               "-kernel", str(find_kernel()), "-initrd", str(build_initramfs()),
               "-append", "console=ttyS0 quiet panic=-1",
               "-serial", f"file:{self.serial_log}",
               "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
               "-qmp", f"unix:{self.inspect_socket},server=on,wait=off"]
        if s.machine == "q35-native":
            cmd += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
        if machine == "q35":
            for i in range(s.root_ports):
                cmd += ["-device", f"pcie-root-port,id=rp{i + 1},chassis={i + 1},"
                                   f"bus=pcie.0,addr={i + 0x10:#x}"]
            if s.switch_downstream_ports:
                cmd += ["-device", "pcie-root-port,id=rpsw,chassis=90,bus=pcie.0,addr=0x1e",
                        "-device", "x3130-upstream,id=up1,bus=rpsw"]
                for i in range(s.switch_downstream_ports):
                    cmd += ["-device", f"xio3130-downstream,id=dn{i + 1},bus=up1,"
                                       f"chassis={100 + i},slot={i}"]
        for i in range(s.pci_bridges):
            cmd += ["-device", f"pci-bridge,id=br{i + 1},chassis_nr={i + 1},addr={i + 0x18:#x}"]
        if s.paused:
            cmd.append("-S")
        return cmd + s.extra

    def start(self, boot_timeout: float = 120.0) -> None:
        self.serial_log.unlink(missing_ok=True)
        self.qmp_socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
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

    def guest_pci(self) -> set[str] | None:
        """The guest's latest report of /sys/bus/pci/devices, or None before its first one."""
        try:
            text = self.serial_log.read_text(errors="replace")
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
