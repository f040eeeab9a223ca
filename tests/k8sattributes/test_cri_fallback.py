"""With real containerd pods: when the API server forbids listing pods (403), the processor says so once, naming
the permission, and names the cgroup receiver's series from the CRI cache instead (through the real CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness import require
from harness.containerd import running

from podmeter.component import registry

pytestmark = pytest.mark.root
PODMETER = os.path.join(os.path.dirname(sys.executable), "podmeter")


@pytest.fixture(scope="module")
def ctrd():
    with running() as c:
        yield c


def test_forbidden_api_falls_back_to_cri(ctrd, api, tmp_path):
    reg = registry()
    require(reg.get("receiver", "cgroup") is not None and reg.get("receiver", "cri") is not None,
            "needs the cgroup and cri receivers")
    api.forbid("pods")
    pod = ctrd.run_pod("web-7f9c4d5b8-kx2lp", "shop", {"app": ["/bin/sleep", "3600"]},
                       labels={"app": "web", "pod-template-hash": "7f9c4d5b8"})
    try:
        config = tmp_path / "pipelines.yaml"
        config.write_text(f"""
receivers:
  cgroup:
  cri:
    endpoint: {ctrd.endpoint}
processors:
  k8sattributes:
    auth_type: kubeConfig
    kube_config_path: {api.write_kubeconfig(tmp_path)}
    filter: {{node: node-1}}
    reconnect: {{initial_interval: 50ms, max_interval: 200ms}}
    extract:
      labels: [{{key: app}}]
exporters:
  debug:
service:
  telemetry: {{metrics: {{level: none}}}}
  pipelines:
    metrics:
      receivers: [cgroup, cri]
      processors: [k8sattributes]
      exporters: [debug]
""")
        res = subprocess.run([PODMETER, "collect", "--once", "--config", str(config), "--format", "otlp-json",
                              "--wait", "10"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        forbidden = [line for line in res.stderr.splitlines() if "forbids" in line]
        assert len(forbidden) == 1 and "list on pods" in forbidden[0], res.stderr[-3000:]
        cid = pod.containers["app"]
        series = []
        for rm in json.loads(res.stdout)["resourceMetrics"]:
            attrs = {a["key"]: next(iter(a["value"].values())) for a in rm["resource"]["attributes"]}
            if attrs.get("container.id") == cid:
                series.append(attrs)
        assert series
        for attrs in series:
            assert attrs["k8s.pod.name"] == "web-7f9c4d5b8-kx2lp" and attrs["k8s.namespace.name"] == "shop"
            assert attrs["k8s.container.name"] == "app" and attrs["k8s.pod.uid"] == pod.uid
            assert attrs["k8s.deployment.name"] == "web" and attrs["k8s.pod.label.app"] == "web"
    finally:
        ctrd.remove_pod(pod)
