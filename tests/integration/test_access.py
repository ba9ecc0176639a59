"""Access control on a real daemon: peer credentials, socket permissions, allowed QMP directories,
raw QMP passthrough, and the audit log."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
        assert "client refused" in d.log()
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
        assert await c.execute("query-vms") == []
        audit = [json.loads(line) for line in
                 (tmp_path / "d" / "state" / "audit.log").read_text().splitlines()]
        assert [(a["command"], a["uid"], a["outcome"]) for a in audit] == [
            ("vm-add", 0, "InvalidRequest"), ("vm-add", 0, "InvalidRequest")]
        await c.qmp.disconnect()
    finally:
        d.stop()


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
        audit = (tmp_path / "d" / "state" / "audit.log").read_text()
        assert '"command":"vm-qmp"' in audit
        await c.execute("vm-remove", {"name": "p"})
        await c.qmp.disconnect()
    finally:
        d.stop()


def test_system_python_present() -> None:
    assert shutil.which(SYSTEM_PYTHON), "apt-get install python3"
