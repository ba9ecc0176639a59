import json
import subprocess
import sys
from pathlib import Path

import pytest

from qmpfd.cli import build_parser, main, ranges, render, request_of, slot_number


def test_ranges() -> None:
    assert ranges([3, 4, 5, 9, 0x1F]) == "0x03-0x05, 0x09, 0x1f"
    assert ranges([]) == ""


def test_slots_table_collapses_free_slots() -> None:
    out = render("query-slots", [
        {"bus": "pci.0", "slot": 2, "hotpluggable": True,
         "functions": [{"function": 0, "id": "n0", "driver": "e1000", "state": "present"}]},
        {"bus": "pci.0", "slot": 3, "hotpluggable": True, "functions": []},
        {"bus": "pci.0", "slot": 4, "hotpluggable": True, "functions": []}])
    assert "n0" in out and "free hotpluggable slots on pci.0: 0x03-0x04" in out


def test_attach_reads_json_list_or_object(tmp_path: Path) -> None:
    f = tmp_path / "dev.json"
    f.write_text(json.dumps([{"id": "a", "driver": "e1000"}]))
    ns = build_parser().parse_args(["attach", "vm1", str(f), "--dry-run", "--slot", "0x5",
                                    "--bus", "pci.0"])
    cmd, args, _ = request_of(ns)
    assert cmd == "device-attach"
    assert args == {"vm": "vm1", "functions": [{"id": "a", "driver": "e1000"}], "bus": "pci.0",
                    "slot": 5, "dry-run": True}


def test_detach_and_pending_cancel() -> None:
    p = build_parser()
    assert request_of(p.parse_args(["detach", "v", "a", "b", "--whole-slot"]))[1] == {
        "vm": "v", "ids": ["a", "b"], "whole-slot": True}
    assert request_of(p.parse_args(["pending", "v", "--cancel", "pci.0", "0x5"]))[:2] == (
        "pending-cancel", {"vm": "v", "bus": "pci.0", "slot": 5})


def test_bad_usage_exits_2() -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["attach"])
    assert e.value.code == 2


def test_attach_xml_file_goes_to_device_attach_xml(tmp_path: Path) -> None:
    f = tmp_path / "dev.xml"
    f.write_text("<hostdev mode='subsystem' type='pci'><source><address bus='1' slot='0'/>"
                 "</source></hostdev>")
    cmd, args, _ = request_of(build_parser().parse_args(["attach", "vm1", str(f)]))
    assert cmd == "device-attach-xml" and args["xml"].startswith("<hostdev")


def test_host_tree() -> None:
    out = render("query-host-devices", [{"slot": "0000:01:00", "functions": [
        {"function": f, "class": "0x020000", "vendor-name": "Intel Corporation", "vendor": "0x8086",
         "device-name": "82574L", "device": "0x10d3", "driver": "e1000e" if f else None,
         "iommu-group": 4, "held-by": None, "denied": None, "multifunction": f == 0,
         "in-use": ["network interface eth1 is up"] if f == 1 else []} for f in range(2)]}])
    assert out.splitlines() == [
        "0000:01:00 multifunction",
        " ├─ .0 [0x020000] Intel Corporation 82574L (driver -, group 4)",
        " └─ .1 [0x020000] Intel Corporation 82574L (driver e1000e, group 4, "
        "IN USE: network interface eth1 is up)"]


def test_vm_remove_says_what_became_of_held_host_functions() -> None:
    assert render("vm-remove", {}) == "ok"
    assert "stay held: 0000:01:00.1" in render("vm-remove", {"host-held": ["0000:01:00.1"]})
    assert "given back: 0000:01:00.1" in render("vm-remove",
                                               {"host-released": ["0000:01:00.1"]})


def test_readable_renders_for_policy_version_pending_and_dry_run() -> None:
    policy = {"vm": "w", "policy": "pcie-native", "multifunction": True,
              "timeouts": {"plug": 10.0, "unplug": 30.0}, "guest-driven-unplug": True,
              "buses": [{"bus": "rp1", "mechanism": "pcie-native", "policy": "pcie-native"}]}
    text = render("query-policy", policy)
    assert "policy pcie-native" in text and "30 s for an unplug" in text and "{" not in text
    assert render("query-version", {"qemu": {"major": 0}, "package": "qmpfd 0.2.0"}) == \
        "qmpfd 0.2.0"
    assert render("query-pending", []) == "no queued functions"
    pend = render("query-pending", [{"vm": "w", "bus": "pci.0", "slot": 5, "expires-in": 299.6,
                                     "functions": [{"function": 1, "id": "n1",
                                                    "driver": "e1000"}]}])
    assert "0x05" in pend and "300 s" in pend
    plan = render("device-attach", {
        "vm": "w", "bus": "pci.0", "slot": 5, "policy": "acpi-pcihp", "dry-run": True,
        "functions": [{"id": "n0", "function": 0}],
        "steps": [{"execute": "device_add", "arguments": {"driver": "e1000", "id": "n0"}}],
        "rollback": [{"execute": "device_del", "arguments": {"id": "n0"}}]})
    assert "1. device_add driver=e1000 id=n0" in plan and "device_del id=n0" in plan
    assert "{" not in plan and "slot 0x05" in plan


def test_slot_notation_is_one_and_bad_slots_are_named(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    assert slot_number("0x05") == slot_number("5") == 5
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["attach", "vm", "f.json", "--slot", "zz"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'zz' is not a slot number (0x05 or 5)" in err and "lambda" not in err


def test_errors_never_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.json"
    assert main(["--socket", str(tmp_path / "s"), "attach", "vm", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: cannot read it: No such file or directory" in err and "Errno" not in err
    # --json: the error as the QMP error object, on stdout, for scripts.
    assert main(["--json", "--socket", str(tmp_path / "s"), "vm", "list"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["error"]["class"] == "GenericError"
    assert "cannot reach qmpfd" in out["error"]["desc"]


def test_version_and_completions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("qmpfctl 0.")
    for shell in ("bash", "zsh"):
        assert main(["completion", shell]) == 0
        script = capsys.readouterr().out
        assert "attach" in script and "detach" in script and "--dry-run" in script
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_a_closed_pipe_ends_quietly() -> None:
    """qmpfctl's own exit status (not the pipe's, which is the reader's) and its stderr, when
    the reader exits before reading anything."""
    proc = subprocess.run(
        ["bash", "-c", f"{{ sleep 0.5; '{sys.executable}' -m qmpfd.cli completion zsh; }} | true; "
                       "echo \"status ${PIPESTATUS[0]}\""],   # the reader is gone first
        capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "status 0" and proc.stderr == "", (proc.stdout, proc.stderr)


def test_python_m_qmpfd_is_the_daemon() -> None:
    out = subprocess.run([sys.executable, "-m", "qmpfd", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("qmpfd 0."), out.stderr


def test_xml_dry_run_renders_as_text() -> None:
    text = render("device-attach-xml", {
        "vm": "w", "bus": "pcie.0", "slot": 7, "policy": "acpi-pcihp", "dry-run": True,
        "functions": [{"id": "g", "function": 0}],
        "steps": [{"execute": "device_add", "arguments": {"driver": "vfio-pci", "id": "g"}}],
        "rollback": [], "host": {"bind": ["0000:01:00.1"], "unassigned": ["0000:01:00.0"]}})
    assert "plan (dry run): w pcie.0 slot 0x07" in text and "{" not in text
    assert "to vfio-pci: 0000:01:00.1" in text and "unassigned): 0000:01:00.0" in text
