"""Acceptance: a syscall- and switch-heavy process in a pod-shaped cgroup shows its syscalls and context switches
under its pod uid and container id in `podmeter collect --once`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness import require

pytestmark = pytest.mark.root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PODMETER = os.path.join(os.path.dirname(sys.executable), "podmeter")

CONFIG = """
receivers:
  ebpf:
    collection_interval: 2s
    profile: standard
exporters:
  debug:
service:
  pipelines:
    metrics:
      receivers: [ebpf]
      exporters: [debug]
"""


def _value(point: dict) -> int:
    return int(point.get("asInt", point.get("asDouble", 0)))


def test_collect_once_shows_the_pods_syscalls_and_switches(receiver_factory, pod, tmp_path):
    # receiver_factory checks root, BTF, cgroup2 and the built object
    require(os.path.exists(PODMETER), "podmeter CLI not installed in the venv (make install)")
    cfg = tmp_path / "ebpf.yaml"
    cfg.write_text(CONFIG)
    busy = pod.spawn([sys.executable, os.path.join(os.path.dirname(__file__), "workload.py"), "busy", "8"],
                     stdout=subprocess.DEVNULL)
    try:
        proc = subprocess.run([PODMETER, "collect", "--once", "--config", str(cfg), "--format", "otlp-json"],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
    finally:
        busy.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    found = {}
    for rm in doc.get("resourceMetrics", []):
        attrs = {a["key"]: a["value"].get("stringValue") for a in rm["resource"].get("attributes", [])}
        if attrs.get("k8s.pod.uid") != pod.uid or attrs.get("container.id") != pod.container_id:
            continue
        for sm in rm.get("scopeMetrics", []):
            assert sm["scope"]["name"] == "podmeter/receiver/ebpf"
            for metric in sm["metrics"]:
                points = (metric.get("sum") or metric.get("gauge") or {}).get("dataPoints", [])
                found[metric["name"]] = sum(_value(p) for p in points)
    assert found.get("container.syscalls", 0) > 1000, (found, proc.stderr[-2000:])
    assert found.get("container.context_switches", 0) > 1000, found
