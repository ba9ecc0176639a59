"""Device properties in the JSON types QEMU wants, from ``device-list-properties`` (read once per
driver and connection: a restarted QEMU may be another version). The conversion itself is pure,
in :mod:`qmpfd.qemu.properties`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from qmpfd.errors import InvalidRequest, QemuError
from qmpfd.hotplug.plan import FunctionSpec
from qmpfd.qemu.link import Link
from qmpfd.qemu.properties import coerce_properties


class PropertyTypes:
    def __init__(self) -> None:
        self._types: dict[str, dict[str, str]] = {}   # driver -> property name -> QEMU type

    def forget(self) -> None:
        """A new connection: QEMU may be another version."""
        self._types = {}

    async def typed(self, link: Link, specs: Sequence[FunctionSpec],
                    fields: Mapping[str, str]) -> list[FunctionSpec]:
        """``specs`` with every property in the JSON type QEMU wants; errors name
        ``fields[id]`` + ``properties.NAME``."""
        out = []
        for spec in specs:
            if not spec.properties:
                out.append(spec)
                continue
            where = fields.get(spec.id, "")
            types = await self._of(link, spec.driver, where)
            out.append(replace(spec, properties=coerce_properties(spec.properties, types,
                                                                  spec.driver, where)))
        return out

    async def _of(self, link: Link, driver: str, where: str) -> dict[str, str]:
        if driver not in self._types:
            try:
                listed = await link.execute("device-list-properties", {"typename": driver})
            except QemuError as exc:
                raise InvalidRequest(f"{where}driver: QEMU cannot list the properties of "
                                     f"'{driver}' ({exc.desc})") from None
            self._types[driver] = {str(p["name"]): str(p["type"]) for p in listed}
        return self._types[driver]
