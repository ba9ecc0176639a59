"""A sysfs PCI tree in a temporary directory with a thread that does what the kernel does with
the writes qmpfd makes to it: ``driver_override`` + ``drivers_probe`` moves a function to the
overriding driver (or its usual one), ``drivers/X/bind`` binds to X, ``drivers/X/unbind``
unbinds from X. Drivers are the ``driver`` symlinks, as in sysfs.

The files written to are FIFOs the thread holds open, so no write is lost or reordered however
fast qmpfd writes; each write is one PCI address (12 characters, no newline), as in sysfs.
"""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

DRIVERS = ("e1000e", "vfio-pci")
ADDRESS_LENGTH = len("0000:01:00.0")


class FakeKernel:
    def __init__(self, sysfs: Path, addresses: list[str], driver: str | None = "e1000e") -> None:
        """``sysfs``: an empty directory or a rebuilt capture; ``addresses`` get ``driver``."""
        self.sysfs = sysfs
        self.usual = driver or "e1000e"
        self._drivers = sysfs / "bus/pci/drivers"
        #: FIFO fd -> (what a write to it does, the driver it concerns), and unread input
        self._fifos: dict[int, tuple[str, str | None]] = {}
        self._input: dict[int, str] = {}
        #: FIFOs are read in no particular order between them: a bind read before the unbind
        #: written just ahead of it (a give-back) waits for that unbind
        self._bind_after_unbind: dict[str, str] = {}
        for name in DRIVERS:
            (self._drivers / name).mkdir(parents=True, exist_ok=True)
            self._fifo(self._drivers / name / "bind", "bind", name)
            self._fifo(self._drivers / name / "unbind", "unbind", name)
        self._fifo(sysfs / "bus/pci/drivers_probe", "probe", None)
        for a in addresses:
            dev = sysfs / "bus/pci/devices" / a
            dev.mkdir(parents=True, exist_ok=True)
            (dev / "driver_override").write_text("(null)\n")
            if driver is not None:
                os.symlink(self._drivers / driver, dev / "driver")
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _fifo(self, path: Path, action: str, driver: str | None) -> None:
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)   # a reader always: writers never block
        self._fifos[fd] = (action, driver)
        self._input[fd] = ""

    def __enter__(self) -> FakeKernel:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in [*self._fifos, self._stop_r, self._stop_w]:
            os.close(fd)

    def driver(self, address: str) -> str | None:
        link = self.sysfs / "bus/pci/devices" / address / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def _link(self, address: str, driver: str | None) -> None:
        link = self.sysfs / "bus/pci/devices" / address / "driver"
        if link.is_symlink():
            link.unlink()
        if driver is not None:
            os.symlink(self._drivers / driver, link)

    def _handle(self, action: str, driver: str | None, address: str) -> None:
        if action == "unbind" and self.driver(address) == driver:
            self._link(address, None)
            if address in self._bind_after_unbind:     # the bind read first, written after
                self._link(address, self._bind_after_unbind.pop(address))
        elif action == "bind":
            if self.driver(address) is None:
                self._link(address, driver)
            else:
                self._bind_after_unbind[address] = str(driver)
        elif action == "probe" and self.driver(address) is None:
            override = (self.sysfs / "bus/pci/devices" / address /
                        "driver_override").read_text().strip()
            self._link(address, override if override in DRIVERS else self.usual)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([*self._fifos, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            for fd in ready:
                self._input[fd] += os.read(fd, 4096).decode()
                while len(self._input[fd]) >= ADDRESS_LENGTH:
                    address = self._input[fd][:ADDRESS_LENGTH]
                    self._input[fd] = self._input[fd][ADDRESS_LENGTH:]
                    self._handle(*self._fifos[fd], address)
