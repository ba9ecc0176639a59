"""The demo: qmpfd with a small guest doing a real 4-function hotplug and unplug.

    python -m lab.demo [--machine pc|q35|q35-native|virt|pseries] [--accel tcg|kvm]

``virt`` boots an arm64 guest (qemu-system-aarch64), ``pseries`` a ppc64el one
(qemu-system-ppc64); the others an x86_64 guest.

Starts a lab VM and a qmpfd daemon in a temporary directory, then drives qmpfd with ``qmpfctl``
exactly as an operator would, printing what the guest itself reports after each step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.guest import DEBIAN_ARCH, find_kernel
from lab.vm import LabVm, LabVmSpec, slot_groups

DEVICE = [
    {"id": "nic0", "driver": "e1000"},
    {"id": "nic1", "driver": "e1000"},
    {"id": "rng2", "driver": "virtio-rng-pci"},
    {"id": "net3", "driver": "virtio-net-pci"},
]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def qmpfctl(sock: Path, *args: str, stdin: str | None = None) -> str:
    cmd = [sys.executable, "-m", "qmpfd.cli", "--socket", str(sock), *args]
    print("$ qmpfctl " + " ".join(args), flush=True)
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    print(out.stdout.rstrip() or out.stderr.rstrip(), flush=True)
    if out.returncode != 0:
        raise SystemExit(f"demo: qmpfctl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--machine", default="pc",
                   choices=["pc", "q35", "q35-native", "virt", "pseries"])
    p.add_argument("--accel", default="tcg", help="tcg (default) or kvm on a real host")
    p.add_argument("--qemu", default=None,
                   help="which QEMU runs the guest: host (default), a Debian release whose QEMU "
                        "scripts/setup unpacked (bookworm 7.2, trixie 10.0, sid 11.x) or a "
                        "version such as 10.0 (or set QMPFD_LAB_QEMU)")
    p.add_argument("--kernel", default=None,
                   help="guest kernel: host (default), bookworm (6.1) or trixie (6.12) "
                        "(or set QMPFD_LAB_KERNEL)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qmpfd-demo-") as tmp:
        work = Path(tmp)
        sock = work / "qmpfd.sock"
        say(f"booting a {args.machine} guest (Debian kernel + busybox initramfs, {args.accel})")
        if args.kernel:
            os.environ["QMPFD_LAB_KERNEL"] = args.kernel
        vm = LabVm("demo", work / "vm", LabVmSpec(machine=args.machine, accel=args.accel,
                                                  qemu=args.qemu))
        say(f"QEMU {vm.qemu.version} ({vm.qemu.name}), guest kernel "
            f"{find_kernel(DEBIAN_ARCH[vm.spec.arch]).name}")
        # A pseries guest configures each function through rtas_errd and drmgr, seconds apiece
        # under TCG; the others take well under a second.
        guest_wait = 180.0 if args.machine == "pseries" else 60.0
        t0 = time.monotonic()
        vm.start()
        print(f"guest up in {time.monotonic() - t0:.1f} s; it sees {len(vm.guest_pci() or [])} "
              "PCI functions", flush=True)
        config = work / "qmpfd.toml"
        config.write_text(f'[access]\nqmp-dirs = ["{work}"]\n')
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qmpfd.daemon", "--config", str(config), "--socket",
             str(sock), "--state-dir", str(work / "state"), "--log-format", "text"],
            stderr=(work / "qmpfd.log").open("wb"))
        try:
            deadline = time.monotonic() + 60
            while not sock.exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((work / "qmpfd.log").read_text())
                time.sleep(0.05)
            say("adopting the VM")
            qmpfctl(sock, "vm", "add", "demo", str(vm.qmp_socket))
            say("attaching a 4-function device into one slot (function 0 last)")
            before = vm.guest_pci() or set()
            reply = json.loads(qmpfctl(sock, "--json", "attach", "demo", "-",
                                       stdin=json.dumps(DEVICE)))
            after = vm.wait_guest_pci(lambda s: len(s - before) >= len(DEVICE), guest_wait)
            groups = slot_groups(after - before)
            say("the guest's own /sys/bus/pci/devices now shows")
            for slot, fns in groups.items():
                print("  " + "  ".join(f"{slot}.{f}" for f in sorted(fns)))
            assert len(groups) == 1 and next(iter(groups.values())) == {0, 1, 2, 3}, groups
            qmpfctl(sock, "slots", "demo")
            say("detaching the whole slot (waits for DEVICE_DELETED of every function)")
            qmpfctl(sock, "detach", "demo", *[f["id"] for f in reply["functions"]])
            final = vm.wait_guest_pci(lambda s: s == before, guest_wait)
            print(f"the guest sees {len(final)} PCI functions again: none of the device's "
                  "functions is left", flush=True)
            say("demo finished: multifunction hotplug and unplug proven in the guest")
        finally:
            daemon.terminate()
            daemon.wait(15)
            vm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
