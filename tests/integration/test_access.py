"""Access control on a real daemon: peer credentials, socket permissions, allowed QMP directories,
raw QMP passthrough, and the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import connect, start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration

NOBODY = 65534
# The client runs as another user, so it must be a Python that user can execute: the system one.
SYSTEM_PYTHON = "/usr/bin/python3"
PROBE = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect-error": e.strerror})); sys.exit()
f = s.makefile("rb")
first = json.loads(f.readline())
try:
    s.sendall(b'{"execute":"qmp_capabilities"}\\n')
    then = f.readline().decode()
except OSError:
    then = ""
print(json.dumps({"first": first, "then": then}))
"""


def as_nobody(sock: Path) -> dict[str, object]:
    assert Path(SYSTEM_PYTHON).exists(), "apt-get install python3 (scripts/setup does)"
    out = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, str(sock)], user=NOBODY, group=NOBODY,
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.fixture(scope="module")
def paused_vm(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "access-vm", LabVmSpec(machine="pc", paused=True))
    yield vm
    vm.stop()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path lies under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="qmpfd-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_other_uid_is_refused_by_peer_credentials(open_dir: Path) -> None:
    # A world-writable socket, so only the SO_PEERCRED check stands between nobody and qmpfd.
    d = DaemonProcess(open_dir / "d", daemon_config='socket-mode = "0666"')
    (open_dir / "d").chmod(0o755)
    d.start()
    try:
        result = as_nobody(d.socket)
        first = result["first"]
        assert isinstance(first, dict) and "access denied: uid 65534" in first["error"]["desc"]
        assert result["then"] == "", "the connection must be closed after the refusal"
        assert d.logged("client refused")
        # A flood of refused connections is one log line a minute, with a count, not 300.
        flood = FLOOD.replace("SOCK", str(d.socket))
        out = subprocess.run([SYSTEM_PYTHON, "-c", flood], user=NOBODY, group=NOBODY,
                             capture_output=True, text=True, timeout=120, cwd="/")
        assert out.stdout.strip() == "300", out.stderr
        refusals = [ln for ln in d.log().splitlines() if "client refused" in ln]
        assert len(refusals) == 1, refusals
        # The daemon still answers its own user.
        ok = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, str(d.socket)], capture_output=True,
                            text=True, timeout=30)
        assert '"QMP"' in ok.stdout
    finally:
        d.stop()


FLOOD = """
import socket
n = 0
for _ in range(300):
    s = socket.socket(socket.AF_UNIX)
    s.connect("SOCK")
    if b"access denied" in s.makefile("rb").readline():
        n += 1
    s.close()
print(n)
"""


def test_socket_is_0660_so_others_cannot_even_connect(open_dir: Path) -> None:
    d = DaemonProcess(open_dir / "d")
    (open_dir / "d").chmod(0o755)
    d.start()
    try:
        assert d.socket.stat().st_mode & 0o777 == 0o660
        assert as_nobody(d.socket) == {"connect-error": "Permission denied"}
    finally:
        d.stop()


async def test_vm_add_outside_allowed_dirs_is_refused(tmp_path: Path, paused_vm: LabVm) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    d = DaemonProcess(tmp_path / "d", access_config=f'qmp-dirs = ["{allowed}"]')
    d.start()
    try:
        c = await connect(d.socket)
        with pytest.raises(ExecuteError) as err:
            await c.execute("vm-add", {"name": "x", "qmp": str(paused_vm.qmp_socket)})
        assert err.value.error_class == "InvalidRequest" and "qmp:" in str(err.value)
        # A symlink inside the allowed directory that points outside is still outside.
        link = allowed / "sneaky.qmp"
        link.symlink_to(paused_vm.qmp_socket)
        with pytest.raises(ExecuteError) as err2:
            await c.execute("vm-add", {"name": "x", "qmp": str(link)})
        assert "outside the allowed" in str(err2.value)
        # A hard link inside it to QEMU's socket outside names that socket from inside: the
        # socket is judged by what it is (its link count), not by the name.
        hard = allowed / "borrowed.qmp"
        os.link(paused_vm.qmp_socket, hard)
        try:
            with pytest.raises(ExecuteError) as err3:
                await c.execute("vm-add", {"name": "x", "qmp": str(hard)})
        finally:
            hard.unlink()          # the lab VM's own socket has one link again
        assert err3.value.error_class == "InvalidRequest" and "hard links" in str(err3.value)
        assert await c.execute("query-vms") == []
        audit = [json.loads(line) for line in
                 (await audit_lines(tmp_path / "d" / "state" / "audit.log", 3))]
        assert [(a["command"], a["uid"], a["outcome"]) for a in audit] == [
            ("vm-add", 0, "InvalidRequest")] * 3
        await c.qmp.disconnect()
    finally:
        d.stop()


async def audit_lines(path: Path, count: int, timeout: float = 10) -> list[str]:
    """The audit log's lines once it has ``count`` (it is written after the reply)."""
    for _ in range(int(timeout / 0.05)):
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} has fewer than {count} lines")


@pytest.mark.parametrize("enabled", [False, True])
async def test_raw_qmp_passthrough_only_when_enabled(tmp_path: Path, paused_vm: LabVm,
                                                     enabled: bool) -> None:
    d = DaemonProcess(tmp_path / "d", access_config=(
        f'qmp-dirs = ["{paused_vm.workdir}"]\nqmp-passthrough = {str(enabled).lower()}'))
    d.start()
    try:
        c = await connect(d.socket)
        await c.execute("vm-add", {"name": "p", "qmp": str(paused_vm.qmp_socket)})
        if enabled:
            status = await c.execute("vm-qmp", {"vm": "p", "command": "query-status"})
            assert status["status"] == "prelaunch"
        else:
            with pytest.raises(ExecuteError) as err:
                await c.execute("vm-qmp", {"vm": "p", "command": "query-status"})
            assert err.value.error_class == "Unsupported"
        audit = "\n".join(await audit_lines(tmp_path / "d" / "state" / "audit.log", 2))
        assert '"command":"vm-qmp"' in audit
        await c.execute("vm-remove", {"name": "p"})
        await c.qmp.disconnect()
    finally:
        d.stop()


def test_system_python_present() -> None:
    assert shutil.which(SYSTEM_PYTHON), "apt-get install python3"


@pytest.fixture
def tenant_user() -> Iterator[tuple[str, str]]:
    """A throwaway user whose *supplementary* group (not its primary) is allowed."""
    user, group = "qmpfd-t-user", "qmpfd-t-ops"
    subprocess.run(["groupadd", "-f", group], check=True)
    subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", "-G", group, "-s", "/bin/false",
                    user], check=False, capture_output=True)
    yield user, group
    subprocess.run(["userdel", user], check=False, capture_output=True)
    subprocess.run(["groupdel", group], check=False, capture_output=True)


def test_admission_by_supplementary_group(open_dir: Path, tenant_user: tuple[str, str]) -> None:
    user, group = tenant_user
    d = DaemonProcess(open_dir / "d", daemon_config='socket-mode = "0666"',
                      access_config=f'qmp-dirs = ["/tmp"]\ngroups = ["{group}"]')
    (open_dir / "d").chmod(0o755)
    d.start()
    try:
        member = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, str(d.socket)], user=user,
                                group="nogroup", capture_output=True, text=True, timeout=30,
                                cwd="/")
        result = json.loads(member.stdout)
        assert "QMP" in result["first"], result       # admitted through the supplementary group
        assert '"return"' in result["then"]
        other = as_nobody(d.socket)                    # nobody is not in the group
        assert "access denied" in other["first"]["error"]["desc"]  # type: ignore[index]
    finally:
        d.stop()


def test_max_clients_refuses_the_next_and_admits_after_one_leaves(tmp_path: Path) -> None:
    import socket as socketlib

    d = DaemonProcess(tmp_path / "d", daemon_config="max-clients = 2")
    d.start()

    def open_client() -> tuple[socketlib.socket, dict[str, Any]]:
        s = socketlib.socket(socketlib.AF_UNIX)
        s.settimeout(10)
        s.connect(str(d.socket))
        return s, json.loads(s.makefile("rb").readline())
    try:
        (a, ga), (b, gb) = open_client(), open_client()
        assert "QMP" in ga and "QMP" in gb
        c, gc = open_client()
        assert "too many clients (daemon.max-clients = 2)" in gc["error"]["desc"], gc
        c.close()
        a.close()
        deadline = time.monotonic() + 10    # the daemon sees the close when its loop runs
        e, ge = open_client()
        while "QMP" not in ge:
            e.close()
            assert time.monotonic() < deadline, ge
            time.sleep(0.02)
            e, ge = open_client()
        for s in (b, e):
            s.close()
    finally:
        d.stop()


def test_a_client_that_never_reads_its_events_is_dropped(tmp_path: Path,
                                                          paused_vm: LabVm) -> None:
    """A client negotiates, then never reads. Events pile up for it (the socket buffer, then
    qmpfd's per-client queue); qmpfd drops that client instead of growing without bound, and
    keeps serving the others."""
    import socket as socketlib

    d = DaemonProcess(tmp_path / "d", access_config=f'qmp-dirs = ["{paused_vm.workdir}"]')
    d.start()
    try:
        lazy = socketlib.socket(socketlib.AF_UNIX)
        lazy.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
        lazy.connect(str(d.socket))
        lazy.sendall(b'{"execute":"qmp_capabilities"}\n')
        busy = socketlib.socket(socketlib.AF_UNIX)
        busy.settimeout(30)
        busy.connect(str(d.socket))
        f = busy.makefile("rb")
        f.readline()

        def call(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
            busy.sendall(json.dumps({"execute": cmd, "arguments": args, "id": 1}).encode()
                         + b"\n")
            while True:
                msg: dict[str, Any] = json.loads(f.readline())
                if "event" not in msg:
                    return msg
        assert "return" in call("qmp_capabilities", {})
        assert "return" in call("vm-add", {"name": "ev", "qmp": str(paused_vm.qmp_socket)})
        for i in range(3000):   # each queues a function: one FUNCTION_QUEUED event
            assert "return" in call("function-add", {"vm": "ev", "id": f"q{i}",
                                                     "driver": "e1000", "bus": "pci.0",
                                                     "slot": 20, "function": 1})
            assert "return" in call("pending-cancel", {"vm": "ev", "bus": "pci.0", "slot": 20})
            if "client too slow" in d.log():
                break
        assert d.logged("client too slow for events; disconnecting")
        assert "return" in call("query-version", {})    # the others are still served
        lazy.settimeout(5)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := lazy.recv(65536):
                data += chunk
        assert data, "the slow client got nothing at all"   # it was cut off, not stuck forever
        assert "return" in call("vm-remove", {"name": "ev"})
    finally:
        d.stop()
