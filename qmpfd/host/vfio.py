"""Moving host PCI functions between their drivers and vfio-pci, through sysfs.

Bind: write ``vfio-pci`` to ``driver_override``, unbind from the current driver, ``drivers_probe``.
Restore: clear ``driver_override``, unbind from vfio-pci, bind to the original driver (or probe).
Blocking file writes: callers run these in a thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from qmpfd.errors import HostDeviceUnavailable

SETTLE_SECONDS = 5.0


def _write(path: Path, value: str) -> None:
    with path.open("w") as f:
        f.write(value)


def current_driver(sysfs: Path, address: str) -> str | None:
    try:
        return os.path.basename(os.readlink(sysfs / "bus/pci/devices" / address / "driver"))
    except OSError:
        return None


def _wait_driver(sysfs: Path, address: str, want: str | None) -> bool:
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        if current_driver(sysfs, address) == want:
            return True
        time.sleep(0.05)
    return current_driver(sysfs, address) == want


def bind_vfio(sysfs: Path, address: str) -> str | None:
    """Give ``address`` to vfio-pci; returns the driver it had."""
    dev = sysfs / "bus/pci/devices" / address
    original = current_driver(sysfs, address)
    if original == "vfio-pci":
        return original
    try:
        _write(dev / "driver_override", "vfio-pci")
        if original is not None:
            _write(dev / "driver" / "unbind", address)
        _write(sysfs / "bus/pci/drivers_probe", address)
    except OSError as exc:
        raise HostDeviceUnavailable(f"{address}: cannot bind to vfio-pci: {exc}") from exc
    if not _wait_driver(sysfs, address, "vfio-pci"):
        raise HostDeviceUnavailable(f"{address}: vfio-pci did not take it (is the vfio-pci "
                                    "module loaded?)")
    return original


def restore_driver(sysfs: Path, address: str, original: str | None) -> None:
    """Give ``address`` back to ``original`` (or leave it without a driver if it had none).
    Also undoes a bind that failed half-way: override set, unbound, no driver."""
    dev = sysfs / "bus/pci/devices" / address
    try:
        _write(dev / "driver_override", "\n")
        now = current_driver(sysfs, address)
        if now is not None and now == original:
            return                                  # the bind never got as far as unbind
        if now is not None:
            _write(dev / "driver" / "unbind", address)
        if original is not None:
            try:
                _write(sysfs / "bus/pci/drivers" / original / "bind", address)
            except OSError:
                _write(sysfs / "bus/pci/drivers_probe", address)
    except OSError as exc:
        raise HostDeviceUnavailable(f"{address}: cannot give it back to {original}: {exc}") \
            from exc
