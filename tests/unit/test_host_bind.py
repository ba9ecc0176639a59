"""Binding host functions to vfio-pci when the bind fails half-way, on a fake sysfs
tree in a temporary directory: the writes land in plain files, and no driver ever takes the
function, exactly what a host without the vfio-pci module shows.

The rule: every function is journaled as held before its first sysfs write, and a failed bind
is undone (driver_override cleared, original driver kept) and unjournaled.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmpfd.config import HostConfig
from qmpfd.errors import HostDeviceUnavailable
from qmpfd.host import vfio
from qmpfd.host.assign import HostAssignment
from qmpfd.host.manager import HostDevices
from qmpfd.state.journal import Journal

ADDRS = ["0000:01:00.0", "0000:01:00.1"]


def fake_sysfs(root: Path) -> Path:
    sysfs = root / "sys"
    drivers = sysfs / "bus/pci/drivers"
    (drivers / "e1000e").mkdir(parents=True)
    (drivers / "e1000e" / "bind").write_text("")
    (drivers / "e1000e" / "unbind").write_text("")
    (sysfs / "bus/pci/drivers_probe").write_text("")
    for a in ADDRS:
        dev = sysfs / "bus/pci/devices" / a
        dev.mkdir(parents=True)
        (dev / "driver_override").write_text("(null)\n")
        os.symlink(drivers / "e1000e", dev / "driver")
    return sysfs


async def test_failed_bind_is_undone_and_nothing_stays_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vfio, "SETTLE_SECONDS", 0.2)
    sysfs = fake_sysfs(tmp_path)
    (tmp_path / "state").mkdir()
    journal = Journal.open(tmp_path / "state")
    held_during: list[dict[str, object]] = []
    real_bind = vfio.bind_vfio

    def bind(sysfs_root: Path, address: str) -> str | None:
        held_during.append(dict(journal.host))    # what the journal said before the writes
        return real_bind(sysfs_root, address)

    monkeypatch.setattr(vfio, "bind_vfio", bind)
    host = HostDevices(HostConfig(sysfs=sysfs), journal)
    plan = HostAssignment(guest={"a": 0, "b": 1}, address={"a": ADDRS[0], "b": ADDRS[1]},
                          bind=tuple((a, "e1000e") for a in ADDRS))
    with pytest.raises(HostDeviceUnavailable, match="vfio-pci did not take it"):
        await host.acquire(plan, "vm1", ["a", "b"])
    # Journaled before the first write to it:
    assert ADDRS[0] in held_during[0]
    assert held_during[0][ADDRS[0]]["original"] == "e1000e"  # type: ignore[index]
    # Undone: override cleared, still on its driver, nothing held (in memory or on disk).
    dev = sysfs / "bus/pci/devices" / ADDRS[0]
    assert (dev / "driver_override").read_text() == "\n"
    assert vfio.current_driver(sysfs, ADDRS[0]) == "e1000e"
    assert journal.host == {}
    await journal.drain()
    journal.close()
    assert Journal.open(tmp_path / "state").host == {}
    # The second function was never touched: the first failure stopped the bind.
    assert (sysfs / "bus/pci/devices" / ADDRS[1] / "driver_override").read_text() == "(null)\n"
