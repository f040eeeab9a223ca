"""Workloads the ebpf tests run inside pod-shaped cgroups. Each prints its own ground truth as JSON on the last
line of stdout (getrusage, /proc, its own counts). Standard library only.

  workload.py syscalls N M        N getppid() calls, M failing open() calls
  workload.py pingpong N          two processes on one CPU exchange N bytes through pipes (2N voluntary switches)
  workload.py busy SECONDS        pipe ping-pong for SECONDS (syscalls and context switches)
  workload.py contend SECONDS     two busy processes on one CPU; reports /proc/<pid>/schedstat run_delay
  workload.py tcp BYTES           one loopback TCP transfer, both ends in this process
  workload.py retransmit BYTES    TCP transfer through a rate-limited, tiny-queue loopback (run in a private netns)
  workload.py retransmit_twice BYTES   the same, on one connection in two halves: after the first it prints its
                                  RetransSegs and waits for a line on stdin before the second
  workload.py alloc MIB           allocate MIB MiB (killed by the OOM killer under a lower memory limit)
  workload.py majfault MIB        mmap a file whose page cache was dropped and touch every page
"""

import json
import mmap
import os
import resource
import socket
import sys
import tempfile
import threading
import time


def rusage_all() -> dict:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"nvcsw": s.ru_nvcsw + c.ru_nvcsw, "nivcsw": s.ru_nivcsw + c.ru_nivcsw,
            "majflt": s.ru_majflt + c.ru_majflt}


def syscalls(n: int, m: int) -> dict:
    for _ in range(n):
        os.getppid()
    for _ in range(m):
        try:
            os.open("/nonexistent/podmeter-ebpf-test", os.O_RDONLY)
        except FileNotFoundError:
            pass
    return {"getppid": n, "failed_open": m}


def pingpong(n: int) -> dict:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for _ in range(n):
            os.read(a_r, 1)
            os.write(b_w, b"y")
        os._exit(0)
    for _ in range(n):
        os.write(a_w, b"x")
        os.read(b_r, 1)
    os.waitpid(pid, 0)
    return {"round_trips": n, "rusage": rusage_all()}


def busy(seconds: float) -> dict:
    """Pipe ping-pong between two processes for a while: syscalls and context switches, then a clean exit."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(a_w)
        os.close(b_r)
        while os.read(a_r, 1):
            os.write(b_w, b"y")
        os._exit(0)
    os.close(a_r)
    os.close(b_w)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        os.write(a_w, b"x")
        os.read(b_r, 1)
        n += 1
    os.close(a_w)  # the child reads EOF and exits
    os.waitpid(pid, 0)
    return {"round_trips": n}


def contend(seconds: float) -> dict:
    cpu = {min(os.sched_getaffinity(0))}
    os.sched_setaffinity(0, cpu)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        # schedstat: cpu time, run-queue wait (run_delay), timeslices (ns, ns, count)
        os.write(w, open("/proc/self/schedstat").read().encode())
        os._exit(0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    mine = open("/proc/self/schedstat").read().split()
    child = os.read(r, 200).decode().split()
    os.waitpid(pid, 0)
    return {"run_delay_ns": int(mine[1]) + int(child[1]), "timeslices": int(mine[2]) + int(child[2])}


def tcp(nbytes: int, chunk: int = 65536) -> dict:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = [0]

    def serve():
        conn, _ = srv.accept()
        conn.settimeout(120)
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            got[0] += len(data)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    client = socket.create_connection(srv.getsockname(), timeout=120)
    buf = b"z" * chunk
    left = nbytes
    while left:
        n = min(left, chunk)
        client.sendall(buf[:n])
        left -= n
    client.close()
    t.join()
    srv.close()
    return {"sent": nbytes, "received": got[0]}


def retrans_segs() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("RetransSegs")])


def retransmit(nbytes: int) -> dict:
    """BYTES over a new connection, again (up to 8 connections) while the shaped link has dropped nothing yet."""
    before, sent = retrans_segs(), 0
    for _attempt in range(8):
        sent += tcp(nbytes, 16384)["sent"]
        if retrans_segs() > before:
            break
    return {"sent": sent, "RetransSegs": retrans_segs() - before}


def retransmit_twice(nbytes: int) -> dict:
    """BYTES on one connection, twice, with a pause between (for the test to start a receiver): RetransSegs of
    each half. A half sends BYTES again (up to 8 times) while the shaped link has dropped nothing yet: whether a
    burst overflows the qdisc depends on the pacing of the moment."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = [0]
    cond = threading.Condition()

    def serve():
        conn, _ = srv.accept()
        conn.settimeout(120)
        while data := conn.recv(1 << 20):
            with cond:
                got[0] += len(data)
                cond.notify_all()
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    client = socket.create_connection(srv.getsockname(), timeout=120)
    out = {}
    for half in ("first", "second"):
        if half == "second":
            sys.stdin.readline()
        before = retrans_segs()
        for _attempt in range(8):
            target = got[0] + nbytes
            client.sendall(b"z" * nbytes)
            with cond:
                cond.wait_for(lambda target=target: got[0] >= target, timeout=120)
            if retrans_segs() > before:
                break
        out[half] = retrans_segs() - before
        if half == "first":
            print(json.dumps(out), flush=True)
    client.close()
    t.join()
    srv.close()
    return out


def alloc(mib: int) -> dict:
    bufs = [bytearray(1 << 20) for _ in range(mib)]
    return {"allocated_mib": len(bufs)}


def majfault(mib: int) -> dict:
    size = mib << 20
    fd_, path = tempfile.mkstemp(prefix="podmeter-majflt-", dir="/var/tmp")
    try:
        with os.fdopen(fd_, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the clean page cache: next touch reads disk
        before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        m.madvise(mmap.MADV_RANDOM)  # no read-around: one major fault per page touched
        total = 0
        for off in range(0, size, 4096):
            total += m[off]
        m.close()
        os.close(fd)
        return {"majflt_mmap": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before}
    finally:
        os.unlink(path)


def main() -> None:
    mode, args = sys.argv[1], [int(float(a)) if a.isdigit() else float(a) for a in sys.argv[2:]]
    fn = {"syscalls": syscalls, "pingpong": pingpong, "contend": contend, "busy": busy, "tcp": tcp, "retransmit": retransmit,
          "retransmit_twice": retransmit_twice, "alloc": alloc, "majfault": majfault}[mode]
    out = fn(*args)
    out["pid"] = os.getpid()
    out.setdefault("rusage", rusage_all())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
