"""Peers measured side by side with podmeter in the same run: nvitop-exporter and a raw read of cgroup files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from harness import free_port

from . import REPO
from .measure import ScrapeResult, Stats, cpu_per_call, proc_rss_bytes, scrape, wait_http


@dataclass
class NvitopResult:
    cpu_total: Stats        # update_host + update_device for every GPU, per collection
    cpu_devices: Stats      # update_device only (the GPU and process part)
    scrape: ScrapeResult
    rss: int
    version: str
    error: str = ""


def nvitop_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("nvitop-exporter")
    except Exception:
        return None


def run_nvitop(node, iterations: int = 20, scrapes: int = 20, timeout: float = 180.0) -> NvitopResult | str:
    """nvitop-exporter on the node's fake GPUs; returns its figures, or why it could not run."""
    version = nvitop_version()
    if version is None:
        return "nvitop-exporter is not installed (make bench installs the bench extra)"
    out = os.path.join(node.workdir, "nvitop.json")
    port = free_port()
    env = node.nvml_env()
    # the repository first, then whatever path the caller's packages came from (an install by PYTHONPATH)
    path = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.update(BENCH_NVITOP_OUT=out, BENCH_NVITOP_ITERATIONS=str(iterations), PYTHONPATH=path)
    log = open(os.path.join(node.workdir, "nvitop.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "bench.nvitop_runner", "--bind-address", "127.0.0.1",
                             "--port", str(port), "--hostname", "bench-node"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(out):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                return f"nvitop-exporter did not finish its collections: {log.read()[-800:]}"
            time.sleep(0.2)
        with open(out) as f:
            data = json.load(f)
        url = f"http://127.0.0.1:{port}/metrics"
        if not wait_http(url):
            return "nvitop-exporter's /metrics did not answer"
        result = scrape(url, scrapes, server_pid=proc.pid)
        return NvitopResult(Stats(data["total"]), Stats(data["devices"]), result, proc_rss_bytes(proc.pid), version)
    finally:
        proc.kill()
        proc.wait()
        log.close()


# -- raw read of the cgroup receiver's files ---------------------------------------------------------------------

class OpenTracer:
    """Records every path Python opens while active (an audit hook: sees exactly what a component reads)."""

    _installed = False
    _active: OpenTracer | None = None

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self.paths: list[str] = []
        self.listed: list[str] = []

    @classmethod
    def _hook(cls, event: str, args) -> None:
        tracer = cls._active
        if tracer is None:
            return
        if event == "open":
            path = args[0]
            if isinstance(path, bytes):
                path = path.decode(errors="replace")
            if isinstance(path, str) and path.startswith(tracer.prefixes):
                mode = args[1] if len(args) > 1 else "r"
                if mode is None or "w" not in str(mode):
                    tracer.paths.append(path)
        elif event in ("os.scandir", "os.listdir"):
            path = args[0]
            if isinstance(path, str) and path.startswith(tracer.prefixes):
                tracer.listed.append(path)

    def __enter__(self) -> OpenTracer:
        if not OpenTracer._installed:
            sys.addaudithook(OpenTracer._hook)
            OpenTracer._installed = True
        OpenTracer._active = self
        return self

    def __exit__(self, *exc) -> None:
        OpenTracer._active = None


def raw_read(paths: list[str], listed: list[str], iterations: int) -> tuple[Stats, Stats, Stats]:
    """The floor: a tight loop opening and reading exactly those files (second figure: also listing the
    directories the receiver listed; third: the files opened once and re-read with pread, as the receiver does),
    no parsing, no metric building."""
    def files_only() -> None:
        for p in paths:
            try:
                with open(p, "rb", buffering=0) as f:
                    f.read()
            except OSError:
                pass

    def with_listing() -> None:
        for d in listed:
            try:
                with os.scandir(d) as it:
                    for _ in it:
                        pass
            except OSError:
                pass
        files_only()

    fds = []
    for p in paths:
        try:
            fds.append(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            pass

    def kept_open() -> None:
        for fd in fds:
            try:
                os.pread(fd, 65536, 0)
            except OSError:
                pass

    try:
        return (cpu_per_call(files_only, iterations), cpu_per_call(with_listing, iterations),
                cpu_per_call(kept_open, iterations))
    finally:
        for fd in fds:
            os.close(fd)
