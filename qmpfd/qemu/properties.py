"""Device properties in the JSON type QEMU wants, decided from QEMU's own introspection.

Users write properties the way ``-device`` takes them (``max-bytes=1024``, ``rombar=0``,
``msi=on``) or as JSON values. QEMU up to 7.2 converted strings itself; from 8.x on,
``device_add`` type-checks its arguments (``Parameter 'max-bytes' expects uint64``), and QEMU
refused the third function only after the first two were plugged. So qmpfd converts every value
before planning, from the types ``device-list-properties`` gives for the driver (read once per
VM and driver), and refuses a value that does not convert, naming it, before QEMU sees anything.

Pure code: :func:`coerce_properties` takes the property types; :mod:`qmpfd.vm.managed` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from qmpfd.errors import InvalidRequest

_INT = re.compile(r"^(u?)int(\d+)$")
# qemu_strtosz's suffixes (util/cutils.c): bytes, then powers of 1024.
_SIZE_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|0x[0-9a-f]+)\s*([bkmgtpe]?)\s*$", re.IGNORECASE)
# The spellings QEMU's option parser takes for a boolean (qapi/qapi-visit-core, keyval).
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
# Types whose values are not settable by device_add (the device creates them itself).
_NOT_SETTABLE = ("child<",)


class BadValue(ValueError):
    """A value that does not convert to its property's type; the message says what was wanted."""


def parse_int(text: str) -> int:
    """An integer as QEMU's qemu_strtoi64 reads it (base 0): decimal, 0x hex, leading-0 octal."""
    s = text.strip()
    sign = -1 if s.startswith("-") else 1
    body = s.lstrip("+-")
    try:
        if body.lower().startswith("0x"):
            return sign * int(body[2:], 16)
        if len(body) > 1 and body.startswith("0"):
            return sign * int(body[1:], 8)
        return sign * int(body, 10)
    except ValueError:
        raise BadValue("an integer (decimal, 0x hex or 0 octal)") from None


def _integer(value: Any, signed: bool, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadValue("an integer")
    n = parse_int(value) if isinstance(value, str) else value
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not lo <= n <= hi:
        raise BadValue(f"an integer from {lo} to {hi}")
    return n


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadValue("a size in bytes (a number, or with a K/M/G/T suffix)")
    if isinstance(value, int):
        if value < 0:
            raise BadValue("a size in bytes, not negative")
        return value
    m = _SIZE.match(value)
    if m is None:
        raise BadValue("a size in bytes (a number, or with a K/M/G/T suffix)")
    number, suffix = m.groups()
    base = int(number, 16) if number.lower().startswith("0x") else float(number)
    return int(base * _SIZE_SUFFIX[suffix.lower()])


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise BadValue("a boolean (true/false, or on/off, yes/no)")


def _string(value: Any, qemu_type: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        if qemu_type.startswith("OnOff"):   # OnOffAuto, OnOffSplit: -device's on/off
            return "on" if value else "off"
        raise BadValue(f"a string ({qemu_type})")
    if isinstance(value, int):
        return str(value)
    raise BadValue(f"a string ({qemu_type})")


def coerce_value(value: Any, qemu_type: str) -> Any:
    """``value`` as the JSON type QEMU's ``device_add`` takes for a property of ``qemu_type``
    (a type name from ``device-list-properties``)."""
    if qemu_type.startswith(_NOT_SETTABLE):
        raise BadValue(f"nothing: it is a {qemu_type} the device makes itself")
    if qemu_type == "bool":
        return _boolean(value)
    m = _INT.match(qemu_type)
    if m:
        return _integer(value, signed=not m.group(1), bits=int(m.group(2)))
    if qemu_type == "size":
        return _size(value)
    if qemu_type == "list":
        if isinstance(value, list):
            return value
        raise BadValue("a JSON list")
    # str, string, link<...> and QAPI enums (OnOffAuto, BlockdevOnError, ...) are strings.
    return _string(value, qemu_type)


def coerce_properties(properties: Mapping[str, Any], types: Mapping[str, str], driver: str,
                      where: str) -> dict[str, Any]:
    """Every property converted for ``device_add``; an unknown property or a value that does
    not convert raises InvalidRequest naming ``{where}properties.NAME``."""
    out: dict[str, Any] = {}
    for name, value in properties.items():
        field = f"{where}properties.{name}"
        qemu_type = types.get(name)
        if qemu_type is None:
            raise InvalidRequest(f"{field}: device '{driver}' has no property '{name}'")
        try:
            out[name] = coerce_value(value, qemu_type)
        except BadValue as exc:
            raise InvalidRequest(f"{field}: expects {exc} (QEMU type {qemu_type}), "
                                 f"got {value!r}") from None
    return out
