"""libvirt 9.0 side of the benchmark (the lab's libvirt-run guest, lab/libvirt.py).

    python bench/libvirt_bench.py WORKDIR RUNS   -> one JSON line on stdout

Starts virtlogd and libvirtd and a TCG domain booting the lab's guest (LibvirtGuest), times
attachDeviceFlags / detachDeviceFlags of one virtio-rng function, and records the multifunction
cases libvirt refuses. Stops what it started.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import libvirt  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.libvirt import LibvirtGuest  # noqa: E402

RNG = """<rng model='virtio'><backend model='random'>/dev/urandom</backend>{addr}</rng>"""


def wait(cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise TimeoutError


def main() -> None:
    work = Path(sys.argv[1])
    runs = int(sys.argv[2])
    guest = LibvirtGuest("qmpfd-bench", work)
    out: dict[str, object] = {}
    try:
        guest.start()
        conn = libvirt.open("qemu:///system")
        out["libvirt"] = ".".join(map(str, divmod(conn.getLibVersion(), 1000000)))
        dom = conn.lookupByName(guest.name)

        def seen_now() -> set[str]:
            return guest.guest_pci() or set()
        attach, seen, detach = [], [], []
        for _ in range(runs):
            before = seen_now()
            t = time.perf_counter()
            dom.attachDeviceFlags(RNG.format(addr=""), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            attach.append(time.perf_counter() - t)
            wait(lambda b=before: len(seen_now() - b) >= 1)
            seen.append(time.perf_counter() - t)
            xml = dom.XMLDesc(0)
            rng = xml[xml.index("<rng"):xml.index("</rng>") + 6]
            t = time.perf_counter()
            dom.detachDeviceFlags(rng, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            wait(lambda b=before: seen_now() == b)
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
        guest.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
