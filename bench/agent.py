"""The real agent (`podmeter run`) on the synthetic node, as a separate process: RSS, CPU per collection interval
(every receiver collecting, processing and exporting), scrape latency and payload of its /metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import yaml
from harness import free_port, stop_process

from . import REPO
from .measure import ScrapeResult, proc_cpu_seconds, proc_hwm_bytes, proc_rss_bytes, scrape, wait_http


@dataclass
class AgentResult:
    rss: int
    rss_peak: int
    cpu_per_interval: float     # CPU seconds of the whole process per collection interval (all receivers)
    intervals: int
    scrape: ScrapeResult
    receivers: list[str]
    log_tail: str = ""


def _collections(telemetry_url: str) -> dict[str, float]:
    with urllib.request.urlopen(telemetry_url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^podmeter_receiver_collections_total\{([^}]*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("outcome") == "ok":
            out[labels.get("receiver", "")] = float(m.group(2))
    return out


def run_agent(node, api, receivers: dict[str, dict], processors: dict[str, dict], interval: float = 2.0,
              warm_intervals: int = 3, measure_intervals: int = 5, scrapes: int = 20,
              timeout: float = 120.0) -> AgentResult | str:
    port, tport = free_port(), free_port()
    for cfg in receivers.values():
        cfg["collection_interval"] = f"{interval}s"
    config = {
        "receivers": receivers,
        "processors": processors,
        "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{port}"}},
        "service": {
            "telemetry": {"metrics": {"address": f"127.0.0.1:{tport}"}, "logs": {"level": "warning"}},
            "pipelines": {"metrics": {"receivers": list(receivers), "processors": list(processors),
                                      "exporters": ["prometheus"]}},
        },
    }
    path = os.path.join(node.workdir, "agent.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    env = node.nvml_env()
    if api is not None:
        env.update(api.env())
    log_path = os.path.join(node.workdir, "agent.log")
    log = open(log_path, "w+")
    podmeter = os.path.join(os.path.dirname(sys.executable), "podmeter")
    proc = subprocess.Popen([podmeter, "run", "--config", path], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO)

    def tail() -> str:
        log.flush()
        with open(log_path) as f:
            return f.read()[-1500:]

    try:
        turl = f"http://127.0.0.1:{tport}/metrics"
        if not wait_http(turl, timeout=60):
            return f"the agent did not start: {tail()}"
        deadline = time.monotonic() + timeout
        first = next(iter(receivers))

        def count() -> float:
            return _collections(turl).get(first, 0.0)

        while count() < warm_intervals:
            if proc.poll() is not None or time.monotonic() > deadline:
                return f"the agent did not collect: {tail()}"
            time.sleep(0.2)
        # the agent's own /metrics is read only at both ends of the window: every read costs the agent CPU too
        # (rendering its self-telemetry), which polling would add to the figure
        n0, cpu0 = count(), proc_cpu_seconds(proc.pid)
        time.sleep(measure_intervals * interval)
        if proc.poll() is not None:
            return f"the agent stopped: {tail()}"
        n1, cpu1 = count(), proc_cpu_seconds(proc.pid)
        if n1 <= n0:
            return f"the agent stopped collecting: {tail()}"
        url = f"http://127.0.0.1:{port}/metrics"
        if not wait_http(url):
            return f"the agent's /metrics did not answer: {tail()}"
        result = scrape(url, scrapes)
        return AgentResult(proc_rss_bytes(proc.pid), proc_hwm_bytes(proc.pid), (cpu1 - cpu0) / max(1.0, n1 - n0),
                           int(n1 - n0), result, list(receivers), tail())
    finally:
        stop_process(proc)
        log.close()
