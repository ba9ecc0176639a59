"""QMP message shapes as qmpfd writes and reads them (QEMU docs/interop/qmp-spec).

Pure functions: no I/O, so framing and error shapes are unit-tested on their own.
"""

from __future__ import annotations

import json
import time
from typing import Any

from qmpfd import VERSION_TUPLE
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
        obj = json.loads(line)
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


class Oversized:
    """Marker the splitter yields in place of a message that exceeded the size cap."""


OVERSIZED = Oversized()

#: Deepest nesting of objects and arrays a request may have. QMP commands nest a few levels
#: (blockdev-add through vm-qmp: about 6); a bound keeps a hostile request from exhausting the
#: parser's recursion, and it is checked while splitting, before anything is parsed.
MAX_DEPTH = 32


class TooDeep:
    """Marker the splitter yields for a message nested deeper than :data:`MAX_DEPTH`.

    ``prefix`` is the message up to the opening bracket that went too deep, closed again with
    the brackets still open: valid JSON of bounded depth, so the path to the deep part can be
    named without parsing the hostile part.
    """

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix

    def path(self) -> str:
        """The field at fault, in the contract's notation (``functions[0].properties.x``)."""
        try:
            node: Any = json.loads(self.prefix)
        except (ValueError, RecursionError):
            return "request"
        parts: list[str] = []
        while isinstance(node, dict | list) and node:
            if isinstance(node, dict):
                key = list(node)[-1]
                parts.append(f".{key}")
                node = node[key]
            else:
                parts.append(f"[{len(node) - 1}]")
                node = node[-1]
        text = "".join(parts).lstrip(".")
        if text.startswith("arguments"):
            text = text.removeprefix("arguments").lstrip(".")
        return text or "arguments"


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


class JsonSplitter:
    """Cuts a byte stream into JSON messages, as QEMU's json-streamer does.

    QMP does not require newlines: ``qemu.qmp`` sends compact objects back to back, so a message
    ends where its outermost brace closes. The contract also promises that a malformed line gets an
    error and leaves the connection usable, so a newline outside a string ends whatever has been
    gathered so far (a complete object never contains a raw newline in compact form).
    A message longer than ``limit`` bytes is dropped up to the next newline and reported as
    :data:`OVERSIZED`, without buffering it.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._discarding = False
        self._open: list[int] = []          # the brackets open now, innermost last
        self._too_deep: TooDeep | None = None

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._open.clear()
        self._too_deep = None

    def feed(self, data: bytes) -> list[bytes | Oversized | TooDeep]:
        out: list[bytes | Oversized | TooDeep] = []
        for byte in data:
            if self._discarding:
                if byte == 0x0A:
                    self._discarding = False
                continue
            if self._too_deep is not None:
                if self._skip_deep(byte, out):
                    continue
            self._buf.append(byte)
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:  # quote
                    self._in_string = False
                elif byte == 0x0A:  # a raw newline cannot be in a JSON string: end of line
                    out.append(bytes(self._buf))
                    self._reset()
                    continue
            elif byte == 0x22:
                self._in_string = True
            elif byte in (0x7B, 0x5B):  # { [
                self._depth += 1
                self._open.append(byte)
                if self._depth > MAX_DEPTH:
                    closers = bytes(0x7D if b == 0x7B else 0x5D for b in reversed(self._open))
                    self._too_deep = TooDeep(bytes(self._buf) + closers)
                    self._buf.clear()
                    continue
            elif byte in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._open:
                    self._open.pop()
                if self._depth <= 0:
                    out.append(bytes(self._buf))
                    self._reset()
                    continue
            elif byte == 0x0A:
                if self._buf.strip():
                    out.append(bytes(self._buf))
                self._reset()
                continue
            if len(self._buf) > self._limit:
                out.append(OVERSIZED)
                self._reset()
                self._discarding = True
        return out

    def _skip_deep(self, byte: int, out: list[bytes | Oversized | TooDeep]) -> bool:
        """Past the depth limit: follow strings and brackets without keeping the bytes, and
        yield the marker where the message ends. True when the byte was consumed."""
        if self._in_string:
            if self._escape:
                self._escape = False
            elif byte == 0x5C:
                self._escape = True
            elif byte == 0x22:
                self._in_string = False
            return byte != 0x0A or self._end_deep(out)
        if byte == 0x22:
            self._in_string = True
        elif byte in (0x7B, 0x5B):
            self._depth += 1
        elif byte in (0x7D, 0x5D):
            self._depth -= 1
            if self._depth <= 0:
                return self._end_deep(out)
        elif byte == 0x0A:
            return self._end_deep(out)
        return True

    def _end_deep(self, out: list[bytes | Oversized | TooDeep]) -> bool:
        assert self._too_deep is not None
        out.append(self._too_deep)
        self._reset()
        return True
