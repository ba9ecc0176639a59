"""The small modules around the core: tenants' checks, the host inventory and its deny rules,
why a host function is in use, sd_notify, fault points, the ``python -m`` entry points."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import runpy
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from qmpfd import faults, systemd
from qmpfd.access.peer import Peer
from qmpfd.access.policy import AccessPolicy, Scope
from qmpfd.api import tenancy
from qmpfd.config import AccessConfig, HostConfig
from qmpfd.errors import NotFound
from qmpfd.host.inventory import deny_rules, describe
from qmpfd.host.pciids import PciIds
from qmpfd.host.sysfs import HostPci, read_host
from qmpfd.host.usage import in_use_reasons
from tests.unit.capture_sysfs import rebuild

SCOPE = Scope("access.tenants[0] (group t: a-*)", ("a-*",), (Path("/srv/tenant-a"),))


class Vms:
    """What tenancy asks of the registry: a name or UUID to the VM's name."""

    def get(self, key: str) -> Any:
        if key == "uuid-of-a-1":
            return type("Vm", (), {"name": "a-1"})()
        if key.startswith(("a-", "b-")):
            return type("Vm", (), {"name": key})()
        raise NotFound(f"vm: no VM '{key}'")


R = tenancy.Reach


@pytest.mark.parametrize(("command", "reach", "args", "refused"), [
    ("vm-qmp", R.ADMIN, {"vm": "a-1"}, "vm-qmp (for full-access peers only)"),
    ("query-host-devices", R.ADMIN, {}, "query-host-devices (for full-access peers only)"),
    ("device-attach", R.VM, {"vm": "a-1", "functions": [{"id": "h", "host": "0000:01:00.0"}]},
     "assigning host functions"),
    ("device-attach", R.VM, {"vm": "b-1", "functions": []}, "VM 'b-1'"),
    ("query-slots", R.VM, {}, "query-slots without a VM of its own"),
    ("vm-add", R.VM, {"name": "b-2"}, "VM 'b-2'"),
    ("vm-add", R.VM, {"name": "a-2", "libvirt": "dom"}, "adopting a libvirt domain"),
    ("vm-add", R.VM, {"name": "a-2", "qmp": "/run/qemu/a-2.qmp"}, "adopting /run/qemu/a-2.qmp"),
    ("vm-remove", R.VM, {"name": "b-1"}, "VM 'b-1'"),
])
def test_tenant_refusals_name_the_rule(command: str, reach: tenancy.Reach,
                                       args: dict[str, Any], refused: str) -> None:
    with pytest.raises(tenancy.AccessDenied,
                       match=re.escape(refused) + r".* is outside access\.tenants\[0\]"):
        tenancy.check(SCOPE, reach, command, args, Vms())  # type: ignore[arg-type]


@pytest.mark.parametrize(("command", "reach", "args"), [
    ("device-attach", R.VM, {"vm": "a-1", "functions": [{"id": "x", "driver": "e1000"}]}),
    ("vm-add", R.VM, {"name": "a-new", "qmp": "/srv/tenant-a/a-new.qmp"}),
    ("query-slots", R.VM, {"vm": "uuid-of-a-1"}),       # a UUID counts as the VM it names
    ("query-slots", R.VM, {"vm": "a-unknown"}),
    ("query-vms", R.READ, {}),
])
def test_tenant_may_use_its_vms(command: str, reach: tenancy.Reach,
                                args: dict[str, Any]) -> None:
    tenancy.check(SCOPE, reach, command, args, Vms())  # type: ignore[arg-type]


def test_errors_a_tenant_gets_do_not_name_other_tenants_vms() -> None:
    from qmpfd.errors import Conflict

    exc = tenancy.redact(SCOPE, Conflict("qmp: /x is already managed as VM 'b-1'"))
    assert exc.desc == "qmp: /x is already managed as another VM"
    assert tenancy.redact(SCOPE, Conflict("VM 'a-1' is busy")).desc == "VM 'a-1' is busy"


def test_tenant_listings_show_only_theirs() -> None:
    vms = [{"name": "a-1"}, {"name": "b-1"}]
    assert tenancy.visible(SCOPE, "query-vms", vms) == [{"name": "a-1"}]
    ops = [{"vm": "a-1"}, {"vm": "b-1"}]
    assert tenancy.visible(SCOPE, "query-operations", ops) == [{"vm": "a-1"}]
    assert tenancy.visible(SCOPE, "query-pending", ops) == [{"vm": "a-1"}]
    events = {"complete": True, "events": [{"data": {"vm": "a-1"}}, {"data": {"vm": "b-1"}},
                                           {"data": {}}]}
    assert tenancy.visible(SCOPE, "query-events", events) == {
        "complete": True, "events": [{"data": {"vm": "a-1"}}]}
    assert tenancy.visible(SCOPE, "query-version", {"x": 1}) == {"x": 1}
    health = {"status": "degraded", "problems": ["VM a-1: link down", "VM b-1: link down",
                                                 "journal: x"],
              "vms": [{"name": "a-1", "link": "down"}, {"name": "b-1", "link": "down"}]}
    assert tenancy.visible(SCOPE, "query-health", health) == {
        "status": "degraded", "problems": ["VM a-1: link down", "journal: x"],
        "vms": [{"name": "a-1", "link": "down"}]}


def test_policy_from_config_tenants_and_unknown_names(tmp_path: Path) -> None:
    gid = os.getgid()
    cfg = AccessConfig.model_validate({
        "users": ["no-such-user-qmpfd", 4242], "groups": ["no-such-group-qmpfd"],
        "qmp-dirs": [str(tmp_path)], "tenants": [{"group": 777, "vms": ["a-*"]},
                                                 {"group": "no-such-group-qmpfd", "vms": ["x"]}]})
    p = AccessPolicy.from_config(cfg)
    assert 4242 in p.uids and os.getuid() in p.uids and not p.gids
    assert [s.rule for _, s in p.tenants] == ["access.tenants[0] (group 777: a-*)"]
    tenant = Peer(1, 5555, 777)
    assert p.admit(tenant) is None
    scope = p.scope(tenant)
    assert scope is not None and scope.allows("a-1") and not scope.allows("b-1")
    assert not scope.allows(None)
    assert p.scope(Peer(1, os.getuid(), gid)) is None          # full access
    assert p.admit(Peer(1, 5555, 5555)) is not None


@pytest.fixture
def host(tmp_path: Path) -> HostPci:
    sysfs, proc = rebuild("q35-iommu-4fn", tmp_path)
    return read_host(sysfs, proc)


def test_inventory_describes_functions_with_names_holders_and_denials(host: HostPci) -> None:
    cfg = HostConfig.model_validate({"deny": [
        {"reason": "not these NICs", "vendor-device": "8086:10d3"},
        {"reason": "no bridges", "class": "0x0604"}]})
    rules = deny_rules(cfg)
    assert rules[0].vendor_device == (0x8086, 0x10D3) and rules[1].class_prefix == "0x0604"
    ids = PciIds.parse("8086  Intel Corporation\n\t10d3  82574L Gigabit Network Connection\n"
                       "C 02  Network controller\n\t00  Ethernet controller\n")
    slots = describe(host, ids, {"0000:01:00.1": "vm1"}, True, rules)
    (nic,) = [s for s in slots if s["slot"] == "0000:01:00"]
    fn1 = nic["functions"][1]
    assert fn1["held-by"] == "vm1" and fn1["vendor-name"] == "Intel Corporation"
    assert fn1["class-name"] == "Ethernet controller" and fn1["in-use"] == []
    assert len(fn1["group-members"]) == 4
    assert {f["denied"] for f in nic["functions"]} == {"not these NICs"}
    assert [s["slot"] for s in slots] == ["0000:00:1f", "0000:01:00"]   # multifunction only
    everything = {s["slot"]: s for s in describe(host, PciIds(), {}, False, rules)}
    assert everything["0000:00:10"]["functions"][0]["denied"] == "no bridges"
    assert everything["0000:02:00"]["functions"][0]["vendor-name"] is None


def test_in_use_reasons(host: HostPci) -> None:
    fn = next(iter(host.functions.values()))
    busy = dataclasses.replace(fn, net=(("eth0", "up"), ("eth1", "down")), block=("sda",),
                               boot_vga=True)
    mounted = dataclasses.replace(host, mounted_devices=frozenset({"sda"}))
    assert in_use_reasons(busy, mounted) == [
        "network interface eth0 is up", "block device sda is mounted",
        "it is the boot VGA device (the host console)"]
    assert in_use_reasons(fn, host) == []


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("READY=1")
        assert sock.recv(64) == b"READY=1"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"qmpfd-test-{os.getpid()}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)   # abstract namespace
        assert systemd.notify("STOPPING=1")
        assert sock.recv(64) == b"STOPPING=1"


def _read_fault_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """The points read from the environment as the test set it; put back after the test (a
    point left armed would kill the test run at the next attach)."""
    monkeypatch.setattr(faults, "_crash_at", faults._crash_at)
    monkeypatch.setattr(faults, "_pause_at", faults._pause_at)
    faults.read_environment()


async def test_fault_points(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setenv("QMPFD_CRASH_AT", "attach-begin")
    monkeypatch.setenv("QMPFD_PAUSE_AT", "detach-sent")
    monkeypatch.setenv("QMPFD_PAUSE_SECONDS", "0")
    _read_fault_points(monkeypatch)
    await faults.fault_point("attach-begin")
    await faults.fault_point("detach-sent")
    await faults.fault_point("elsewhere")
    assert killed == [(os.getpid(), signal.SIGKILL)]


async def test_a_marked_pause_ends_when_the_test_removes_the_mark(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mark = tmp_path / "paused"
    monkeypatch.setenv("QMPFD_PAUSE_AT", "detach-sent")
    monkeypatch.setenv("QMPFD_PAUSE_SECONDS", "60")
    monkeypatch.setenv("QMPFD_PAUSE_MARK", str(mark))
    _read_fault_points(monkeypatch)
    paused = asyncio.create_task(faults.fault_point("detach-sent"))
    for _ in range(500):
        if mark.exists():
            break
        await asyncio.sleep(0.01)
    assert mark.exists() and not paused.done()
    mark.unlink()
    await asyncio.wait_for(paused, 5)


@pytest.mark.parametrize("module", ["qmpfd", "qmpfd.cli"])
def test_python_m_entry_points(module: str, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.argv", [module, "--version"])
    with pytest.raises(SystemExit) as ended:
        runpy.run_module(module, run_name="__main__")
    assert ended.value.code in (0, None)
    assert capsys.readouterr().out.startswith("qmpf")   # qmpfd or qmpfctl, and its version


def test_a_state_dir_that_cannot_be_used(tmp_path: Path) -> None:
    from qmpfd.state.lock import StateDirBusy, lock_state_dir, prepare_state_dir

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateDirBusy, match="is not usable"):
        prepare_state_dir(blocker / "state")              # below a plain file
    with pytest.raises(StateDirBusy, match="cannot open"):
        lock_state_dir(tmp_path / "missing")


def test_vfio_moves_on_a_sysfs_that_refuses_or_has_no_bind(tmp_path: Path) -> None:
    from qmpfd.errors import HostDeviceUnavailable
    from qmpfd.host import vfio
    from tests.unit.fake_kernel import FakeKernel

    with FakeKernel(tmp_path / "sys", ["0000:01:00.0", "0000:01:00.1"], driver="vfio-pci") as k:
        assert vfio.bind_vfio(k.sysfs, "0000:01:00.0") == "vfio-pci"     # nothing to do
        with pytest.raises(HostDeviceUnavailable, match="cannot bind to vfio-pci"):
            vfio.bind_vfio(k.sysfs, "0000:09:00.0")                      # no such device
        # Its original driver has no bind file any more: probed instead.
        vfio.restore_driver(k.sysfs, "0000:01:00.1", "e1000e-gone")
        with pytest.raises(HostDeviceUnavailable, match="cannot give it back"):
            vfio.restore_driver(k.sysfs, "0000:09:00.0", "e1000e")


def test_removal_and_detach_replies_say_what_was_set() -> None:
    from qmpfd.api import replies
    from qmpfd.vm.removal import InFlight, Settled
    from qmpfd.vm.results import DetachResult, RemoveResult

    flight = InFlight("op-1", "detach", "pci.0", 5, ("a", "b"))
    removed = replies.vm_removed(RemoveResult(host_held=["0000:01:00.0"], settled=[
        Settled(flight, "still-running", ("a",))]))
    assert removed == {"host-held": ["0000:01:00.0"], "settled": [
        {"operation": "op-1", "kind": "detach", "bus": "pci.0", "slot": 5, "ids": ["a", "b"],
         "outcome": "still-running", "in-qemu": ["a"]}]}
    assert replies.vm_removed(RemoveResult()) == {}
    detached = DetachResult("v", "pci.0", 5, ["a"], 1.5)
    detached.unplugging, detached.waited = True, 0.7
    assert replies.detached(detached) == {"vm": "v", "bus": "pci.0", "slot": 5, "ids": ["a"],
                                          "seconds": 1.5, "unplugging": True,
                                          "waited-for-guest": 0.7}


def test_the_greeting_and_query_version_give_the_real_version() -> None:
    from qmpfd import __version__
    from qmpfd.api import wire

    major, minor, micro = (int(p) for p in __version__.split("."))
    assert wire.version() == {"qemu": {"major": major, "minor": minor, "micro": micro},
                              "package": f"qmpfd {__version__}"}
    assert wire.greeting()["QMP"]["version"] == wire.version()


def test_a_tenant_rule_does_not_change_the_global_qmp_dirs(tmp_path: Path) -> None:
    cfg = AccessConfig.model_validate({
        "qmp-dirs": [str(tmp_path / "all")],
        "tenants": [{"group": 777, "vms": ["a-*"], "qmp-dirs": [str(tmp_path / "a")]}]})
    p = AccessPolicy.from_config(cfg)
    assert p.qmp_dirs == ((tmp_path / "all").resolve(),)
    assert p.tenants[0][1].qmp_dirs == ((tmp_path / "a").resolve(),)
