"""Fuzzing the socket protocol (hypothesis): thousands of generated requests, well-formed or not.

Every reply must be a well-formed QMP reply or error, the daemon must stay up and answer, and the
adopted VM must not change (QEMU's own view before and after).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import start_lab_vm
from tests.integration.faults_support import MATRIX, DaemonProcess, MatrixRow

pytestmark = pytest.mark.integration

VM = "fuzz-target-vm"
ERROR_CLASSES = {"GenericError", "CommandNotFound", "InvalidRequest", "NotFound", "Conflict",
                 "Unsupported", "Timeout", "HostDeviceUnavailable", "QemuError"}
COMMANDS = sorted([
    "vm-add", "vm-remove", "query-vms", "query-slots", "query-policy", "device-attach",
    "function-add", "query-pending", "pending-cancel", "device-detach", "query-operations",
    "vm-qmp", "query-version", "query-commands", "qmp_capabilities"])

json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(
    allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=20)
# Arguments shaped like the real ones, with wrong or hostile values mixed in.
arguments = st.fixed_dictionaries({}, optional={
    "vm": st.sampled_from([VM, "", "x" * 300, "../../etc"]) | st.text(max_size=20),
    "name": st.text(max_size=80), "qmp": st.text(max_size=80),
    "functions": st.lists(st.fixed_dictionaries({}, optional={
        "id": st.text(max_size=20), "driver": st.text(max_size=20),
        "function": st.integers(-3, 12) | json_scalars,
        "properties": st.dictionaries(st.text(max_size=10), json_values, max_size=4)}),
        max_size=12) | json_values,
    "ids": st.lists(st.text(max_size=10), max_size=10) | json_values,
    "bus": st.text(max_size=10) | json_scalars, "slot": st.integers(-5, 40) | json_scalars,
    "function": st.integers(-2, 9), "whole-slot": json_scalars, "dry-run": st.just(True),
    "timeout": st.floats(-1, 5) | json_scalars, "command": st.text(max_size=20),
}) | st.dictionaries(st.text(max_size=12), json_values, max_size=6)
requests = st.fixed_dictionaries(
    {"execute": st.sampled_from(COMMANDS) | st.text(max_size=20) | json_scalars},
    optional={"arguments": arguments | json_values, "id": json_values,
              "extra": json_values})
raw_lines = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ") + b"\n")


@pytest.fixture(scope="module")
def target(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[DaemonProcess, LabVm]]:
    vm = start_lab_vm(workdir, "fuzz-vm", LabVmSpec(machine="pc", paused=True))
    d = DaemonProcess(tmp_path_factory.mktemp("fuzz"),
                      access_config=f'qmp-dirs = ["{vm.workdir}"]')
    d.start()
    yield d, vm
    d.stop()
    vm.stop()


class Conn:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.sentinel = 0
        self.read()
        self.send(b'{"execute":"qmp_capabilities"}\n')
        assert self.read() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "qmpfd closed the connection"
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def replies_until_sentinel(self) -> list[dict[str, Any]]:
        """Everything qmpfd answered before the reply to a sentinel request."""
        self.sentinel += 1
        self.send(b'{"execute":"query-version","id":"sentinel-%d"}\n' % self.sentinel)
        out = []
        while True:
            msg = self.read()
            if msg.get("id") == f"sentinel-{self.sentinel}":
                return out
            out.append(msg)


def well_formed(msg: dict[str, Any]) -> None:
    if "event" in msg:
        return
    assert ("return" in msg) != ("error" in msg), msg
    if "error" in msg:
        err = msg["error"]
        assert set(err) == {"class", "desc"} and err["class"] in ERROR_CLASSES, msg
        assert isinstance(err["desc"], str) and err["desc"], msg
        # An unhandled exception becomes GenericError "internal error: ...": never acceptable.
        assert not err["desc"].startswith("internal error"), msg


def qemu_devices(vm: LabVm) -> Any:
    import asyncio

    from tests.integration.conftest import qemu_view
    return asyncio.run(qemu_view(vm))


def test_fuzz_socket_protocol(target: tuple[DaemonProcess, LabVm]) -> None:
    d, vm = target
    setup = Conn(d.socket)
    setup.send(json.dumps({"execute": "vm-add", "arguments": {
        "name": VM, "qmp": str(vm.qmp_socket)}}).encode() + b"\n")
    assert "return" in setup.read()
    before = qemu_devices(vm)
    conn = Conn(d.socket)
    counted = {"requests": 0}

    @settings(max_examples=1200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.one_of(requests.map(lambda r: json.dumps(r).encode() + b"\n"), raw_lines))
    def one(line: bytes) -> None:
        counted["requests"] += 1
        conn.send(line)
        for reply in conn.replies_until_sentinel():
            well_formed(reply)

    one()
    assert counted["requests"] >= 1000
    assert d.proc is not None and d.proc.poll() is None, "qmpfd died"
    vms = json.dumps(setup.replies_until_sentinel())
    setup.send(b'{"execute":"query-vms","id":1}\n')
    listed = setup.read()
    assert [v["name"] for v in listed["return"]] == [VM] and listed["return"][0]["connected"], vms
    assert qemu_devices(vm) == before, "the fuzz run changed the VM"


HOSTILE = [
    ({"execute": "vm-add", "arguments": {"name": "n", "qmp": "/run/a\0b.qmp"}}, "qmp"),
    ({"execute": "device-attach", "arguments": {"vm": VM, "functions": [
        {"id": "a\0", "driver": "e1000"}]}}, "functions[0].id"),
    ({"execute": "device-detach", "arguments": {"vm": VM, "ids": ["ok", "x\0y"]}}, "ids[1]"),
    ({"execute": "vm-qmp", "arguments": {"vm": VM, "command": "qom-get", "arguments": {
        "path": "/machine\0"}}}, "arguments.path"),
]


def adopted(d: DaemonProcess, vm: LabVm) -> Conn:
    """A negotiated connection with the target VM adopted (once per module: a second vm-add
    of the same VM is a Conflict, which is fine here)."""
    conn = Conn(d.socket)
    conn.send(json.dumps({"execute": "vm-add", "arguments": {
        "name": VM, "qmp": str(vm.qmp_socket)}}).encode() + b"\n")
    conn.replies_until_sentinel()
    return conn


def test_hostile_input_is_refused_naming_the_field(target: tuple[DaemonProcess, LabVm]) -> None:
    """NUL bytes and nesting beyond the limit: InvalidRequest naming the field, never an internal
    error; the connection and the VM are as before."""
    d, vm = target
    conn = adopted(d, vm)
    before = qemu_devices(vm)
    for request, field in HOSTILE:
        conn.send(json.dumps(request).encode() + b"\n")
        (reply,) = conn.replies_until_sentinel()
        assert reply["error"]["class"] == "InvalidRequest", reply
        assert reply["error"]["desc"] == f"{field}: contains a NUL byte", reply
    deep = b"[" * 100_000 + b"]" * 100_000
    conn.send(b'{"execute":"device-attach","arguments":{"vm":"' + VM.encode()
              + b'","functions":' + deep + b"}}")   # no newline: qemu.qmp's framing
    (reply,) = conn.replies_until_sentinel()
    assert reply["error"]["class"] == "InvalidRequest", reply
    assert reply["error"]["desc"].startswith("functions[0][0]"), reply
    assert "nested deeper than 32 levels" in reply["error"]["desc"], reply
    after = qemu_devices(vm)
    assert after == before
    assert "Traceback" not in d.log() and "internal error" not in d.log()
    conn.send(b'{"execute":"query-slots","arguments":{"vm":"' + VM.encode() + b'"}}\n')
    (slots,) = conn.replies_until_sentinel()
    MATRIX.append(MatrixRow(
        "NUL bytes in 4 fields; 100,000-level nesting", "InvalidRequest naming the field",
        "unchanged" if after == before else "changed", "no guest (held at start)",
        "no slot, connection usable" if not any(s["functions"] for s in slots["return"]
                                                if s["hotpluggable"]) else "slot", "pass"))


# Requests that pass validation, with hostile but valid values: they reach the handlers, which is
# where an unhandled case would become an "internal error".
ids = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_.-]{0,20}\Z")
prop_values = (st.text(max_size=20).filter(lambda t: "\0" not in t) | st.integers(-2**31, 2**31)
               | st.booleans() | st.floats(allow_nan=False, allow_infinity=False))
valid_function = st.fixed_dictionaries(
    {"id": ids, "driver": st.sampled_from(["e1000", "virtio-rng-pci", "virtio-net-pci",
                                           "no-such-driver", "pci-bridge"])},
    optional={"properties": st.dictionaries(st.from_regex(r"\A[a-z][a-z-]{0,12}\Z"),
                                            prop_values, max_size=3)})


@st.composite
def valid_requests(draw: st.DrawFn) -> list[dict[str, Any]]:
    kind = draw(st.sampled_from(["attach", "attach-numbered", "slots", "policy", "detach",
                                 "detach-slot", "queue", "queries"]))
    vm = draw(st.sampled_from([VM, VM, VM, "no-such-vm"]))
    if kind.startswith("attach"):
        n = draw(st.integers(1, 8))
        funcs = draw(st.lists(valid_function, min_size=n, max_size=n,
                              unique_by=lambda f: f["id"]))
        if kind == "attach-numbered":
            numbers = draw(st.permutations(range(8)))[:n]
            funcs = [{**f, "function": fn} for f, fn in zip(funcs, numbers, strict=True)]
        args: dict[str, Any] = {"vm": vm, "functions": funcs, "dry-run": True}
        if draw(st.booleans()):
            args["bus"] = draw(st.sampled_from(["pci.0", "nope"]))
            args["slot"] = draw(st.integers(0, 31))
        return [{"execute": "device-attach", "arguments": args}]
    if kind == "slots":
        return [{"execute": "query-slots", "arguments": {"vm": vm,
                                                         "refresh": draw(st.booleans())}}]
    if kind == "policy":
        return [{"execute": "query-policy", "arguments": {"vm": vm}}]
    if kind == "detach":
        return [{"execute": "device-detach", "arguments": {
            "vm": vm, "ids": draw(st.lists(ids, min_size=1, max_size=4, unique=True))}}]
    if kind == "detach-slot":
        return [{"execute": "device-detach", "arguments": {
            "vm": vm, "bus": draw(st.sampled_from(["pci.0", "nope"])),
            "slot": draw(st.integers(0, 31))}}]
    if kind == "queue":   # queue a non-zero function in qmpfd (never in QEMU), then drop it
        slot, fn = draw(st.integers(3, 31)), draw(st.integers(1, 7))
        return [{"execute": "function-add", "arguments": {
                    "vm": vm, "id": draw(ids), "driver": "e1000", "bus": "pci.0",
                    "slot": slot, "function": fn}},
                {"execute": "pending-cancel", "arguments": {"vm": vm, "bus": "pci.0",
                                                            "slot": slot}}]
    return [{"execute": draw(st.sampled_from(["query-vms", "query-pending", "query-operations",
                                              "query-version", "query-commands"]))}]


def reached_handler(reply: dict[str, Any]) -> bool:
    """A return, or an error only a handler gives (validation gives InvalidRequest naming an
    argument, or GenericError/CommandNotFound for the envelope)."""
    return "return" in reply or reply["error"]["class"] in {
        "NotFound", "Conflict", "Unsupported", "QemuError", "Timeout"}


def test_fuzz_valid_requests_reach_the_handlers(target: tuple[DaemonProcess, LabVm]) -> None:
    d, vm = target
    conn = adopted(d, vm)
    before = qemu_devices(vm)
    counts = {"requests": 0, "handled": 0}

    @settings(max_examples=1200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(valid_requests())
    def one(batch: list[dict[str, Any]]) -> None:
        for request in batch:
            counts["requests"] += 1
            conn.send(json.dumps(request).encode() + b"\n")
            for reply in conn.replies_until_sentinel():
                if "event" in reply:
                    continue
                well_formed(reply)
                assert "internal error" not in json.dumps(reply), (request, reply)
                counts["handled"] += reached_handler(reply)

    one()
    print(f"\nvalid-request fuzz: {counts['handled']} of {counts['requests']} reached a handler")
    assert counts["handled"] >= 1000, counts
    assert qemu_devices(vm) == before, "the fuzz run changed the VM"
    conn.send(b'{"execute":"query-pending"}\n')
    assert conn.replies_until_sentinel()[-1] == {"return": []}
    assert "Traceback" not in d.log()
