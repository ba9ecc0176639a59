"""QMP message shapes as qmpfd writes and reads them (QEMU docs/interop/qmp-spec).

Pure functions: no I/O, so framing and error shapes are unit-tested on their own.
"""

from __future__ import annotations

import json
import time
from typing import Any

from qmpfd import VERSION_TUPLE
from qmpfd.api.framing import MAX_DEPTH as MAX_DEPTH
from qmpfd.api.framing import OVERSIZED as OVERSIZED
from qmpfd.api.framing import Framed
from qmpfd.api.framing import JsonSplitter as JsonSplitter
from qmpfd.api.framing import Oversized as Oversized
from qmpfd.api.framing import TooDeep as TooDeep
from qmpfd.errors import InvalidRequest, QmpfdError

Message = dict[str, Any]


def version() -> Message:
    """qmpfd's version in QEMU's ``query-version`` shape (contract v1.2), so QMP tools that
    read ``version.qemu`` (qemu.qmp's Greeting, qmp-shell's banner) accept it; ``package``
    says it is qmpfd."""
    major, minor, micro = VERSION_TUPLE
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"qmpfd {major}.{minor}.{micro}"}


def greeting() -> Message:
    return {"QMP": {"version": version(), "capabilities": []}}


#: Capabilities QEMU defines; qmpfd offers none of them.
QEMU_CAPABILITIES = ("oob",)


def check_capabilities(args: dict[str, Any]) -> None:
    """``qmp_capabilities {enable?}``: refuse what qmpfd does not offer, in QEMU's words."""
    unknown = set(args) - {"enable"}
    if unknown:                       # QEMU answers these with GenericError, as here
        raise QmpfdError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
    enable = args.get("enable", [])
    if not isinstance(enable, list):
        raise QmpfdError("Invalid parameter type for 'enable', expected: array")
    for i, cap in enumerate(enable):
        if cap not in QEMU_CAPABILITIES:
            raise QmpfdError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
        raise QmpfdError(f"Capability '{cap}' not available")


def encode(msg: Message) -> bytes:
    # Compact separators and one object per line, as QEMU writes them.
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def error_reply(error_class: str, desc: str, msg_id: Any = None, has_id: bool = False) -> Message:
    reply: Message = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = msg_id
    return reply


def reply_for_error(exc: QmpfdError, request: Message | None) -> Message:
    has_id = request is not None and "id" in request
    return error_reply(exc.error_class, exc.desc, request.get("id") if has_id and request else None,
                       has_id)


def return_reply(value: Any, request: Message) -> Message:
    reply: Message = {"return": value}
    if "id" in request:
        reply["id"] = request["id"]
    return reply


def event(name: str, data: dict[str, Any], now: float | None = None) -> Message:
    t = time.time() if now is None else now
    seconds = int(t)
    return {
        "event": name,
        "data": data,
        "timestamp": {"seconds": seconds, "microseconds": int((t - seconds) * 1_000_000)},
    }


class FrameError(QmpfdError):
    """A line that is not a QMP request; the connection stays usable."""

    error_class = "GenericError"


def parse_request(line: bytes) -> Message:
    """Decode one line into a request object, or raise :class:`FrameError` saying why not."""
    try:
        obj = line.value if isinstance(line, Framed) else json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"JSON parse error: {exc}") from exc
    if not isinstance(obj, dict):
        raise FrameError("QMP input must be a JSON object")
    return obj


def check_request(obj: Message) -> tuple[str, dict[str, Any]]:
    """Validate the envelope (not the arguments): return the command name and its arguments."""
    unknown = set(obj) - {"execute", "arguments", "id", "control"}
    if unknown:
        raise InvalidRequest(f"QMP input member '{sorted(unknown)[0]}' is unexpected")
    name = obj.get("execute")
    if not isinstance(name, str):
        raise InvalidRequest("QMP input lacks member 'execute' (a string)")
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        raise InvalidRequest("QMP input member 'arguments' must be an object")
    return name, args


def may_hold_nul(line: bytes) -> bool:
    """False when no string decoded from ``line`` can hold a NUL, so :func:`find_nul` need not
    walk the request: JSON writes a NUL only as the escape ``\\u0000`` (the parser refuses a raw
    control character), and text in UTF-16 or UTF-32, which the parser also reads, has zero
    bytes of its own."""
    return b"\\u0000" in line or b"\0" in line


def find_nul(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) holding a NUL byte, or None. No QMP command
    takes one, and a path or id with NUL would fail deep in the OS instead of at the door."""
    if isinstance(value, str):
        return path if "\0" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            key = str(k).replace("\0", "\\0")
            here = f"{path}.{key}" if path else key
            if "\0" in str(k):
                return here
            found = find_nul(v, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = find_nul(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None
