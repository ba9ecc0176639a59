"""Support for the fault-injection matrix: a restartable qmpfd, a cuttable QMP pipe, the table."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class DaemonProcess:
    """A qmpfd process that tests can SIGKILL and start again on the same state directory."""

    def __init__(self, workdir: Path, extra_config: str = "", daemon_config: str = "",
                 access_config: str = 'qmp-dirs = ["/tmp"]') -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "qmpfd.sock"
        self.config = workdir / "qmpfd.toml"
        self.config.write_text(f"""
[daemon]
socket = "{self.socket}"
state-dir = "{workdir / 'state'}"
log-level = "debug"
{daemon_config}

[access]
{access_config}
{extra_config}
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def run_once(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Start qmpfd expecting it to refuse: its exit status and output."""
        return subprocess.run(
            [sys.executable, "-m", "qmpfd.daemon", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    @property
    def pause_mark(self) -> Path:
        return self.workdir / "paused-at-fault-point"

    def start(self, *args: str, **env: str) -> None:
        """Start qmpfd; with ``QMPFD_PAUSE_AT`` in ``env``, :meth:`at_pause` waits for it to
        arrive there and :meth:`release` lets it go on."""
        self.runs += 1
        if "QMPFD_PAUSE_AT" in env:
            self.pause_mark.unlink(missing_ok=True)
            env = {"QMPFD_PAUSE_MARK": str(self.pause_mark), **env}
        log = (self.workdir / f"qmpfd-{self.runs}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qmpfd.daemon", "--config", str(self.config), *args],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qmpfd exited: {self.log()}")
            if self.socket.exists() and self._answers():
                return
            if time.monotonic() > deadline:
                raise TimeoutError("qmpfd did not start")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
                return True
        except OSError:
            return False

    async def at_pause(self, timeout: float = 60) -> None:
        """Wait until the daemon stands at its ``QMPFD_PAUSE_AT`` point."""
        deadline = time.monotonic() + timeout
        while not self.pause_mark.exists():
            assert self.proc is not None and self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "the daemon never reached its pause point"
            await asyncio.sleep(0.02)

    def release(self) -> None:
        """Let the daemon go on from its pause point."""
        self.pause_mark.unlink(missing_ok=True)

    def wait_killed(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return (self.workdir / f"qmpfd-{self.runs}.log").read_text()[-3000:]

    def logged(self, text: str, timeout: float = 10) -> bool:
        """Whether ``text`` shows in the log within ``timeout`` s (the daemon's log thread
        writes a line a moment after the call that made it)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


class QmpPipe:
    """A Unix-socket pipe between qmpfd and QEMU's QMP socket that a test can cut and restore,
    to close the QMP connection under qmpfd without touching QEMU. Bytes pass unchanged."""

    def __init__(self, listen: Path, target: Path) -> None:
        self.listen = listen
        self.target = target
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self.listen.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(self.listen))
        srv.listen(4)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.target))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Close the listening socket and every connection through it."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.listen.unlink(missing_ok=True)
        with self._lock:
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._conns.clear()


@dataclass
class MatrixRow:
    fault: str
    expected: str
    qemu: str
    guest: str
    qmpfd: str
    verdict: str


MATRIX: list[MatrixRow] = []
#: Rows of the QEMU version matrix (tests/integration/test_versions.py) as observed:
#: (QEMU version, machine, what was done, what the referees saw).
VERSION_MATRIX: list[tuple[str, str, str, str]] = []


def render_version_matrix(rows: list[tuple[str, str, str, str]]) -> str:
    """One line per QEMU version and machine: what passed there."""
    cells: dict[tuple[str, str], list[str]] = {}
    for version, machine, what, _ in rows:
        cells.setdefault((version, machine), []).append(what)
    return "\n".join(f"| {v} | {m} | {len(w)}: {'; '.join(w)} |"
                     for (v, m), w in sorted(cells.items()))


def render_matrix(rows: list[MatrixRow]) -> str:
    head = ("fault", "expected outcome", "QEMU (qom-list/query-pci)", "guest PCI list",
            "qmpfd state", "result")
    cells = [head] + [(r.fault, r.expected, r.qemu, r.guest, r.qmpfd, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(head))) + " |"
             for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
