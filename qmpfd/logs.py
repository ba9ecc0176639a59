"""Structured logging: one JSON object per line (journald and log shippers parse it), or text.

Lines are formatted and written by a thread of their own (the standard library's
``QueueListener``): on the event loop a log call costs a record and a queue ``put``, and a
stalled stderr (journald busy, a full pipe) never stops a request. The record's message and any
exception are rendered by the caller (their objects may change or go away); the thread makes the
line. The queue is drained at exit and whenever the logging is set up again.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any, TextIO

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """One readable line, with the structured fields (the VM's name, the slot, the error) as
    ``key=value`` after the message: text for people loses nothing JSON would carry."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={_text(v)}" for k, v in record.__dict__.items() if k not in _STANDARD]
        return f"{line} {' '.join(fields)}" if fields else line


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if not text or any(c in text for c in ' "=\n') else text


class _HandOff(logging.handlers.QueueHandler):
    """Puts a record on the writer thread's queue with its message and exception rendered
    now; the line itself is made on the thread."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = _EXC.formatException(record.exc_info)
            record.exc_info = None
        return record


_EXC = logging.Formatter()
_listener: logging.handlers.QueueListener | None = None


def setup(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Log at ``level`` in ``fmt`` (json or text) to ``stream`` (stderr) through a new writer
    thread; the previous one, if any, writes what it was given first and stops."""
    global _listener
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    previous, _listener = _listener, logging.handlers.QueueListener(lines, handler)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_HandOff(lines)]
    root.setLevel(level.upper())
    if previous is not None:
        previous.stop()
    # qemu.qmp logs every failed connect at ERROR; qmpfd reports connection state itself
    # (VM_DISCONNECTED, reconnect attempts at debug), so only its critical messages pass.
    logging.getLogger("qemu").setLevel(logging.CRITICAL)


def stop() -> None:
    """Write every line queued so far and stop the writer thread (at exit; before a new setup)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop)
