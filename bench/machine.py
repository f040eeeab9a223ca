"""What machine a result came from: recorded next to every number in BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import time


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _cgroup_layout() -> str:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "cgroup v2"
    if os.path.isdir("/sys/fs/cgroup/unified"):
        return "cgroup v1 hybrid (cgroup2 at /sys/fs/cgroup/unified)"
    return "cgroup v1"


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def describe() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "cgroups": _cgroup_layout(),
        "python": platform.python_version(),
        "load_before": load_average(),
    }
