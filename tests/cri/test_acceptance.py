"""Through the CLI, with real containerd pods: `podmeter collect --once` names every container from CRI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness import require

from podmeter.component import registry

pytestmark = pytest.mark.root
PODMETER = os.path.join(os.path.dirname(sys.executable), "podmeter")
NAMES = ("k8s.pod.name", "k8s.namespace.name", "k8s.pod.uid", "k8s.container.name")


def collect(config_text: str, tmp_path) -> list[tuple[str, dict, str]]:
    """(scope name, resource attributes, metric name) of everything `collect --once` printed."""
    path = tmp_path / "pipelines.yaml"
    path.write_text(config_text)
    result = subprocess.run([PODMETER, "collect", "--once", "--config", str(path), "--format", "otlp-json",
                             "--wait", "20"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = []
    for rm in json.loads(result.stdout).get("resourceMetrics", []):
        attrs = {a["key"]: next(iter(a["value"].values())) for a in rm.get("resource", {}).get("attributes", [])}
        for sm in rm.get("scopeMetrics", []):
            for m in sm.get("metrics", []):
                out.append((sm["scope"]["name"], attrs, m["name"]))
    return out


def expected(pod, cname):
    return {"k8s.pod.name": pod.name, "k8s.namespace.name": pod.namespace, "k8s.pod.uid": pod.uid,
            "k8s.container.name": cname}


def test_cri_receiver_through_the_cli(ctrd, tmp_path, layers_measured):
    pod = ctrd.run_pod("checkout-5c7d", "shop", {"api": ["/bin/sleep", "3600"], "proxy": ["/bin/sleep", "3600"]})
    try:
        layers_measured(*pod.containers.values())  # an unmeasured layer is omitted, not a 0
        got = collect(f"""
receivers:
  cri:
    endpoint: {ctrd.endpoint}
    metrics:
      container.cpu.time: {{enabled: true}}
      container.memory.working_set: {{enabled: true}}
exporters:
  debug:
service:
  telemetry: {{metrics: {{level: none}}}}
  pipelines:
    metrics:
      receivers: [cri]
      exporters: [debug]
""", tmp_path)
        for cname, cid in pod.containers.items():
            series = [(attrs, name) for scope, attrs, name in got if attrs.get("container.id") == cid]
            assert {n for _, n in series} == {"container.cpu.time", "container.memory.working_set",
                                              "container.filesystem.usage", "container.filesystem.inodes.usage"}
            for attrs, _ in series:
                assert {k: attrs.get(k) for k in NAMES} == expected(pod, cname)
    finally:
        ctrd.remove_pod(pod)


def test_cgroup_series_named_from_cri_with_no_api_server(ctrd, tmp_path):
    """The acceptance criterion: cgroup + cri receivers, k8sattributes with auth_type none."""
    reg = registry()
    require(reg.get("receiver", "cgroup") is not None and reg.get("processor", "k8sattributes") is not None,
            "needs the cgroup receiver and the k8sattributes processor")
    pods = [ctrd.run_pod("web-0", "shop", {"app": ["/bin/sleep", "3600"], "sidecar": ["/bin/sleep", "3600"]}),
            ctrd.run_pod("trainer-0", "ml", {"train": ["/bin/sleep", "3600"]})]
    try:
        got = collect(f"""
receivers:
  cgroup:
  cri:
    endpoint: {ctrd.endpoint}
processors:
  k8sattributes:
    auth_type: none
exporters:
  debug:
service:
  telemetry: {{metrics: {{level: none}}}}
  pipelines:
    metrics:
      receivers: [cgroup, cri]
      processors: [k8sattributes]
      exporters: [debug]
""", tmp_path)
        for pod in pods:
            for cname, cid in pod.containers.items():
                series = [attrs for scope, attrs, _ in got
                          if scope == "podmeter/receiver/cgroup" and attrs.get("container.id") == cid]
                assert series, f"no cgroup series for container {cname} ({cid[:12]})"
                for attrs in series:
                    assert {k: attrs.get(k) for k in NAMES} == expected(pod, cname)
    finally:
        for pod in pods:
            ctrd.remove_pod(pod)
