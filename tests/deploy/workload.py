"""Workloads the dashboard test runs inside pod-shaped cgroups: `burn`, `tcp BYTES`, `alloc MIB`.

burn: busy 5 ms then sleep 1 ms, forever (CPU time, throttling under a quota, wakeups for run-queue latency,
syscalls and context switches). tcp: one loopback transfer; prints the kernel's RetransSegs delta (run it in a
private network namespace with a shaped loopback to cause retransmissions). alloc: touch MIB MiB (OOM-killed under
a smaller memory limit).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def burn() -> None:
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.005:
            pass
        time.sleep(0.001)


def retrans_segs() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("RetransSegs")])


def tcp(nbytes: int) -> None:
    before = retrans_segs()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = [0]

    def serve() -> None:
        conn, _ = srv.accept()
        conn.settimeout(120)
        while data := conn.recv(1 << 20):
            got[0] += len(data)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    client = socket.create_connection(srv.getsockname(), timeout=120)
    chunk = b"z" * 16384
    for _ in range(nbytes // len(chunk)):
        client.sendall(chunk)
    client.close()
    t.join()
    srv.close()
    print(json.dumps({"received": got[0], "RetransSegs": retrans_segs() - before}), flush=True)


def alloc(mib: int) -> None:
    bufs = [bytearray(1 << 20) for _ in range(mib)]
    print(json.dumps({"allocated_mib": len(bufs)}), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "burn":
        burn()
    elif mode == "tcp":
        tcp(int(sys.argv[2]))
    elif mode == "alloc":
        alloc(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode}")
