"""VM identity and per-VM access: query-vms shows each VM's UUID and commands take
it in place of the name; an [[access.tenants]] rule lets a group act on its own VMs only, with a
refusal naming the rule, listings and the event stream filtered. Real uids: the tenant's client
runs as a throwaway user whose supplementary group the rule names."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import connect, start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration

UUID_A = "5a1f0e2c-7d3b-4c1e-9a8f-0123456789ab"
SYSTEM_PYTHON = "/usr/bin/python3"
USER, GROUP = "qmpfd-t-tenant", "qmpfd-t-tenants"
# The tenant's client: raw QMP on the socket; every message it receives, one JSON per line.
PROBE = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(0.2)
buf = b""
def send(obj): s.sendall(json.dumps(obj).encode() + b"\n")
def msgs(): return [json.loads(ln) for ln in buf.splitlines() if ln.startswith(b"{")]
def drain_until(done, seconds):
    global buf
    end = time.monotonic() + seconds
    while not done() and time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        buf += chunk
def answered(): return sum("return" in m or "error" in m for m in msgs())
def last_event_seen():   # the one root sends last: every event before it has come, or never will
    return any(m.get("event") == "PENDING_CANCELLED" and "r-a-one" in json.dumps(m)
               for m in msgs())
send({"execute": "qmp_capabilities"})
for n, req in enumerate(json.loads(sys.argv[2]), start=2):
    send(req); drain_until(lambda: answered() >= n, 30)
print("listening", file=sys.stderr, flush=True)
drain_until(last_event_seen, float(sys.argv[3]))
print(buf.decode())
"""


@pytest.fixture(scope="module")
def two_vms(workdir: Path) -> Iterator[tuple[LabVm, LabVm]]:
    a = start_lab_vm(workdir, "id-a", LabVmSpec(machine="pc", paused=True,
                                                  extra=["-uuid", UUID_A]))
    b = start_lab_vm(workdir, "id-b", LabVmSpec(machine="pc", paused=True))
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def tenant() -> Iterator[None]:
    subprocess.run(["groupadd", "-f", GROUP], check=True)
    subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", "-G", GROUP, "-s", "/bin/false",
                    USER], check=False, capture_output=True)
    yield
    subprocess.run(["userdel", USER], check=False, capture_output=True)
    subprocess.run(["groupdel", GROUP], check=False, capture_output=True)


def replies(output: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    msgs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    msgs = [m for m in msgs if "QMP" not in m]
    return ([m for m in msgs if "event" not in m][1:],   # [0]: qmp_capabilities
            [m for m in msgs if "event" in m])


async def test_uuid_names_a_vm_and_a_tenant_sees_only_its_own(
        two_vms: tuple[LabVm, LabVm], tenant: None) -> None:
    a, b = two_vms
    base = Path(tempfile.mkdtemp(prefix="qmpfd-id-"))
    base.chmod(0o755)
    d = DaemonProcess(base / "d", daemon_config='socket-mode = "0666"', access_config=(
        f'qmp-dirs = ["{a.workdir.parent}"]\n[[access.tenants]]\ngroup = "{GROUP}"\n'
        'vms = ["a-*"]\n'))
    (base / "d").chmod(0o755)
    d.start()
    try:
        root = await connect(d.socket)
        await root.execute("vm-add", {"name": "a-one", "qmp": str(a.qmp_socket)})
        await root.execute("vm-add", {"name": "b-two", "qmp": str(b.qmp_socket)})
        vms = {v["name"]: v for v in await root.execute("query-vms")}
        assert vms["a-one"]["uuid"] == UUID_A and vms["b-two"]["uuid"] is None
        assert await root.execute("query-slots", {"vm": UUID_A.upper()}) == \
            await root.execute("query-slots", {"vm": "a-one"})

        requests = [
            {"execute": "query-vms"},
            {"execute": "query-slots", "arguments": {"vm": UUID_A}},
            {"execute": "query-slots", "arguments": {"vm": "b-two"}},
            {"execute": "function-add", "arguments": {"vm": "a-one", "id": "t1",
                                                      "driver": "e1000", "bus": "pci.0",
                                                      "slot": 9, "function": 1}},
            {"execute": "pending-cancel", "arguments": {"vm": "a-one", "bus": "pci.0",
                                                        "slot": 9}},
            {"execute": "vm-qmp", "arguments": {"vm": "a-one", "command": "query-status"}},
            {"execute": "query-host-devices"},
            {"execute": "vm-remove", "arguments": {"name": "b-two"}},
            # Another tenant's QEMU, under a name this tenant may use: its rule grants no
            # place to adopt from.
            {"execute": "vm-add", "arguments": {"name": "a-stolen", "qmp": str(b.qmp_socket)}},
        ]
        probe = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON, "-c", PROBE, str(d.socket), json.dumps(requests), "60",
            user=USER, group="nogroup", cwd="/", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert probe.stderr is not None  # its requests are answered; it is listening
        ready = await asyncio.wait_for(probe.stderr.readline(), 120)
        assert ready == b"listening\n", ready
        for vm in ("b-two", "a-one"):    # root changes both VMs; the tenant sees one
            await root.execute("function-add", {"vm": vm, "id": f"r-{vm}", "driver": "e1000",
                                                "bus": "pci.0", "slot": 10, "function": 1})
            await root.execute("pending-cancel", {"vm": vm, "bus": "pci.0", "slot": 10})
        out, err = await asyncio.wait_for(probe.communicate(), 60)
        answers, events = replies(out.decode())
        assert len(answers) == len(requests), (out.decode(), err.decode())
        listed, by_uuid, other, queued, cancelled, raw, host, remove, stolen = answers
        assert [v["name"] for v in listed["return"]] == ["a-one"]
        assert "return" in by_uuid
        rule = f"access.tenants[0] (group {GROUP}: a-*)"
        for refused in (other, raw, host, remove, stolen):
            assert refused["error"]["class"] == "GenericError", refused
            assert rule in refused["error"]["desc"], refused
        assert queued["return"]["queued"] is True and "return" in cancelled
        assert {e["data"]["vm"] for e in events} == {"a-one"}, events
        assert {e["data"].get("id") or e["data"]["ids"][0] for e in events} >= {"t1", "r-a-one"}
        assert [v["name"] for v in await root.execute("query-vms")] == ["a-one", "b-two"]
        await root.qmp.disconnect()
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
