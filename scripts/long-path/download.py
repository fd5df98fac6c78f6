"""One TCP download for the long-path measurement (scripts/long-path/run.sh).

    python3 download.py server ADDR PORT READY_FILE   sends for as long as asked
    python3 download.py client ADDR PORT SECONDS      prints MB/s, overall and per second
"""

import socket
import sys
import time


def server(addr, port, ready):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    open(ready, "w").close()
    chunk = b"x" * 262144
    while True:
        c, _ = s.accept()
        end = time.monotonic() + float(c.recv(16).decode())
        try:
            while time.monotonic() < end:
                c.sendall(chunk)
        except OSError:
            pass
        c.close()


def client(addr, port, secs):
    c = socket.create_connection((addr, port), timeout=10)
    c.sendall(secs.encode())
    start = time.monotonic()
    total, marks = 0, [(0.0, 0)]
    while True:
        data = c.recv(1 << 20)
        if not data:
            break
        total += len(data)
        t = time.monotonic() - start
        if t - marks[-1][0] >= 1.0:
            marks.append((t, total))
    t = time.monotonic() - start
    per_s = [(b2 - b1) / (t2 - t1) / 1e6 for (t1, b1), (t2, b2) in zip(marks, marks[1:])]
    print(f"{total / t / 1e6:.1f} MB/s over {t:.1f} s; each second: "
          + " ".join(f"{r:.1f}" for r in per_s))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        client(sys.argv[2], int(sys.argv[3]), sys.argv[4])
