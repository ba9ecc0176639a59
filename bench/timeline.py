"""Where a 1-function attach's time goes inside the daemon: wall-clock marks at the entry and
exit of the functions on the request's path, the median of each over N attaches (a pc guest,
attach/detach cycles), in microseconds from the moment the request's bytes are taken off the socket.

    .venv/bin/python -m bench.timeline [--cycles 150] [--source DIR] [--calls] [--functions N]

``--calls``: instead of times, the function calls the daemon makes from the request's bytes
read to the ``device_add``'s write (``sys.setprofile``; the marks' own wrappers left out):
Python and C calls per attach (median), and the functions called most, by module.

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
    ("qmpfd.api.framing", "JsonSplitter", "feed", "request framed"),
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
#: --calls: the calls of the request being read ("py"/"c", module, function), per request
_counting = False
_calls: list[tuple[str, str, str]] = []
_call_lists: list[list[tuple[str, str, str]]] = []


def _count(frame: Any, event: str, arg: Any) -> None:
    if event == "call":
        code = frame.f_code
        if not code.co_filename.endswith("timeline.py"):
            _calls.append(("py", frame.f_globals.get("__name__", "?"), code.co_name))
    elif event == "c_call":
        _calls.append(("c", getattr(arg, "__module__", None) or "builtins",
                       getattr(arg, "__qualname__", repr(arg))))


def _counting_from_read() -> None:
    global _calls
    if _calls:
        _call_lists.append(_calls)
    _calls = []
    sys.setprofile(_count)


def _counting_to_write() -> None:
    sys.setprofile(None)


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

    protocol = asyncio.StreamReaderProtocol
    received = protocol.data_received

    def read(self: Any, data: bytes) -> None:     # a client's bytes taken off the socket
        global _marks
        if any(n.startswith("command") for n, _ in _marks):
            _requests.append(_marks)
        _marks = []
        _mark("request's bytes read")
        if _counting and b"device-attach" in data:
            _counting_from_read()
        received(self, data)
    protocol.data_received = read  # type: ignore[method-assign]

    async def each_request(self: Any, line: bytes) -> Any:
        _mark("request >")
        return await handle(self, line)
    session._handle = each_request
    direct = importlib.import_module("qmpfd.qemu.direct").DirectClient
    route = direct._route
    if _counting:
        write = direct._write

        def written(self: Any, *a: Any, **k: Any) -> Any:
            _counting_to_write()
            return write(self, *a, **k)
        direct._write = written

    def routed(self: Any, msg: dict[str, Any]) -> bool:
        if "return" in msg or "error" in msg:
            _mark("QEMU's reply read")
        return bool(route(self, msg))
    direct._route = routed
    return missing


def _report_calls(out: Path) -> None:
    lists = [c for c in _call_lists[5:] if c]      # the first ones warm the daemon up
    if not lists:
        out.write_text("no calls counted\n")
        return
    py = [sum(1 for k, _, _ in c if k == "py") for c in lists]
    cc = [len(c) - n for c, n in zip(lists, py, strict=True)]
    per_fn: dict[tuple[str, str, str], int] = {}
    per_module: dict[str, int] = {}
    for c in lists:
        for key in c:
            per_fn[key] = per_fn.get(key, 0) + 1
            if key[0] == "py":
                per_module[key[1]] = per_module.get(key[1], 0) + 1
    n = len(lists)
    lines = [f"{n} attaches, from the request's bytes read to the device_add's write: "
             f"Python calls {statistics.median(py):.0f}, C calls {statistics.median(cc):.0f} "
             "(median)", "", "Python calls per request, by module:"]
    lines += [f"  {m:40s} {c / n:6.1f}" for m, c in
              sorted(per_module.items(), key=lambda kv: -kv[1])[:25]]
    lines += ["", "every function called, by module (calls per request):"]
    lines += [f"  {k:2s} {m + '.' + f:60s} {c / n:6.1f}" for (k, m, f), c in
              sorted(per_fn.items(), key=lambda kv: (kv[0][0], -per_module.get(kv[0][1], 0),
                                                     kv[0][1], -kv[1]))]
    out.write_text("\n".join(lines) + "\n")


def _report(out: Path, missing: list[str]) -> None:
    if _counting:
        _report_calls(out)
        return
    if any(n.startswith("command") for n, _ in _marks):
        _requests.append(_marks)
    per: dict[str, list[float]] = {}
    for marks in _requests[5:]:          # the first ones warm the daemon up
        first: dict[str, float] = {}
        for name, t in marks:
            first.setdefault(name, (t - marks[0][1]) / 1000)
        for name, us in first.items():
            per.setdefault(name, []).append(us)
    lines = [f"{len(_requests)} attaches; median us from the request's bytes read"]
    lines += [f"{n:28s} {statistics.median(v):8.1f}"
              for n, v in sorted(per.items(), key=lambda kv: statistics.median(kv[1]))]
    if missing:
        lines.append("not in this checkout: " + ", ".join(missing))
    out.write_text("\n".join(lines) + "\n")


def daemon(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calls", action="store_true")
    args, rest = ap.parse_known_args(argv)
    global _counting
    _counting = args.calls
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
    ap.add_argument("--calls", action="store_true",
                    help="count the calls before the device_add's write instead of timing")
    ap.add_argument("--functions", type=int, default=1, help="functions per attach (1-8)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmpfd-timeline-"))
    out = work / "timeline.txt"

    class Marked(Daemon):
        def _command(self, cfg: Path) -> list[str]:
            # run as a script: qmpfd comes from PYTHONPATH (the checkout measured)
            return [sys.executable, str(ROOT / "bench" / "timeline.py"), "--daemon",
                    "--out", str(out), *(["--calls"] if args.calls else []),
                    "--config", str(cfg)]

    vm = LabVm("timeline", work / "vm", LabVmSpec(machine="pc"))
    vm.start()
    try:
        os.environ["PYTHONPATH"] = str(args.source or ROOT)
        d = Marked(work / "d")
        await cycles(d.sock, vm, args.functions, args.cycles, d)
        d.stop()
    finally:
        vm.stop()
    print(out.read_text(), end="")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--daemon"]:
        daemon(sys.argv[2:])
    else:
        asyncio.run(main())
