"""Measuring helpers: CPU time per call (in-process, many iterations, median), RSS, HTTP scrapes."""

from __future__ import annotations

import os
import resource
import statistics
import time
import urllib.request
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Stats:
    """Per-call samples in seconds; reported as the median (robust to the shared machine's noise)."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")

    @property
    def p90(self) -> float:
        if not self.samples:
            return float("nan")
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(len(s) * 0.9))]

    @property
    def n(self) -> int:
        return len(self.samples)

    def as_dict(self) -> dict:
        return {"median": self.median, "mean": self.mean, "p90": self.p90, "n": self.n}


def cpu_per_call(fn, iterations: int, warmup: int = 2) -> Stats:
    """CPU time (user+system of this process, time.process_time) of each call to fn, garbage collection included
    as it happens in the agent (median and mean are both reported: the mean carries the occasional full gc)."""
    for _ in range(warmup):
        fn()
    out = Stats()
    for _ in range(iterations):
        t0 = time.process_time()
        fn()
        out.samples.append(time.process_time() - t0)
    return out


def rusage_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of another process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_hwm_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class ScrapeResult:
    latency: Stats
    bytes_plain: int
    bytes_gzip: int
    series: int
    cpu_per_scrape: float | None = None  # of the server process, when it is another process
    body: bytes = b""


def _get(url: str, gzip_ok: bool = False) -> bytes:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip_ok else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def scrape(url: str, n: int, server_pid: int | None = None, warmup: int = 2) -> ScrapeResult:
    """Scrape `url` n times (a new connection each time, as a Prometheus with keep-alive off), wall time each."""
    for _ in range(warmup):
        body = _get(url)
    lat = Stats()
    cpu0 = proc_cpu_seconds(server_pid) if server_pid else None
    for _ in range(n):
        t0 = time.perf_counter()
        body = _get(url)
        lat.samples.append(time.perf_counter() - t0)
    cpu = (proc_cpu_seconds(server_pid) - cpu0) / n if server_pid else None
    gz = _get(url, gzip_ok=True)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return ScrapeResult(lat, len(body), len(gz), series, cpu, body)


def wait_http(url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _get(url)
            return True
        except OSError:
            time.sleep(0.1)
    return False
