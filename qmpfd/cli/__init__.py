"""``qmpfctl``: the command-line client of qmpfd.

It is a plain QMP client (``qemu.qmp.QMPClient``) of qmpfd's socket. Tables and sentences by
default, ``--json`` for scripts (errors too, as the QMP error object). Exit status: 0 success,
1 error reply (or qmpfd unreachable), 2 bad usage, 130 interrupted. Never a traceback: a closed
pipe (``| head``) ends quietly, Ctrl-C says what became of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from qmpfd.cli.client import call, follow_events
from qmpfd.cli.errors import CliError
from qmpfd.cli.parser import DEFAULT_SOCKET, build_parser, request_of, slot_number
from qmpfd.cli.render import host_tree, ranges, render

__all__ = ["DEFAULT_SOCKET", "build_parser", "host_tree", "main", "ranges", "render",
           "request_of", "slot_number"]

INTERRUPTED = 130


def emit(text: str) -> None:
    """Print, and if the reader went away (``| head``), stop quietly as ``cat`` would."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


def completion(shell: str) -> str:
    import shtab

    return str(shtab.complete(build_parser(), shell=shell))


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    command = ""
    try:
        if ns.cmd == "completion":
            emit(completion(ns.shell))
            return 0
        if ns.cmd == "events":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(follow_events(ns.socket, ns.json))
            return 0
        command, args, label = request_of(ns)
        result: Any = asyncio.run(call(ns.socket, command, args, label))
    except CliError as exc:
        if ns.json:
            emit(json.dumps({"error": {"class": exc.error_class, "desc": exc.desc}}))
        else:
            print(f"qmpfctl: {exc.error_class}: {exc.desc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        if command:
            print(f"\nqmpfctl: interrupted; qmpfd carries on with {command} on its own "
                  "(see 'qmpfctl slots VM' and the events)", file=sys.stderr)
        return INTERRUPTED
    emit(json.dumps(result, indent=2) if ns.json else render(command, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
