"""Talking to qmpfd through :mod:`qmpfd.client`: one call (with a spinner on a terminal), the
event stream, and reading an attach request from a file."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from qmpfd.cli.errors import CliError
from qmpfd.client import Client, QmpfdClientError


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


async def connect(sock: str) -> Client:
    try:
        return await Client.open(sock, "qmpfctl")
    except QmpfdClientError as exc:
        raise CliError("GenericError", exc.desc) from None


async def call(sock: str, command: str, args: dict[str, Any] | None,
               label: str | None = None, timeout: float | None = None) -> Any:
    client = await connect(sock)
    try:
        if label and timeout is None and args and "vm" in args and command == "device-detach":
            with contextlib.suppress(QmpfdClientError):
                policy = await client.query_policy(str(args["vm"]))
                timeout = float(policy["timeouts"]["unplug"])
        with Spinner(label or f"{command} ...", timeout):
            return await client.execute(command, args)
    except QmpfdClientError as exc:
        raise CliError(exc.error_class, exc.desc) from None
    finally:
        with contextlib.suppress(Exception):
            await client.close()


async def follow_events(sock: str, as_json: bool) -> None:
    client = await connect(sock)
    try:
        async for ev in client.events():
            if as_json:
                print(ev.model_dump_json(), flush=True)
            else:
                ts = ev.timestamp
                print(f"{ts['seconds']}.{ts['microseconds']:06d} {ev.event} "
                      f"{json.dumps(ev.data)}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            await client.close()       # on Ctrl-C too: the connection ends cleanly


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


