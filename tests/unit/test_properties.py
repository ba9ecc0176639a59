"""Device properties converted to the JSON type QEMU's device_add wants (QEMU >= 8 type-checks
them), from the type names device-list-properties gives; errors name the field."""

from __future__ import annotations

from typing import Any

import pytest

from qmpfd.errors import InvalidRequest
from qmpfd.qemu.properties import coerce_properties, coerce_value

TYPES = {"max-bytes": "uint64", "period": "uint64", "rombar": "int32", "bootindex": "int32",
         "acpi-index": "uint32", "ioeventfd": "bool", "msi": "OnOffAuto", "romfile": "str",
         "x-bounce": "size", "subsys": "uint16", "small": "uint8", "neg": "int8",
         "virtio-backend": "child<virtio-rng-device>", "rng": "link<rng-backend>",
         "stats": "list", "werror": "BlockdevOnError"}


@pytest.mark.parametrize(("qemu_type", "value", "expected"), [
    ("uint64", "1024", 1024), ("uint64", 1024, 1024), ("uint64", "0x10", 16),
    ("uint64", "010", 8), ("int32", "-1", -1), ("int32", "0", 0), ("uint4", "15", 15),
    ("bool", "on", True), ("bool", "off", False), ("bool", "yes", True), ("bool", False, False),
    ("bool", "TRUE", True), ("OnOffAuto", True, "on"), ("OnOffAuto", "auto", "auto"),
    ("str", "", ""), ("str", 3, "3"), ("link<rng-backend>", "rng0", "rng0"),
    ("size", "1K", 1024), ("size", "1.5M", 1572864), ("size", 4096, 4096), ("size", "0x100", 256),
    ("list", [1, 2], [1, 2]), ("BlockdevOnError", "stop", "stop"),
])
def test_values_become_qemus_type(qemu_type: str, value: Any, expected: Any) -> None:
    got = coerce_value(value, qemu_type)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("name", "value", "says"), [
    ("max-bytes", "lots", "expects an integer"),
    ("max-bytes", True, "expects an integer"),
    ("max-bytes", 1.5, "expects an integer"),
    ("small", "256", "from 0 to 255"),
    ("neg", -129, "from -128 to 127"),
    ("subsys", -1, "from 0 to 65535"),
    ("ioeventfd", "maybe", "expects a boolean"),
    ("ioeventfd", 1, "expects a boolean"),
    ("x-bounce", "12Q", "expects a size"),
    ("romfile", True, "expects a string"),
    ("virtio-backend", "x", "the device makes itself"),
    ("stats", "1,2", "a JSON list"),
])
def test_a_value_that_does_not_convert_is_refused_naming_it(name: str, value: Any,
                                                            says: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        coerce_properties({name: value}, TYPES, "virtio-rng-pci", "functions[2].")
    assert str(err.value).startswith(f"functions[2].properties.{name}: ")
    assert says in str(err.value)
    assert TYPES[name] in str(err.value)


def test_unknown_property_is_refused_naming_driver_and_property() -> None:
    with pytest.raises(InvalidRequest, match=r"^properties\.nope: device 'e1000' has no "
                                             r"property 'nope'"):
        coerce_properties({"nope": 1}, TYPES, "e1000", "")


def test_all_properties_converted_together() -> None:
    assert coerce_properties({"max-bytes": "1024", "ioeventfd": "off", "romfile": "",
                              "rombar": "0"}, TYPES, "x", "") == {
        "max-bytes": 1024, "ioeventfd": False, "romfile": "", "rombar": 0}
