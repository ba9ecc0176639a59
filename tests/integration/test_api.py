"""The API as a management plane sees it: incremental attach, bad requests, the wire protocol.

One pc guest serves this module; every bad request is checked to change nothing, in qmpfd
(query-slots, query-pending) and in QEMU (its own second monitor).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec, slot_groups
from tests.integration.conftest import (
    PENDING_EXPIRY,
    Client,
    adopt,
    connect,
    qemu_view,
    start_lab_vm,
)

pytestmark = pytest.mark.integration

VM = "api-pc"


@pytest.fixture(scope="module")
def lab(workdir: Path, daemon: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, VM, LabVmSpec(machine="pc"))
    try:
        adopt(daemon, VM, vm.qmp_socket)
        yield vm
    finally:
        vm.stop()


async def free_slot(client: Client) -> int:
    slots = await client.execute("query-slots", {"vm": VM})
    return next(s["slot"] for s in slots
                if s["bus"] == "pci.0" and s["hotpluggable"] and not s["functions"])


async def test_incremental_attach(client: Client, lab: LabVm) -> None:
    """Functions 2 and 1 wait in qmpfd (nothing in QEMU); function 0 flushes all three."""
    before = lab.guest_pci() or set()
    slot = await free_slot(client)
    base = {"vm": VM, "bus": "pci.0", "slot": slot}
    for fn in (2, 1):
        reply = await client.execute("function-add", {**base, "id": f"inc{fn}",
                                                      "driver": "virtio-rng-pci", "function": fn})
        assert reply["queued"] is True
        event = await client.wait_event("FUNCTION_QUEUED", 5)
        assert event["data"]["function"] == fn and event["data"]["id"] == f"inc{fn}"
    pending = await client.execute("query-pending", {"vm": VM})
    assert [[f["function"] for f in p["functions"]] for p in pending] == [[1, 2]]
    peripheral, _ = await qemu_view(lab)
    assert not {"inc1", "inc2"} & peripheral, "queued functions must not reach QEMU"
    slots = await client.execute("query-slots", {"vm": VM})
    queued = next(s for s in slots if s["bus"] == "pci.0" and s["slot"] == slot)
    assert {f["state"] for f in queued["functions"]} == {"queued"}
    # The queued slot is reserved: an automatic attach does not take it.
    plan = await client.execute("device-attach", {
        "vm": VM, "functions": [{"id": "other", "driver": "e1000"}], "dry-run": True})
    assert plan["slot"] != slot

    reply = await client.execute("function-add", {**base, "id": "inc0", "driver": "e1000",
                                                  "function": 0})
    assert reply["queued"] is False
    assert sorted(f["id"] for f in reply["functions"]) == ["inc0", "inc1", "inc2"]
    after = await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) >= 3, 60)
    assert list(slot_groups(after - before).values()) == [{0, 1, 2}]
    assert await client.execute("query-pending", {"vm": VM}) == []
    await client.execute("device-detach", {"vm": VM, "bus": "pci.0", "slot": slot})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30)


async def test_pending_cancel(client: Client, lab: LabVm) -> None:
    slot = await free_slot(client)
    qemu_before, guest_before = await qemu_view(lab), lab.guest_pci()
    await client.execute("function-add", {"vm": VM, "bus": "pci.0", "slot": slot, "id": "pc1",
                                          "driver": "virtio-rng-pci", "function": 1})
    dropped = await client.execute("pending-cancel", {"vm": VM, "bus": "pci.0", "slot": slot})
    assert [f["id"] for f in dropped["functions"]] == ["pc1"]
    assert await client.execute("query-pending", {"vm": VM}) == []
    # Queued functions never reach QEMU, so a cancel leaves QEMU and the guest as they were.
    assert await qemu_view(lab) == qemu_before and lab.guest_pci() == guest_before
    with pytest.raises(ExecuteError) as err:
        await client.execute("pending-cancel", {"vm": VM, "bus": "pci.0", "slot": slot})
    assert err.value.error_class == "NotFound"


async def test_pending_expires(client: Client, lab: LabVm) -> None:
    slot = await free_slot(client)
    await client.execute("function-add", {"vm": VM, "bus": "pci.0", "slot": slot, "id": "exp1",
                                          "driver": "virtio-rng-pci", "function": 1})
    event = await client.wait_event("PENDING_EXPIRED", PENDING_EXPIRY + 10)
    assert event["data"]["ids"] == ["exp1"] and event["data"]["slot"] == slot
    assert await client.execute("query-pending", {"vm": VM}) == []
    # And the slot is free in QEMU's own view: a function 0 there is a slot of one.
    peripheral, _ = await qemu_view(lab)
    assert "exp1" not in peripheral
    before = lab.guest_pci() or set()
    await client.execute("function-add", {"vm": VM, "bus": "pci.0", "slot": slot, "id": "exp0",
                                          "driver": "virtio-rng-pci", "function": 0})
    seen = await asyncio.to_thread(lab.wait_guest_pci, lambda s: len(s - before) >= 1, 60)
    assert list(slot_groups(seen - before).values()) == [{0}]      # no function 1 came along
    await client.execute("device-detach", {"vm": VM, "ids": ["exp0"]})
    await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30)


def fn(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": f"b{i}", "driver": "virtio-rng-pci", **kw}


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("missing functions", "device-attach", {"vm": VM}, "InvalidRequest", "functions"),
    ("missing vm", "device-attach", {"functions": [fn(0)]}, "InvalidRequest", "vm"),
    ("wrong type", "device-attach", {"vm": VM, "functions": "e1000"}, "InvalidRequest",
     "functions"),
    ("function as string", "device-attach", {"vm": VM, "functions": [fn(0, function="0")]},
     "InvalidRequest", "functions[0].function"),
    ("nine functions", "device-attach", {"vm": VM, "functions": [fn(i) for i in range(9)]},
     "InvalidRequest", "functions"),
    ("duplicate function numbers", "device-attach",
     {"vm": VM, "functions": [fn(0, function=0), fn(1, function=1), fn(2, function=1)]},
     "InvalidRequest", "functions[2].function"),
    ("duplicate ids", "device-attach", {"vm": VM, "functions": [fn(0), fn(0)]},
     "InvalidRequest", "functions[1].id"),
    ("no function 0", "device-attach",
     {"vm": VM, "functions": [fn(1, function=1), fn(2, function=2)]}, "InvalidRequest",
     "function 0"),
    ("function number out of range", "device-attach",
     {"vm": VM, "functions": [fn(0, function=0), fn(8, function=8)]}, "InvalidRequest",
     "functions[1].function"),
    ("reserved property", "device-attach",
     {"vm": VM, "functions": [fn(0, properties={"addr": "0x5"})]}, "InvalidRequest",
     "properties.addr"),
    ("unknown argument", "device-attach", {"vm": VM, "functions": [fn(0)], "colour": 1},
     "InvalidRequest", "colour"),
    ("unknown VM", "device-attach", {"vm": "nosuchvm", "functions": [fn(0)]}, "NotFound",
     "nosuchvm"),
    ("occupied slot", "device-attach", {"vm": VM, "functions": [fn(0)], "bus": "pci.0",
                                        "slot": 1}, "Conflict", "slot"),
    ("id clash with QEMU", "device-attach", {"vm": VM, "functions": [{"id": "keep0",
                                                                      "driver": "e1000"}]},
     "Conflict", "keep0"),
    ("unknown bus", "device-attach", {"vm": VM, "functions": [fn(0)], "bus": "nope"},
     "NotFound", "nope"),
    ("slot out of range", "device-attach", {"vm": VM, "functions": [fn(0)], "bus": "pci.0",
                                            "slot": 32}, "InvalidRequest", "slot"),
    ("bad VM name", "vm-add", {"name": "../x", "qmp": "/tmp/x"}, "InvalidRequest", "name"),
    ("unknown command", "no-such-command", {}, "CommandNotFound", "no-such-command"),
    ("detach unknown id", "device-detach", {"vm": VM, "ids": ["ghost"]}, "NotFound", "ghost"),
    ("detach nothing named", "device-detach", {"vm": VM}, "InvalidRequest", "ids"),
    ("detach built-in", "device-detach", {"vm": VM, "bus": "pci.0", "slot": 1}, "Unsupported",
     "built-in"),
    ("function-add occupied", "function-add", {"vm": VM, "bus": "pci.0", "slot": 1, "id": "q1",
                                               "driver": "e1000", "function": 1}, "Conflict",
     "slot"),
]


@pytest.fixture
async def keep(client: Client, lab: LabVm) -> Any:
    """A device already in the VM, for id and slot clashes."""
    await client.execute("device-attach", {"vm": VM, "functions": [{"id": "keep0",
                                                                    "driver": "e1000"}]})
    yield
    await client.execute("device-detach", {"vm": VM, "ids": ["keep0"]})


@pytest.mark.parametrize(("what", "cmd", "args", "error_class", "names"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
async def test_bad_request_changes_nothing(client: Client, lab: LabVm, keep: None, what: str,
                                           cmd: str, args: dict[str, Any], error_class: str,
                                           names: str) -> None:
    slots_before = await client.execute("query-slots", {"vm": VM})
    qemu_before = await qemu_view(lab)
    with pytest.raises(ExecuteError) as err:
        await client.execute(cmd, args)
    assert err.value.error_class == error_class, str(err.value)
    assert names in str(err.value)
    assert await client.execute("query-slots", {"vm": VM}) == slots_before
    assert await client.execute("query-pending", {"vm": VM}) == []
    assert await qemu_view(lab) == qemu_before


def raw_exchange(sock_path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send raw bytes to qmpfd and read one reply per line (after the greeting)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        f = s.makefile("rb")
        replies = [json.loads(f.readline())]
        for line in lines:
            s.sendall(line)
            replies.append(json.loads(f.readline()))
        return replies


def test_wire_protocol_raw(daemon: Path) -> None:
    greeting, *replies = raw_exchange(daemon, [
        b'{"execute":"query-vms","id":1}\n',              # before negotiation
        b'{"execute":"qmp_capabilities"}\n',
        b'{"execute": "query-version", "id": "x"\n',      # malformed: unterminated object
        b'this is not json\n',
        b'[1,2]\n',
        b'{"execute":"query-version","id":{"any":["thing"]}}\n',
        b'{"execute":"query-vms","id":7}{"execute":"query-commands","id":8}',
    ])
    assert greeting["QMP"]["version"]["qemu"]["major"] == 0
    assert greeting["QMP"]["version"]["package"].startswith("qmpfd ")
    assert replies[0]["error"]["class"] == "CommandNotFound" and replies[0]["id"] == 1
    assert replies[1] == {"return": {}}
    assert "error" in replies[2] and "error" in replies[3] and "error" in replies[4]
    assert replies[5]["id"] == {"any": ["thing"]} and "qemu" in replies[5]["return"]
    assert replies[6]["id"] == 7 and isinstance(replies[6]["return"], list)


def test_oversized_message_is_refused_and_connection_survives(daemon: Path) -> None:
    _, _, big, ok = raw_exchange(daemon, [
        b'{"execute":"qmp_capabilities"}\n',
        b'{"execute":"query-version","arguments":{"x":"' + b"a" * (2 << 20) + b'"}}\n',
        b'{"execute":"query-version","id":2}\n',
    ])
    assert "limit" in big["error"]["desc"]
    assert ok["id"] == 2 and "return" in ok


async def test_events_reach_every_negotiated_client(daemon: Path, lab: LabVm) -> None:
    a, b = await connect(daemon), await connect(daemon)
    before = lab.guest_pci() or set()
    try:
        await a.execute("device-attach", {"vm": VM, "functions": [{"id": "ev0",
                                                                   "driver": "e1000"}]})
        for c in (a, b):
            ev = await c.wait_event("SLOT_ATTACHED", 10)
            assert ev["data"]["ids"] == ["ev0"] and ev["data"]["vm"] == VM
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        await a.execute("device-detach", {"vm": VM, "ids": ["ev0"]})
        await asyncio.to_thread(lab.wait_guest_pci, lambda s: s == before, 30)
    finally:
        await a.qmp.disconnect()
        await b.qmp.disconnect()


async def test_vm_lifecycle_commands(client: Client, lab: LabVm) -> None:
    vms = await client.execute("query-vms")
    mine = next(v for v in vms if v["name"] == VM)
    assert mine["connected"] is True and mine["policy"] == "acpi-pcihp"
    with pytest.raises(ExecuteError) as err:
        await client.execute("vm-add", {"name": VM, "qmp": str(lab.qmp_socket)})
    assert err.value.error_class == "Conflict"
    policy = await client.execute("query-policy", {"vm": VM})
    assert policy["policy"] == "acpi-pcihp" and policy["timeouts"]["unplug"] > 0
    names = {c["name"] for c in await client.execute("query-commands")}
    assert {"device-attach", "device-detach", "function-add", "query-slots"} <= names


def run_cli(daemon: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpfd.cli", "--socket", str(daemon), *args],
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_qmpfctl_end_to_end(daemon: Path, lab: LabVm) -> None:
    before = lab.guest_pci() or set()
    listed = run_cli(daemon, "vm", "list")
    assert listed.returncode == 0 and VM in listed.stdout and "acpi-pcihp" in listed.stdout
    attach = run_cli(daemon, "--json", "attach", VM, "-", stdin=json.dumps(
        [{"id": "cli0", "driver": "e1000"}, {"id": "cli1", "driver": "virtio-rng-pci"}]))
    assert attach.returncode == 0, attach.stderr
    assert [f["id"] for f in json.loads(attach.stdout)["functions"]] == ["cli0", "cli1"]
    lab.wait_guest_pci(lambda s: len(s - before) >= 2, 60)
    partial = run_cli(daemon, "detach", VM, "cli1")
    assert partial.returncode == 1
    assert partial.stderr.startswith("qmpfctl: Conflict: ") and "cli0" in partial.stderr
    done = run_cli(daemon, "detach", VM, "cli1", "--whole-slot")
    assert done.returncode == 0 and "detached" in done.stdout
    lab.wait_guest_pci(lambda s: s == before, 30)
    usage = run_cli(daemon, "attach")
    assert usage.returncode == 2
    unreachable = subprocess.run([sys.executable, "-m", "qmpfd.cli", "--socket", "/nonexistent",
                                  "vm", "list"], capture_output=True, text=True, timeout=30)
    assert unreachable.returncode == 1 and unreachable.stderr.startswith("qmpfctl: ")


def test_stalled_and_vanishing_clients_do_not_block_others(daemon: Path) -> None:
    """A client stuck halfway through a message, one that never reads, and one that vanishes
    mid-request: the next client is served at once and the daemon stays up."""
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(str(daemon))
    stalled.sendall(b'{"execute":"qmp_capabilities"}\n{"execute": "query-vers')  # never finished
    deaf = socket.socket(socket.AF_UNIX)
    deaf.connect(str(daemon))
    deaf.sendall(b'{"execute":"qmp_capabilities"}\n' +
                 b'{"execute":"query-commands"}\n' * 2000)  # replies it never reads
    for _ in range(20):
        gone = socket.socket(socket.AF_UNIX)
        gone.connect(str(daemon))
        gone.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-vms"}\n')
        gone.close()  # before the reply
    try:
        _, neg, reply = raw_exchange(daemon, [b'{"execute":"qmp_capabilities"}\n',
                                              b'{"execute":"query-version","id":"alive"}\n'])
        assert neg == {"return": {}} and reply["id"] == "alive"
    finally:
        stalled.close()
        deaf.close()


def test_qmp_shell_drives_qmpfd_without_n(daemon: Path) -> None:
    """QEMU's own qmp-shell (from qemu.qmp), non-interactive, negotiating as with QEMU (no -N):
    it reads the greeting, fills its completion from query-commands, and runs commands."""
    shell = Path(sys.executable).with_name("qmp-shell")
    out = subprocess.run([str(shell), str(daemon)],
                         input='query-version\nquery-vms\nquery-slots vm=nope\n',
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    replies = [json.loads(line[line.index("{"):]) for line in out.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies[0]["return"]["package"].startswith("qmpfd "), out.stdout
    assert isinstance(replies[1]["return"], list)
    assert replies[2]["error"]["class"] == "NotFound"


async def test_qmp_capabilities_oob_refused_and_schema_introspected(daemon: Path) -> None:
    from qemu.qmp import QMPClient
    from qemu.qmp.protocol import ConnectError

    # qemu.qmp asks for oob only when the greeting offers it; ask by hand, as a client may.
    greeting, reply = raw_exchange(daemon, [
        b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n'])
    assert greeting["QMP"]["capabilities"] == []
    assert reply["error"] == {"class": "GenericError", "desc": "Capability 'oob' not available"}
    c = QMPClient("schema")
    try:
        await c.connect(str(daemon))
    except ConnectError as exc:   # pragma: no cover - the greeting must parse
        pytest.fail(f"qemu.qmp refused qmpfd's greeting: {exc}")
    schema = await c.execute("query-qmp-schema")
    names = {e["name"]: e for e in schema}
    for cmd in await c.execute("query-commands"):
        entry = names[cmd["name"]]
        assert entry["meta-type"] == "command" and entry["arg-type"] in names, entry
        assert entry["ret-type"] in names, entry          # every return type is described
    detached = names[names["device-detach"]["ret-type"]]
    assert {"vm", "bus", "slot", "ids", "seconds"} <= {m["name"] for m in detached["members"]}
    attach = names[names["device-attach"]["arg-type"]]
    members = {m["name"]: m for m in attach["members"]}
    assert "default" not in members["functions"] and "default" in members["dry-run"]
    element = names[names[members["functions"]["type"]]["element-type"]]
    assert {"id", "driver", "function", "properties", "host"} <= {
        m["name"] for m in element["members"]}
    assert all(names[t]["meta-type"] == "builtin" for t in ("str", "int", "bool", "any"))
    await c.disconnect()
