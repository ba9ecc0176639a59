"""Fault rows for the journal and the state directory, each against a real `pc`
guest with QEMU's own view (second monitor) as referee: a full disk before and in the middle of
an operation, a read-only state directory, an unwritable audit log, torn, garbage, non-UTF-8 and
wrong-shaped journals, and two daemons on one state directory or socket.

Rules proven: a failed write changes nothing and names the state file and the cause; a change
QEMU already made is never reported as failed; a damaged journal stops qmpfd with the file and
line unless it is told to set it aside; a second daemon never takes over a running one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec
from qmpfd.state.records import decode
from tests.integration.conftest import Client, connect, qemu_view, start_lab_vm
from tests.integration.fault_checks import (
    FUNCS,
    IDS,
    DaemonProcess,
    agreement,
    observed,
    record,
    settled,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "state-pc", LabVmSpec(machine="pc"))
    yield vm
    vm.stop()


class SmallDisk:
    """The state directory on a 1 MiB tmpfs that the test can fill and empty again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)],
                       check=True)
        self.filler = path / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(daemon_proc: DaemonProcess) -> Iterator[SmallDisk]:
    d = SmallDisk(daemon_proc.workdir / "state")
    yield d
    daemon_proc.stop()
    d.unmount()


def pad_to_page(journal: Path) -> None:
    """With qmpfd stopped: append a harmless valid record (the end of an operation nobody has)
    so the file ends on a page boundary. tmpfs then has no slack left in the file's last page,
    and the next append needs a page a full disk cannot give."""
    size = journal.stat().st_size
    need = (-size) % 4096
    frame = len(crc_line(b'{"id":"","t":"op-"}'))
    if need < frame + 1:
        need += 4096
    journal.write_bytes(journal.read_bytes()
                        + crc_line(b'{"id":"' + b"p" * (need - frame) + b'","t":"op-"}'))
    assert journal.stat().st_size % 4096 == 0


async def adopt(d: DaemonProcess, lab: LabVm) -> Client:
    c = await connect(d.socket)
    await c.execute("vm-add", {"name": "f", "qmp": str(lab.qmp_socket)})
    return c


async def refused(c: Client, cmd: str, args: dict[str, object]) -> str:
    with pytest.raises(ExecuteError) as err:
        await c.execute(cmd, args)
    return str(err.value)


async def test_full_state_dir_fails_requests_and_changes_nothing(
        daemon_proc: DaemonProcess, disk: SmallDisk, lab: LabVm) -> None:
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    daemon_proc.start()
    c = await adopt(daemon_proc, lab)
    await c.qmp.disconnect()
    daemon_proc.stop()
    pad_to_page(disk.path / "journal.log")
    daemon_proc.start()
    c = await connect(daemon_proc.socket)
    disk.fill()
    journal = str(disk.path / "journal.log")
    for cmd, args in [
        ("device-attach", {"vm": "f", "functions": FUNCS}),
        ("function-add", {"vm": "f", "id": "q1", "driver": "e1000", "bus": "pci.0",
                          "slot": 9, "function": 1}),
        ("vm-remove", {"name": "f"}),
    ]:
        desc = await refused(c, cmd, args)
        assert journal in desc and "No space left on device" in desc, desc
    assert await c.execute("query-pending") == []
    assert [v["name"] for v in await c.execute("query-vms")] == ["f"]
    view = await agreement(c, lab, before)
    # Nothing the client was told had failed is replayed by a restarted daemon.
    daemon_proc.stop()
    disk.free()
    daemon_proc.start()
    c = await connect(daemon_proc.socket)
    assert await c.execute("query-operations") == []
    await agreement(c, lab, before)
    record("state dir full (tmpfs)", "request fails naming journal; nothing changed", view)
    # And with space again, the same request works.
    await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
    await agreement(c, lab, before, expect_attached=True)
    await c.execute("device-detach", {"vm": "f", "ids": sorted(IDS)})
    await agreement(c, lab, before)


async def test_journal_write_failing_mid_attach_still_reports_success(
        daemon_proc: DaemonProcess, lab: LabVm) -> None:
    """The begin record is on disk, then every write fails (a file-size limit set on the
    running daemon with prlimit: EFBIG, the same path as a full disk) before the end record."""
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    daemon_proc.start(QMPFD_PAUSE_AT="attach-step-2", QMPFD_PAUSE_SECONDS="3")
    c = await adopt(daemon_proc, lab)
    attach = asyncio.create_task(c.execute("device-attach", {"vm": "f", "functions": FUNCS}))
    await daemon_proc.at_pause()   # the begin record is on disk; QEMU has functions 1-3
    assert daemon_proc.proc is not None
    journal = daemon_proc.workdir / "state" / "journal.log"
    await asyncio.to_thread(subprocess.run, ["prlimit", "--pid", str(daemon_proc.proc.pid),
                            f"--fsize={journal.stat().st_size}"], check=True)
    result = await attach          # QEMU did it: success, though the end record cannot land
    assert sorted(f["id"] for f in result["functions"]) == sorted(IDS)
    await agreement(c, lab, before, expect_attached=True)
    assert await c.execute("query-operations") == []
    for _ in range(300):           # the end record was tried, and failed
        if "journal: last write failed" in str((await c.execute("query-health"))["problems"]):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the end record's failed write was never reported")
    # The limit is the journal's size at the pause: the end record never landed (the limit
    # also stops the daemon's own log file, so the journal itself is the witness).
    assert b'"t":"op+"' in journal.read_bytes().splitlines()[-1]
    # Crash while the end record is still unwritten; the restarted daemon (no limit) finds
    # every function in QEMU and keeps the slot.
    daemon_proc.proc.kill()
    daemon_proc.wait_killed()
    daemon_proc.start()
    c = await connect(daemon_proc.socket)
    await settled(c)
    view = await agreement(c, lab, before, expect_attached=True)
    record("journal write fails mid-attach, then SIGKILL", "success reported; slot kept", view)
    await c.execute("device-detach", {"vm": "f", "ids": sorted(IDS)})
    await agreement(c, lab, before)


async def test_read_only_state_dir_refuses_to_start(daemon_proc: DaemonProcess,
                                                    lab: LabVm) -> None:
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    state = daemon_proc.workdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(state)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        out = await asyncio.to_thread(daemon_proc.run_once)
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(state)], check=False)
    assert out.returncode != 0
    assert str(state) in out.stderr and "Read-only file system" in out.stderr, out.stderr
    assert not daemon_proc.socket.exists()
    peripheral, _ = await qemu_view(lab)
    assert not IDS & peripheral
    record("state dir read-only at start", "refuses to start, names dir", (
        "none", "unchanged" if lab.guest_pci() == before else "CHANGED", "not running"))


async def test_unwritable_audit_log_never_fails_a_request(tmp_path: Path, lab: LabVm) -> None:
    audit = tmp_path / "audit-is-a-directory"
    audit.mkdir()
    d = DaemonProcess(tmp_path / "qmpfd", access_config=f'qmp-dirs = ["/tmp"]\n'
                                                        f'audit-log = "{audit}"')
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    d.start()
    try:
        c = await adopt(d, lab)
        await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
        view = await agreement(c, lab, before, expect_attached=True)
        assert d.logged("audit log not written")
        await c.execute("device-detach", {"vm": "f", "ids": sorted(IDS)})
        await agreement(c, lab, before)
    finally:
        d.stop()
    record("audit log unwritable", "request succeeds; error logged", view)


def crc_line(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


async def test_torn_last_record_is_dropped(daemon_proc: DaemonProcess, lab: LabVm) -> None:
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    daemon_proc.start()
    c = await adopt(daemon_proc, lab)
    await c.execute("device-attach", {"vm": "f", "functions": FUNCS})
    assert daemon_proc.proc is not None
    daemon_proc.proc.kill()
    daemon_proc.wait_killed()
    journal = daemon_proc.workdir / "state" / "journal.log"
    good = journal.read_bytes()
    journal.write_bytes(good + good.splitlines(keepends=True)[-1][:20])
    daemon_proc.start()
    c = await connect(daemon_proc.socket)
    view = await agreement(c, lab, before, expect_attached=True)
    await settled(c)
    # The torn bytes are gone and everything before them kept; what follows (recovery may
    # append the attach's end) is whole records only.
    now = journal.read_bytes()
    assert now.startswith(good), now[:200]
    for line in now[len(good):].splitlines():
        decode(line)
    record("torn last journal record", "dropped; the rest kept", view)
    await c.execute("device-detach", {"vm": "f", "ids": sorted(IDS)})
    await agreement(c, lab, before)


@pytest.mark.parametrize("name, content, cause", [
    ("garbage journal", b"this is not a journal\n", "line 2: no checksum"),
    ("non-UTF-8 journal", crc_line(b'{"t":"vm+","name":"\xff","qmp":"/x"}'), "not UTF-8"),
    ("journal of the wrong shape", crc_line(b'{"t":"vm+","name":["web1"],"qmp":"/x"}'),
     "vm+.name"),
])
async def test_damaged_journal_stops_qmpfd_unless_set_aside(
        daemon_proc: DaemonProcess, lab: LabVm, name: str, content: bytes, cause: str) -> None:
    before = await asyncio.to_thread(lab.wait_guest_pci, lambda s: True, 5)
    daemon_proc.start()
    c = await adopt(daemon_proc, lab)
    await c.qmp.disconnect()
    daemon_proc.stop()
    journal = daemon_proc.workdir / "state" / "journal.log"
    journal.write_bytes(journal.read_bytes() + content + journal.read_bytes())
    out = await asyncio.to_thread(daemon_proc.run_once)
    assert out.returncode != 0 and str(journal) in out.stderr and cause in out.stderr, out.stderr
    assert "--set-aside-damaged-journal" in out.stderr
    assert "Traceback" not in out.stderr
    daemon_proc.start("--set-aside-damaged-journal")
    c = await connect(daemon_proc.socket)
    assert await c.execute("query-vms") == []
    assert list(journal.parent.glob("journal.log.damaged-*"))
    peripheral, _ = await qemu_view(lab)
    assert not IDS & peripheral and lab.guest_pci() == before
    qemu, guest, _ = await observed(c, lab, before, IDS)   # qmpfd no longer knows VM 'f'
    vms = await c.execute("query-vms")
    record(name, "refuses to start (file, line); set aside on request",
           (qemu, guest, "started empty when asked" if not vms else f"{len(vms)} VMs"))


async def test_second_daemon_never_takes_over(daemon_proc: DaemonProcess, tmp_path: Path,
                                              lab: LabVm) -> None:
    daemon_proc.start()
    c = await adopt(daemon_proc, lab)
    # Same state directory (and socket): refused, naming the running daemon's pid.
    out = await asyncio.to_thread(daemon_proc.run_once)
    assert out.returncode != 0 and "in use by another qmpfd" in out.stderr, out.stderr
    assert daemon_proc.proc is not None and str(daemon_proc.proc.pid) in out.stderr
    # Same socket, another state directory: the live socket is left alone.
    other = DaemonProcess(tmp_path / "other")
    other.config.write_text(other.config.read_text().replace(
        f'socket = "{other.socket}"', f'socket = "{daemon_proc.socket}"'))
    out = await asyncio.to_thread(other.run_once)
    assert out.returncode != 0 and "served by another process" in out.stderr, out.stderr
    assert [v["name"] for v in await c.execute("query-vms")] == ["f"], "first daemon unharmed"
    assert os.path.exists(daemon_proc.socket)
    before = lab.guest_pci() or set()
    qemu, guest, slots = await observed(c, lab, before, IDS)
    record("two daemons on one state dir / socket", "second exits; first unharmed",
           (qemu, guest, f"first daemon serving; {slots}"))
