"""libvirt 9.0 side of the benchmark; run by the system python3 (python3-libvirt).

    /usr/bin/python3 bench/libvirt_bench.py WORKDIR RUNS   -> one JSON line on stdout

Sets libvirt up as ../shared/design/libvirt-comparison.md describes (root, no systemd), starts
virtlogd and libvirtd, defines a TCG domain booting the lab's guest, times attachDeviceFlags /
detachDeviceFlags of one virtio-rng function, and records the multifunction cases libvirt refuses.
Stops the daemons it started, by pid.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parents[1]
QEMU_CONF = """user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
dynamic_ownership = 0
"""


def prepare() -> list[int]:
    for d in ("/var/log/libvirt", "/var/run/libvirt", "/var/lib/libvirt/qemu",
              "/var/cache/libvirt"):
        os.makedirs(d, exist_ok=True)
    for group in ("kvm", "libvirt-qemu", "tss"):
        subprocess.run(["groupadd", "-f", "--system", group], check=False)
    for user in ("libvirt-qemu", "tss"):
        subprocess.run(["useradd", "--system", "--no-create-home", "-g", user, user],
                       check=False, stderr=subprocess.DEVNULL)
    conf = Path("/etc/libvirt/qemu.conf")
    if conf.exists() and not conf.with_suffix(".conf.qmpfd-bench").exists():
        conf.rename(conf.with_suffix(".conf.qmpfd-bench"))
    conf.write_text(QEMU_CONF)
    pids = []
    for cmd, sock in ((["virtlogd"], "/var/run/libvirt/virtlogd-sock"),
                      (["libvirtd"], "/var/run/libvirt/libvirt-sock")):
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open("/tmp/qmpfd-bench-libvirtd.log", "ab"))
        pids.append(proc.pid)
        wait(lambda: os.path.exists(sock), 30)  # noqa: B023
    return pids


def restore(pids: list[int]) -> None:
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    conf = Path("/etc/libvirt/qemu.conf")
    saved = conf.with_suffix(".conf.qmpfd-bench")
    if saved.exists():
        saved.rename(conf)


def domain_xml(work: Path) -> str:
    kernel = sorted(glob.glob(str(ROOT / ".cache/lab/kernel-amd64/boot/vmlinuz-*")))[-1]
    initrd = sorted(glob.glob(str(ROOT / ".cache/lab/initramfs-amd64-*.cpio.gz")))[-1]
    return f"""<domain type='qemu'>
  <name>qmpfd-bench</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel>
      <initrd>{initrd}</initrd><cmdline>console=ttyS0 quiet</cmdline></os>
  <features><acpi/></features>
  <devices>
    <serial type='file'><source path='{work}/console.log'/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>"""


RNG = """<rng model='virtio'><backend model='random'>/dev/urandom</backend>{addr}</rng>"""


def guest_pci(work: Path) -> set[str]:
    text = (work / "console.log").read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if "PCI-DEVICES:" in ln]
    return set(lines[-1].split("PCI-DEVICES:")[1].split()) if lines else set()


def wait(cond, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise TimeoutError


def main() -> None:
    work = Path(sys.argv[1])
    runs = int(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    pids = prepare()
    out: dict[str, object] = {}
    dom = None
    try:
        conn = libvirt.open("qemu:///system")
        out["libvirt"] = ".".join(map(str, divmod(conn.getLibVersion(), 1000000)))
        dom = conn.createXML(domain_xml(work), 0)
        wait(lambda: guest_pci(work), 120)
        attach, seen, detach = [], [], []
        for _ in range(runs):
            before = guest_pci(work)
            t = time.perf_counter()
            dom.attachDeviceFlags(RNG.format(addr=""), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            attach.append(time.perf_counter() - t)
            wait(lambda: len(guest_pci(work) - before) >= 1)  # noqa: B023
            seen.append(time.perf_counter() - t)
            xml = dom.XMLDesc(0)
            rng = xml[xml.index("<rng"):xml.index("</rng>") + 6]
            t = time.perf_counter()
            dom.detachDeviceFlags(rng, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            wait(lambda: guest_pci(work) == before)  # noqa: B023
            detach.append(time.perf_counter() - t)
        out["attach_one"] = attach
        out["attach_one_guest"] = seen
        out["detach_one"] = detach
        refused = {}
        addr = "<address type='pci' domain='0x0000' bus='0x00' slot='0x10' function='0x1'/>"
        for case, xml in (("function 1 of a slot", RNG.format(addr=addr)),
                          ("<devices> with two functions",
                           "<devices>" + RNG.format(addr=addr.replace("0x1'", "0x0'")) +
                           RNG.format(addr=addr) + "</devices>")):
            try:
                dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                refused[case] = "accepted"
            except libvirt.libvirtError as exc:
                refused[case] = str(exc)
        out["refused"] = refused
    except Exception as exc:  # report, then clean up
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except Exception:
                pass
        restore(pids)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
