import json
from pathlib import Path

import pytest

from qmpfd.cli import build_parser, ranges, render, request_of


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
