import pytest

from qmpfd.api.models import DeviceAttachArgs, DeviceDetachArgs, FunctionAddArgs, parse_args
from qmpfd.errors import InvalidRequest


def test_function_numbers_default_to_list_order() -> None:
    a = parse_args(DeviceAttachArgs, {"vm": "v", "functions": [
        {"id": "a", "driver": "e1000"}, {"id": "b", "driver": "e1000"}], "dry-run": True})
    assert [s.function for s in a.specs()] == [0, 1] and a.dry_run


@pytest.mark.parametrize(("args", "field"), [
    ({"vm": "v"}, "functions: missing"),
    ({"vm": "v", "functions": [{"id": "a", "driver": "e1000", "function": 1},
                               {"id": "b", "driver": "e1000"}]}, "functions[1].function"),
    ({"vm": "v", "functions": [{"id": "a", "driver": "e1000", "function": "0"}]},
     "functions[0].function"),
    ({"vm": "v", "functions": [{"id": "1bad", "driver": "e1000"}]}, "functions[0].id"),
    ({"vm": "v", "functions": [{"id": "a", "driver": "e1000", "x": 1}]},
     "functions[0].x: unexpected"),
    ({"vm": "v", "functions": [{"id": "a", "driver": "e1000"}], "slot": 40}, "slot"),
    ({"vm": "v", "functions": [{"id": "a", "driver": "e1000"}], "timeout": -1}, "timeout"),
    ({"vm": "../etc", "functions": [{"id": "a", "driver": "e1000"}]}, "vm"),
    ({"vm": "v", "functions": [{"id": "a", "driver": "e1000",
                                "properties": {"k": {"nested": 1}}}]}, "functions[0].properties"),
])
def test_attach_errors_name_the_field(args: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_args(DeviceAttachArgs, args)
    assert str(err.value).startswith(field), str(err.value)


def test_detach_needs_ids_or_bus_and_slot() -> None:
    with pytest.raises(InvalidRequest, match="ids"):
        parse_args(DeviceDetachArgs, {"vm": "v", "bus": "pci.0"})
    with pytest.raises(InvalidRequest, match="not both"):
        parse_args(DeviceDetachArgs, {"vm": "v", "ids": ["a"], "bus": "pci.0", "slot": 3})
    d = parse_args(DeviceDetachArgs, {"vm": "v", "ids": ["a"], "whole-slot": True})
    assert d.whole_slot


def test_function_add_requires_placement() -> None:
    with pytest.raises(InvalidRequest, match="bus"):
        parse_args(FunctionAddArgs, {"vm": "v", "id": "a", "driver": "e1000", "slot": 3,
                                     "function": 1})
