"""The daemon as systemd runs it: readiness notification, socket activation, SIGTERM, the units."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def qmp_roundtrip(path: Path) -> dict[str, object]:
    import json

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rb")
        json.loads(f.readline())
        s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-version","id":1}')
        json.loads(f.readline())
        reply: dict[str, object] = json.loads(f.readline())
        return reply


def test_ready_notification_after_the_socket_listens(tmp_path: Path) -> None:
    notify = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(20)
    sock = tmp_path / "api.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpfd.daemon", "--socket", str(sock), "--state-dir",
         str(tmp_path / "state")], env={**os.environ, "NOTIFY_SOCKET": str(notify)},
        stderr=subprocess.DEVNULL)
    try:
        msg = listener.recv(4096)
        assert msg == b"READY=1"
        assert sock.exists(), "READY=1 was sent before the socket existed"
        assert oct(sock.stat().st_mode & 0o777) == oct(0o660)
        assert "return" in qmp_roundtrip(sock)
        proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096) == b"STOPPING=1"
        assert proc.wait(15) == 0
        assert not sock.exists()
    finally:
        proc.kill()
        listener.close()


def test_socket_activation_uses_the_inherited_socket(tmp_path: Path) -> None:
    assert shutil.which("systemd-socket-activate"), \
        "systemd-socket-activate missing: apt-get install systemd (scripts/setup does)"
    sock = tmp_path / "activated.sock"
    flag_sock = tmp_path / "not-used.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), sys.executable, "-m", "qmpfd.daemon",
         "--socket", str(flag_sock), "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # systemd-socket-activate starts qmpfd on the first connection, like systemd does.
        assert "return" in qmp_roundtrip(sock)
        assert not flag_sock.exists(), "qmpfd created its own socket despite LISTEN_FDS"
    finally:
        proc.terminate()
        proc.wait(15)


def test_units_verify() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install systemd (scripts/setup does)"
    unit_dir = ROOT / "systemd"
    out = subprocess.run([analyze, "verify", str(unit_dir / "qmpfd.service"),
                          str(unit_dir / "qmpfd.socket")], capture_output=True, text=True)
    # The one complaint allowed: qmpfd is not installed under /opt/qmpfd on a test machine
    # (tests/integration/test_install.py verifies the units as scripts/install installs them).
    problems = [line for line in out.stderr.splitlines()
                if line.strip() and "Command /opt/qmpfd/bin/qmpfd is not executable" not in line]
    assert not problems, out.stderr


def test_bad_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[timeouts]\ncommand = -3\n")
    out = subprocess.run([sys.executable, "-m", "qmpfd.daemon", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2
    assert "timeouts.command" in out.stderr


def test_service_is_hardened() -> None:
    """The hardening the unit promises stays in the unit (systemd-analyze verify checks syntax)."""
    text = (ROOT / "systemd" / "qmpfd.service").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["ProtectSystem"] == "strict"
    assert set(settings["ReadWritePaths"].split()) == {"/var/lib/qmpfd", "/run/qmpfd"}
    assert settings["NoNewPrivileges"] == "yes"
    caps = set(settings["CapabilityBoundingSet"].split())
    assert "CAP_SYS_ADMIN" not in caps and caps <= {
        "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_CHOWN"}
    assert settings.get("ProtectKernelTunables", "no") == "no", "sysfs binding needs /sys"
    for key, value in {"PrivateNetwork": "yes", "RestrictAddressFamilies": "AF_UNIX",
                       "ProtectProc": "invisible", "ProcSubset": "pid", "WatchdogSec": "30",
                       "LimitNOFILE": "65536", "PrivateDevices": "yes"}.items():
        assert settings.get(key) == value, key
    assert settings["ExecReload"].endswith("kill -HUP $MAINPID")
    assert settings["ExecStart"].startswith("/opt/qmpfd/bin/qmpfd ")


def exposure(unit: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=60)
    line = next(ln for ln in out.stdout.splitlines() if "Overall exposure level" in ln)
    return float(line.split(":")[1].split()[0])


def libvirtd_unit(tmp_path: Path) -> Path | None:
    """libvirtd.service from Debian's own package (downloaded, not installed), to compare."""
    installed = Path("/lib/systemd/system/libvirtd.service")
    if installed.exists():
        return installed
    got = subprocess.run(["apt-get", "download", "-qq", "libvirt-daemon-system"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    debs = list(tmp_path.glob("libvirt-daemon-system_*.deb"))
    if got.returncode != 0 or not debs:
        return None
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp_path / "x")], check=True)
    found = list((tmp_path / "x").glob("**/libvirtd.service"))
    return found[0] if found else None


def test_security_exposure_is_printed_beside_libvirtds(tmp_path: Path) -> None:
    ours = exposure(ROOT / "systemd" / "qmpfd.service")
    print(f"\nsystemd-analyze security --offline=yes: qmpfd.service {ours}")
    assert ours <= 2.0, ours
    theirs_unit = libvirtd_unit(tmp_path)
    # Not dropped quietly: without Debian's libvirtd unit there is nothing to compare with.
    assert theirs_unit is not None, \
        "libvirtd.service could not be had (apt-get download libvirt-daemon-system)"
    theirs = exposure(theirs_unit)
    print(f"systemd-analyze security --offline=yes: libvirtd.service {theirs}")
    assert ours < theirs


def test_watchdog_pings_come_from_the_event_loop(tmp_path: Path) -> None:
    """WatchdogSec: a healthy daemon keeps pinging; a stopped one (its loop not turning) does
    not, and pings again once it runs."""
    notify = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(5)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpfd.daemon", "--socket", str(tmp_path / "api.sock"),
         "--state-dir", str(tmp_path / "state")],
        env={**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "400000"},
        stderr=subprocess.DEVNULL)

    def pings(seconds: float) -> int:
        n, end = 0, time.monotonic() + seconds
        listener.settimeout(0.1)
        while time.monotonic() < end:
            try:
                n += listener.recv(4096) == b"WATCHDOG=1"
            except TimeoutError:
                pass
        return n
    try:
        listener.settimeout(20)
        assert listener.recv(4096) == b"READY=1"
        assert pings(2.0) >= 6                      # every 0.2 s (half of WATCHDOG_USEC)
        proc.send_signal(signal.SIGSTOP)
        pings(0.3)                                  # drain what was already queued
        assert pings(1.5) == 0, "pings while the daemon was not running"
        proc.send_signal(signal.SIGCONT)
        assert pings(1.5) >= 3
    finally:
        proc.kill()
        listener.close()


def test_reload_rereads_the_config_and_keeps_clients(tmp_path: Path) -> None:
    import json

    cfg = tmp_path / "qmpfd.toml"
    sock = tmp_path / "api.sock"
    base = f'[daemon]\nsocket = "{sock}"\nstate-dir = "{tmp_path}/state"\n'
    access = f'[access]\nqmp-dirs = ["{tmp_path}"]\n'
    cfg.write_text(base + access + 'qmp-passthrough = false\n')
    qmp = tmp_path / "vm.qmp"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "32", "-S",
                             "-nodefaults", "-display", "none",
                             "-qmp", f"unix:{qmp},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, "-m", "qmpfd.daemon", "--config", str(cfg)],
                            stderr=(tmp_path / "log").open("wb"))
    try:
        appears(sock, 30, proc)
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(10)
        client.connect(str(sock))
        f = client.makefile("rb")
        json.loads(f.readline())
        client.sendall(b'{"execute":"qmp_capabilities"}\n')
        json.loads(f.readline())

        def passthrough() -> str:
            client.sendall(b'{"execute":"vm-qmp","arguments":{"vm":"x","command":"q"}}\n')
            return str(json.loads(f.readline())["error"]["class"])

        def vm_connected() -> bool:
            client.sendall(b'{"execute":"query-vms"}\n')
            return bool(json.loads(f.readline())["return"][0]["connected"])
        appears(qmp, 30, qemu)
        client.sendall(json.dumps({"execute": "vm-add", "arguments": {
            "name": "x1", "qmp": str(qmp)}}).encode() + b"\n")
        assert "return" in json.loads(f.readline())
        assert passthrough() == "Unsupported"       # passthrough off
        link = qmp_connection(qmp, proc.pid)
        assert link is not None, "the kernel shows no connection from qmpfd to QEMU's socket"
        cfg.write_text(base + access + 'qmp-passthrough = true\n')
        proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            if passthrough() == "NotFound":          # on now: it looks for the VM
                break
            time.sleep(0.1)
        else:
            raise AssertionError("reload did not apply the new config")
        assert vm_connected(), "reload dropped the VM's QMP connection"
        # The kernel's view, not qmpfd's: the very connection to QEMU's socket is still there.
        assert qmp_connection(qmp, proc.pid) == link, "reload replaced the QMP connection"
        cfg.write_text(base + access + 'qmp-passthrough = "maybe"\n')   # does not load
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "config reload refused" not in (log := (tmp_path / "log").read_text()):
            assert proc.poll() is None, "a bad config on reload stopped the daemon"
            assert time.monotonic() < deadline, "the refused reload was never logged"
            time.sleep(0.05)
        assert proc.poll() is None, "a bad config on reload stopped the daemon"
        assert passthrough() == "NotFound", "the running config was not kept"
        assert "config reload refused; keeping the running config" in log
        assert "access.qmp-passthrough" in log
        assert vm_connected()
        client.close()
    finally:
        proc.terminate()
        proc.wait(15)
        qemu.kill()
        qemu.wait()


def appears(path: Path, seconds: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``path`` exists; fail at once if ``proc`` (which makes it) died, or after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds:g} s"
        time.sleep(0.05)


def qmp_connection(qmp: Path, pid: int) -> str | None:
    """The socket inode of ``pid``'s connection to the listening socket ``qmp``, as the kernel
    reports it (``ss``: QEMU's accepted end names the path and its peer's inode)."""
    out = subprocess.run(["ss", "-xpH", "state", "established"], capture_output=True,
                         text=True, timeout=30).stdout
    peers = {ln.split()[-2] for ln in out.splitlines() if f" {qmp} " in f" {ln} "}
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    found = sorted(peers & mine)
    return found[0] if found else None

