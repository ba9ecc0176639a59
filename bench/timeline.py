"""Where a 1-function attach's time goes inside the daemon: wall-clock marks at the entry and
exit of the functions on the request's path, the median of each over N attaches (a pc guest,
attach/detach cycles), in microseconds from the moment the session starts handling the request.

    .venv/bin/python -m bench.timeline [--cycles 150] [--source DIR]

The daemon runs as ``python -m bench.timeline --daemon --config FILE``: the marks are put on
the functions before it starts and written to ``--out`` when it stops. Each mark costs a
microsecond or two; a function renamed or gone is skipped (listed at the end), so the tool runs
on older checkouts too (``--source``: another checkout of qmpfd, as in bench/ab_cpu.py).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import importlib
import inspect
import os
import runpy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: (module, class or None, function, label): the request's path, in order
MARKED = [
    ("qmpfd.api.models", None, "parse_args", "argument model"),
    ("qmpfd.api.commands", "Commands", "device_attach", "command"),
    ("qmpfd.vm.managed", "ManagedVm", "typed", "property types"),
    ("qmpfd.vm.operations", None, "plan_and_reserve", "plan"),
    ("qmpfd.vm.operations", None, "_journaled", "journal"),
    ("qmpfd.vm.operations", None, "execute_attach", "executor"),
    ("qmpfd.qemu.direct", "DirectClient", "_write", "device_add written"),
    ("qmpfd.api.session", "Session", "_write_now", "reply written"),
    ("qmpfd.api.session", "Session", "_send", "reply sent"),
]

_marks: list[tuple[str, int]] = []
_requests: list[list[tuple[str, int]]] = []


def _mark(name: str) -> None:
    _marks.append((name, time.perf_counter_ns()))


def _wrapped(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def coro(*a: Any, **k: Any) -> Any:
            _mark(label + " >")
            try:
                return await fn(*a, **k)
            finally:
                _mark(label + " <")
        return coro

    @functools.wraps(fn)
    def plain(*a: Any, **k: Any) -> Any:
        _mark(label + " >")
        try:
            return fn(*a, **k)
        finally:
            _mark(label + " <")
    return plain


def _install() -> list[str]:
    """Put the marks on; the labels whose function this checkout does not have."""
    missing = []
    for module, cls, name, label in MARKED:
        owner: Any = importlib.import_module(module)
        if cls is not None:
            owner = getattr(owner, cls, None)
        if owner is None or not hasattr(owner, name):
            missing.append(label)
            continue
        setattr(owner, name, _wrapped(getattr(owner, name), label))
    session = importlib.import_module("qmpfd.api.session").Session
    handle = session._handle

    async def each_request(self: Any, line: bytes) -> Any:
        global _marks
        if any(n.startswith("command") for n, _ in _marks):
            _requests.append(_marks)
        _marks = []
        _mark("request >")
        return await handle(self, line)
    session._handle = each_request
    direct = importlib.import_module("qmpfd.qemu.direct").DirectClient
    route = direct._route

    def routed(self: Any, msg: dict[str, Any]) -> bool:
        if "return" in msg or "error" in msg:
            _mark("QEMU's reply read")
        return bool(route(self, msg))
    direct._route = routed
    return missing


def _report(out: Path, missing: list[str]) -> None:
    if any(n.startswith("command") for n, _ in _marks):
        _requests.append(_marks)
    per: dict[str, list[float]] = {}
    for marks in _requests[5:]:          # the first ones warm the daemon up
        first: dict[str, float] = {}
        for name, t in marks:
            first.setdefault(name, (t - marks[0][1]) / 1000)
        for name, us in first.items():
            per.setdefault(name, []).append(us)
    lines = [f"{len(_requests)} attaches; median us from the request's start"]
    lines += [f"{n:28s} {statistics.median(v):8.1f}"
              for n, v in sorted(per.items(), key=lambda kv: statistics.median(kv[1]))]
    if missing:
        lines.append("not in this checkout: " + ", ".join(missing))
    out.write_text("\n".join(lines) + "\n")


def daemon(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args, rest = ap.parse_known_args(argv)
    missing = _install()
    atexit.register(_report, args.out, missing)
    sys.argv = ["qmpfd.daemon", *rest]
    runpy.run_module("qmpfd.daemon", run_name="__main__")


async def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.bench import Daemon
    from bench.profile_attach import cycles
    from lab.vm import LabVm, LabVmSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=150)
    ap.add_argument("--source", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmpfd-timeline-"))
    out = work / "timeline.txt"

    class Marked(Daemon):
        def _command(self, cfg: Path) -> list[str]:
            # run as a script: qmpfd comes from PYTHONPATH (the checkout measured)
            return [sys.executable, str(ROOT / "bench" / "timeline.py"), "--daemon",
                    "--out", str(out), "--config", str(cfg)]

    vm = LabVm("timeline", work / "vm", LabVmSpec(machine="pc"))
    vm.start()
    try:
        os.environ["PYTHONPATH"] = str(args.source or ROOT)
        d = Marked(work / "d")
        await cycles(d.sock, vm, 1, args.cycles, d)
        d.stop()
    finally:
        vm.stop()
    print(out.read_text(), end="")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--daemon"]:
        daemon(sys.argv[2:])
    else:
        asyncio.run(main())
