"""When the journal syncs, per operation kind and hotplug mechanism (the rule in
qmpfd.state.journal): counted and ordered against the QMP commands, on the real journal and the
scripted QEMU. A sync is only where a crash after the QEMU step could leave what recovery cannot
read back from QEMU."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qmpfd.hotplug.plan import FunctionSpec
from qmpfd.hotplug.slots import SlotTable
from qmpfd.qemu.introspect import VmIdentity
from qmpfd.state import log as log_mod
from tests.unit.harness import IDS, SPECS, Harness
from tests.unit.scripted_qemu import NO_EVENT
from tests.unit.topologies import q35_raw, topo


def timeline(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """'sync' for each fdatasync of the journal, the command name for each QMP command sent,
    in the order they happened."""
    seen: list[str] = []
    real_sync = log_mod.os.fdatasync
    monkeypatch.setattr(log_mod.os, "fdatasync", lambda fd: (seen.append("sync"), real_sync(fd)))
    real_execute = h.qemu.execute

    async def execute(cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        seen.append(cmd)
        return await real_execute(cmd, args, **kw)
    monkeypatch.setattr(h.qemu, "execute", execute)
    return seen


def native(tmp_path: Path) -> Harness:
    n = Harness(tmp_path)
    n.vm.table = SlotTable(topo(q35_raw(native=True)))
    n.vm.identity = VmIdentity("x86_64", "pc-q35-7.2", "7.2.0", (7, 2, 0))
    n.vm._policy_name = "pcie-native"
    return n


async def test_a_one_function_attach_waits_for_no_sync(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path)
    seen = timeline(h, monkeypatch)
    await h.vm.attach([FunctionSpec("one", "virtio-rng-pci", 0)])
    await h.journal.drain()
    assert seen == ["device_add"], "QEMU holds the whole slot or nothing: nothing to sync"
    assert h.journal.ops == {}
    assert '"t":"op+"' in h.journal.path.read_text(), "its record is still written"


async def test_a_multifunction_attach_syncs_its_record_before_the_first_device_add(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path)
    seen = timeline(h, monkeypatch)
    await h.vm.attach(SPECS)
    await h.journal.drain()
    assert seen == ["sync"] + ["device_add"] * len(SPECS)


async def test_an_acpi_detach_syncs_nothing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path)
    await h.vm.attach(SPECS)
    await h.journal.drain()
    seen = timeline(h, monkeypatch)
    await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5)
    await h.journal.drain()
    assert seen == ["device_del"], "a second ACPI device_del never cancels the first"


async def test_a_native_pcie_detach_syncs_before_and_after_its_device_del(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = native(tmp_path)
    await h.vm.attach(SPECS)
    await h.journal.drain()
    seen = timeline(h, monkeypatch)
    h.qemu.script[("device_del", "d0")] = NO_EVENT          # the guest's 5 s window
    reply = await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5,
                              force=True)
    await h.journal.drain()
    assert reply.unplugging
    # begin synced before the button is pressed; "sent" synced after: a restarted qmpfd must
    # not press it again (a second press cancels the first)
    assert seen == ["sync", "device_del", "sync"]
    assert '"t":"op~"' in h.journal.path.read_text().splitlines()[-1]
    h.eject(*IDS)
    await asyncio.sleep(0.05)


async def test_a_journal_that_cannot_be_written_refuses_an_attach_that_would_not_sync(
        tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.journal.path.unlink()
    with pytest.raises(Exception, match="removed while qmpfd ran"):
        await h.vm.attach([FunctionSpec("one", "virtio-rng-pci", 0)])
    assert h.qemu.devices == {}, "nothing was sent to QEMU"
