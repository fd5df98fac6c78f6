"""A delay line between two tun devices: every packet read from one is written to
the other DELAY seconds later, in order. This kernel has no sch_netem, so the
long-path measurement (scripts/long-path/run.sh) puts this between two namespaces
to give them a round trip of twice DELAY.

    python3 delay_line.py TUN_A TUN_B DELAY_SECONDS READY_FILE

Creates both tun devices (IFF_TUN, no packet info) in the caller's namespace and
touches READY_FILE; the caller then moves them where they belong. Runs until
killed."""

import collections
import fcntl
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    name_a, name_b, delay, ready = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    a, b = tun(name_a), tun(name_b)
    open(ready, "w").close()
    # Packets due to be written to each device, oldest first (a constant delay
    # keeps them in order).
    due = {a: collections.deque(), b: collections.deque()}
    peer = {a: b, b: a}
    while True:
        now = time.monotonic()
        heads = [q[0][0] for q in due.values() if q]
        timeout = max(0.0, min(heads) - now) if heads else 1.0
        readable, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            for _ in range(64):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                due[peer[fd]].append((now + delay, pkt))
        for fd, q in due.items():
            while q and q[0][0] <= now:
                try:
                    os.write(fd, q.popleft()[1])
                except OSError:
                    pass  # a full device queue drops, as a link would


if __name__ == "__main__":
    main()
