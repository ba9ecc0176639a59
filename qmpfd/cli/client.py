"""Talking to qmpfd: one QMP call (with a spinner on a terminal), the event stream, and reading
an attach request from a file."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.error import QMPError

from qmpfd.cli.errors import CliError


class Spinner:
    """A progress line on stderr while a slow command runs (only on a terminal): what it waits
    for, the seconds so far and, when known, the timeout."""

    def __init__(self, label: str, timeout: float | None = None) -> None:
        self.label = label
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._width = 0

    async def _spin(self) -> None:
        started = time.monotonic()
        limit = f" of {self.timeout:g} s timeout" if self.timeout else ""
        for ch in itertools.cycle("|/-\\"):
            line = f"\r{self.label} {ch} {time.monotonic() - started:.1f} s{limit}"
            self._width = max(self._width, len(line))
            sys.stderr.write(line)
            sys.stderr.flush()
            await asyncio.sleep(0.2)

    def __enter__(self) -> Spinner:
        if sys.stderr.isatty():
            self._task = asyncio.get_running_loop().create_task(self._spin())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            sys.stderr.write("\r" + " " * self._width + "\r")


def refusal_reason(sock: str) -> str | None:
    """What qmpfd said when it turned the connection away (instead of a greeting it sends one
    error object and closes): its own reason, not a client-library complaint."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(sock)
            first = s.makefile("rb").readline()
        msg = json.loads(first)
    except (OSError, ValueError):
        return None
    if isinstance(msg, dict) and isinstance(msg.get("error"), dict):
        return str(msg["error"].get("desc"))
    return None


async def connect(sock: str) -> QMPClient:
    client = QMPClient("qmpfctl")
    try:
        await client.connect(sock)
    except (QMPError, OSError) as exc:
        reason = await asyncio.to_thread(refusal_reason, sock)
        if reason:
            raise CliError("GenericError", f"qmpfd at {sock} refused the connection: "
                                           f"{reason}") from None
        cause = exc.__cause__ if isinstance(exc, QMPError) and exc.__cause__ else exc
        text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise CliError("GenericError", f"cannot reach qmpfd at {sock}: {text}") from None
    return client


async def call(sock: str, command: str, args: dict[str, Any] | None,
               label: str | None = None, timeout: float | None = None) -> Any:
    client = await connect(sock)
    try:
        if label and timeout is None and args and "vm" in args and command == "device-detach":
            with contextlib.suppress(ExecuteError):
                policy = await client.execute("query-policy", {"vm": args["vm"]})
                timeout = float(policy["timeouts"]["unplug"])  # type: ignore[index]
        with Spinner(label or f"{command} ...", timeout):
            return await client.execute(command, args)
    except ExecuteError as exc:
        raise CliError(exc.error_class, str(exc)) from None
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def follow_events(sock: str, as_json: bool) -> None:
    client = await connect(sock)
    listener = EventListener()
    client.register_listener(listener)
    async for ev in listener:
        if as_json:
            print(json.dumps(dict(ev)), flush=True)
        else:
            data: dict[str, Any] = dict(ev)
            ts = data["timestamp"]
            print(f"{ts['seconds']}.{ts['microseconds']:06d} {ev['event']} "
                  f"{json.dumps(ev.get('data', {}))}", flush=True)


def load_attach_request(vm: str, source: str) -> tuple[str, dict[str, Any]]:
    """(command, arguments) for a JSON or libvirt-style XML attach file."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise CliError("InvalidRequest", f"{source}: cannot read it: {exc.strerror or exc}",
                       status=2) from None
    except UnicodeDecodeError:
        raise CliError("InvalidRequest", f"{source}: not a text file", status=2) from None
    if text.lstrip().startswith("<"):
        return "device-attach-xml", {"vm": vm, "xml": text}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError("InvalidRequest", f"{source}: not JSON: {exc}", status=2) from exc
    if isinstance(doc, list):
        doc = {"functions": doc}
    if not isinstance(doc, dict):
        raise CliError("InvalidRequest", f"{source}: expected an object or a list of functions",
                       status=2)
    return "device-attach", {**doc, "vm": vm}


