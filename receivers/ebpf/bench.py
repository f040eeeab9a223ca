"""Overhead of the ebpf receiver on this kernel (root): added ns per syscall and per context switch for each profile
against no programs, in one run, and the cost of reading the maps (and of a whole collection) at 1,000 and 10,000
cgroups.

    python -m receivers.ebpf.bench            # prints JSON
    from receivers.ebpf import bench; bench.run() -> dict

Syscall and switch costs come from small C loops timed in process CPU time (compiled with cc into a temp dir; a
Python loop would drown the difference in interpreter noise): `getppid` (not tracked by name), `getpid` (tracked by name; with syscall latency
in comprehensive) and a pipe ping-pong between two processes pinned to one CPU (two switches per round trip).
Each profile is measured right after its own baseline in several rounds; the median of the paired differences is
reported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid

from .config import EbpfConfig, default_syscalls
from .programs import COUNTERS_WORDS, DEFAULT_OBJECT, Programs

C_SOURCE = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* CPU time of this process, not wall time: time other work on a shared machine takes from us does not count */
static double cpu_ns(void) { struct timespec t; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t); return t.tv_sec * 1e9 + t.tv_nsec; }

int main(int argc, char **argv) {
    long n = atol(argv[2]);
    if (!strcmp(argv[1], "getppid") || !strcmp(argv[1], "getpid")) {
        long nr = !strcmp(argv[1], "getppid") ? SYS_getppid : SYS_getpid;
        double t0 = cpu_ns();
        for (long i = 0; i < n; i++) syscall(nr);
        printf("%.2f\n", (cpu_ns() - t0) / n);
        return 0;
    }
    /* pingpong: both processes on one CPU, so every hand-off is a context switch; the CPU time of both
       processes includes the switches (the scheduler and sched_switch programs run in the task switched out) */
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(atoi(argv[3]), &set); sched_setaffinity(0, sizeof set, &set);
    int a[2], b[2], r[2]; char c = 0;
    if (pipe(a) || pipe(b) || pipe(r)) return 1;
    pid_t pid = fork();
    if (pid == 0) {
        double t0 = cpu_ns();
        for (long i = 0; i < n; i++) { if (read(a[0], &c, 1) != 1 || write(b[1], &c, 1) != 1) _exit(1); }
        double dt = cpu_ns() - t0;
        if (write(r[1], &dt, sizeof dt) != sizeof dt) _exit(1);
        _exit(0);
    }
    double t0 = cpu_ns(), child = 0;
    for (long i = 0; i < n; i++) { if (write(a[1], &c, 1) != 1 || read(b[0], &c, 1) != 1) return 1; }
    double dt = cpu_ns() - t0;
    if (read(r[0], &child, sizeof child) != sizeof child) return 1;
    waitpid(pid, 0, 0);
    printf("%.2f\n", (dt + child) / n / 2); /* CPU ns per context switch (two per round trip) */
    return 0;
}
"""

PROFILES = ("minimal", "standard", "comprehensive")


def _build(tmp: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("the benchmark needs a C compiler (cc/gcc) for its syscall loops")
    src, exe = os.path.join(tmp, "loops.c"), os.path.join(tmp, "loops")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    subprocess.run([cc, "-O2", "-o", exe, src], check=True, capture_output=True)
    return exe


def _measure(exe: str, syscalls: int, switches: int, cpu: int) -> dict[str, float]:
    def one(*args) -> float:
        return float(subprocess.run([exe, *map(str, args)], check=True, capture_output=True, text=True).stdout)

    return {"getppid_ns": one("getppid", syscalls), "getpid_ns": one("getpid", syscalls),
            "switch_ns": one("pingpong", switches, cpu)}


def _programs(profile: str) -> Programs:
    cfg = EbpfConfig.model_validate({"profile": profile, "tracked_syscalls": default_syscalls() + ["getpid"]})
    progs = Programs(DEFAULT_OBJECT, cfg.features(), max_cgroups=cfg.max_cgroups,
                     syscall_entries=cfg.max_cgroups * 4, tracked=list(cfg.syscall_numbers()),
                     attach_order=list(cfg.attach_order))
    progs.start()
    return progs


def overhead(rounds: int = 7, syscalls: int = 1_000_000, switches: int = 100_000) -> dict:
    """Added CPU ns per syscall (untracked and tracked by name) and per context switch for each profile.

    Each round measures every profile right after its own no-programs baseline, and the median of the paired
    differences is kept: drift in what else the machine runs cancels out of each pair."""
    cpu = min(os.sched_getaffinity(0))
    deltas: dict[str, list[dict[str, float]]] = {p: [] for p in PROFILES}
    bases: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="podmeter-ebpf-bench-") as tmp:
        exe = _build(tmp)
        _measure(exe, syscalls // 10, switches // 10, cpu)  # warm caches and CPU frequency
        for _ in range(rounds):
            for profile in PROFILES:
                base = _measure(exe, syscalls, switches, cpu)
                bases.append(base)
                progs = _programs(profile)
                try:
                    with_progs = _measure(exe, syscalls, switches, cpu)
                finally:
                    progs.close()
                deltas[profile].append({k: with_progs[k] - base[k] for k in base})
    out: dict = {"baseline_ns": {k: round(statistics.median(b[k] for b in bases), 1) for k in bases[0]},
                 "rounds": rounds}
    for profile in PROFILES:
        med = {k: statistics.median(d[k] for d in deltas[profile]) for k in deltas[profile][0]}
        out[profile] = {
            "added_ns_per_syscall": round(med["getppid_ns"], 1),
            "added_ns_per_tracked_syscall": round(med["getpid_ns"], 1),
            # each switch in the ping-pong comes with one write and one read, both tracked by name by default:
            # take their cost out
            "added_ns_per_context_switch": round(med["switch_ns"] - 2 * med["getpid_ns"], 1),
            "added_ns_per_pingpong_switch": round(med["switch_ns"], 1),
            "spread_ns_per_syscall": [round(min(d["getppid_ns"] for d in deltas[profile]), 1),
                                      round(max(d["getppid_ns"] for d in deltas[profile]), 1)],
        }
    return out


def map_read(sizes: tuple[int, ...] = (1_000, 10_000), repeat: int = 5) -> dict:
    """Cost of one collection with N pod cgroups in the map: the batch read and decode alone, and the receiver's
    whole collect() (cgroup resolution, aggregation, MetricsData), first (walks the cgroup tree) and steady."""
    from podmeter.component import ComponentID, CreateSettings, Host
    from podmeter.telemetry import null_component_telemetry

    from .cgroups import find_cgroup2
    from .receiver import EbpfReceiver

    v2 = find_cgroup2("/sys/fs/cgroup")
    if v2 is None:
        raise RuntimeError("no cgroup2 hierarchy")
    out = {}
    for n in sizes:
        base = f"{v2}/kubepods/besteffort"
        os.makedirs(base, exist_ok=True)
        made: list[str] = []
        settings = CreateSettings(id=ComponentID("ebpf"), kind="receiver", logger=logging.getLogger("bench"),
                                  telemetry=null_component_telemetry("ebpf"))
        r = EbpfReceiver(settings, EbpfConfig.model_validate({"profile": "standard",
                                                               "max_cgroups": max(10240, 2 * n)}))
        try:
            ids = []
            for _ in range(n // 2):  # pod cgroup + one container each: n cgroups
                pod = f"{base}/pod{uuid.uuid4()}"
                ctr = f"{pod}/{uuid.uuid4().hex}{uuid.uuid4().hex}"
                os.mkdir(pod)
                os.mkdir(ctr)
                made += [ctr, pod]
                ids += [os.stat(pod).st_ino, os.stat(ctr).st_ino]
            r.start(Host())
            value = struct.pack(f"={COUNTERS_WORDS}Q", 5, 2, 1000, 3, 1 << 20, 1 << 20, 1, 1, 1, 0, 2, 0, 10, 50_000,
                                *([1] * 10 + [0] * (COUNTERS_WORDS - 24)))
            for cgid in ids:
                r.programs.counters.update(struct.pack("=Q", cgid), value)
            t0 = time.perf_counter()
            r.collect()
            first = time.perf_counter() - t0
            reads, collects, points = [], [], 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                entries = r.programs.read_counters()
                reads.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                md = r.collect()
                collects.append(time.perf_counter() - t0)
                points = sum(len(m.data.data_points) for rm in md.resource_metrics for sm in rm.scope_metrics
                             for m in sm.metrics)
            out[str(n)] = {"entries": len(entries), "batch_read_ms": round(1e3 * statistics.median(reads), 2),
                           "first_collect_ms": round(1e3 * first, 1),
                           "collect_ms": round(1e3 * statistics.median(collects), 1), "points": points}
        finally:
            r.shutdown()
            for d in made:
                try:
                    os.rmdir(d)
                except OSError:
                    pass
    return out


def run(rounds: int = 7, sizes: tuple[int, ...] = (1_000, 10_000)) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the ebpf benchmark needs root")
    if not os.path.exists(DEFAULT_OBJECT):
        raise RuntimeError(f"{DEFAULT_OBJECT} missing: run `make bpf`")
    return {"kernel": os.uname().release, "cpus": os.cpu_count(), "overhead": overhead(rounds=rounds),
            "map_read": map_read(sizes)}


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    print(json.dumps(run(rounds=rounds), indent=2))
