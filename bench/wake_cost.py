"""What one wake-up of a sleeping thread costs in CPU on this machine: a process pings another
over a Unix socket pair and waits in epoll for the answer, which comes after a delay. The CPU
of the waiting side per round trip is the same work each time; what grows with the delay is
the cost of being woken from a real sleep (a virtual CPU that went idle, cold caches).

    .venv/bin/python -m bench.wake_cost
"""

from __future__ import annotations

import os
import select
import socket
import time


def round_trip_cpu_us(delay: float, count: int) -> float:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        for _ in range(count):
            data = b.recv(100)
            if delay:
                time.sleep(delay)
            b.send(data)
        os._exit(0)
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    start = time.thread_time()
    for _ in range(count):
        a.send(b"x")
        ep.poll()
        a.recv(100)
    cpu = time.thread_time() - start
    os.waitpid(pid, 0)
    ep.close()
    a.close()
    b.close()
    return cpu / count * 1e6


def main() -> None:
    print("| answer after | CPU us per round trip (waiting side) |\n|---|---|")
    for delay in (0.0, 0.0002, 0.001, 0.005):
        cpu = round_trip_cpu_us(delay, 2000 if delay < 0.004 else 400)
        print(f"| {delay * 1000:.1f} ms | {cpu:.1f} |")


if __name__ == "__main__":
    main()
