"""``query-qmp-schema``: qmpfd's commands in QEMU's introspection format, generated from the
request models, so QMP tooling (qmp-shell, qemu.qmp users, code generators) can discover the
commands and their arguments the way it does for QEMU (qapi/introspect.json: SchemaInfo).

Differences from QEMU: type names are readable (QEMU masks them as numbers), and every command's
``ret-type`` is ``any`` (replies are documented in the contract, not modelled here yet).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from qmpfd.api import commanddocs

#: JSON type of each builtin QAPI type used here.
BUILTINS = {"str": "string", "int": "int", "number": "number", "bool": "boolean",
            "any": "value", "null": "null"}
EVENTS = tuple(commanddocs.EVENTS)


class _Builder:
    def __init__(self) -> None:
        self.types: dict[str, dict[str, Any]] = {}

    def type_of(self, annotation: Any) -> str:
        """The schema name of a Python annotation, adding object and array types as needed."""
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            return self.type_of(args[0])
        if origin in (typing.Union, types.UnionType):
            real = [a for a in args if a is not type(None)]
            return self.type_of(real[0]) if len(real) == 1 else "any"
        if origin is list:
            element = self.type_of(args[0]) if args else "any"
            name = f"[{element}]"
            self.types.setdefault(name, {"name": name, "meta-type": "array",
                                         "element-type": element})
            return name
        if origin is dict or annotation is dict or annotation is Any:
            return "any"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return self.object(annotation)
        return {str: "str", int: "int", float: "number", bool: "bool"}.get(annotation, "any")

    def object(self, model: type[BaseModel]) -> str:
        name = model.__name__
        if name in self.types:
            return name
        self.types[name] = {"name": name, "meta-type": "object", "members": []}  # recursion
        members = []
        for field_name, field in model.model_fields.items():
            member: dict[str, Any] = {"name": field.alias or field_name,
                                      "type": self.type_of(field.annotation)}
            if not field.is_required():
                member["default"] = None       # optional (QEMU: "default": null)
            members.append(member)
        self.types[name]["members"] = members
        return name


def schema(commands: Iterable[tuple[str, type[BaseModel], Any]]) -> list[dict[str, Any]]:
    """QEMU's SchemaInfo list: every command with its arguments and, where it has a reply model
    (qmpfd.client.models), its return type; the events; the types they use."""
    b = _Builder()
    out: list[dict[str, Any]] = []
    for name, model, returns in sorted(commands, key=lambda c: c[0]):
        out.append({"name": name, "meta-type": "command", "arg-type": b.object(model),
                    "ret-type": b.type_of(returns) if returns is not None else "any",
                    "allow-oob": False})
    out.append({"name": "qmp_capabilities", "meta-type": "command",
                "arg-type": "qmp_capabilities-arg", "ret-type": "any", "allow-oob": False})
    b.types["qmp_capabilities-arg"] = {
        "name": "qmp_capabilities-arg", "meta-type": "object",
        "members": [{"name": "enable", "type": b.type_of(list[str]), "default": None}]}
    event_data = "event-data"
    b.types[event_data] = {"name": event_data, "meta-type": "object", "members": [
        {"name": "vm", "type": "str"}, {"name": "seq", "type": "int"},
        {"name": "boot", "type": "str"}]}
    out += [{"name": e, "meta-type": "event", "arg-type": event_data} for e in EVENTS]
    out += sorted(b.types.values(), key=lambda t: str(t["name"]))
    out += [{"name": n, "meta-type": "builtin", "json-type": j} for n, j in BUILTINS.items()]
    return out
