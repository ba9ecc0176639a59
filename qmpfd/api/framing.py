"""Cutting a byte stream into QMP messages (as QEMU's json-streamer does), with the limits a
hostile client meets: size and nesting depth. Pure: no I/O."""

from __future__ import annotations

import json
import re
from typing import Any


class Oversized:
    """Marker the splitter yields in place of a message that exceeded the size cap."""


OVERSIZED = Oversized()

#: Deepest nesting of objects and arrays a request may have. QMP commands nest a few levels
#: (blockdev-add through vm-qmp: about 6); a bound keeps a hostile request from exhausting the
#: parser's recursion, and it is checked while splitting, before anything is parsed.
MAX_DEPTH = 32
_DECODER = json.JSONDecoder()
_SPACE = re.compile(rb"[ \t\r\n]*")


class Framed(bytes):
    """A message the decoder cut (:meth:`JsonSplitter._whole_messages`), with the value it
    decoded to: the request is not parsed a second time."""

    value: Any


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
        if self._idle() and data.isascii():
            data = self._whole_messages(data, out)
        self._scan(data, out)
        return out

    def _idle(self) -> bool:
        return not (self._buf or self._discarding or self._too_deep is not None)

    def _whole_messages(self, data: bytes, out: list[bytes | Oversized | TooDeep]) -> bytes:
        """The common case at C speed: whole, ordinary messages at the start of ``data`` cut by
        the JSON decoder. Returns the rest, from the first message that is incomplete, malformed
        or unusual (a raw newline inside, near the limits), for the byte scanner, which gives
        the same cut for everything this one accepts."""
        text = data.decode("ascii")
        i, n = 0, len(text)
        while i < n:
            j = _SPACE.match(data, i).end()    # type: ignore[union-attr]  # always matches
            start = data.rfind(b"\n", i, j) + 1 or i    # blanks after a newline: kept
            if j == n:
                return data[start:]               # blanks only: the scanner keeps them
            if text[j] not in "{[":
                return data[start:]
            try:
                value, end = _DECODER.raw_decode(text, j)
            except (ValueError, RecursionError):
                return data[start:]
            msg = data[start:end]
            if (end - start > self._limit or b"\n" in msg
                    or msg.count(b"{") + msg.count(b"[") > MAX_DEPTH):
                return data[start:]
            framed = Framed(msg)
            framed.value = value
            out.append(framed)
            i = end
        return b""

    def _scan(self, data: bytes, out: list[bytes | Oversized | TooDeep]) -> None:
        """Byte by byte: messages split across reads, malformed lines, and the limits."""
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
