"""dashboards/podmeter.json: its structure, that every metric it queries is one a component declares (MetricSpecs
translated to Prometheus names by the exporter's own rules), and that every panel's query returns data from a real
Prometheus (Debian's /usr/bin/prometheus) scraping a real `podmeter run` with the DaemonSet's shipped pipelines.

The agent runs the real cgroup, podresources, nvml and ebpf receivers and the k8sattributes processor on this
kernel: real processes in real pod-shaped cgroups (CPU under a CFS quota, an OOM kill under a memory limit, a
loopback TCP transfer with retransmissions in a private network namespace). Test doubles, where nothing real can
run here: the fake libnvidia-ml.so.1 (no GPU), the kube-apiserver stand-in (tests/harness/apiserver.py) that names
the pods, and a PodResources gRPC server on the project's proto standing in for the kubelet. The `node` label the
shipped ServiceMonitor adds by relabeling is added here as a static scrape label; like the ServiceMonitor, this
Prometheus scrapes both the metrics (:9464) and the agent's own telemetry (:8888).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest
import yaml
from deploy.kubelet import serve_podresources
from harness import free_port, require, stop_process
from harness.cgroups import PodCgroup, v2_root
from harness.prometheus import PrometheusServer, prometheus_binary

from podmeter.component import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "dashboards", "podmeter.json")
SHIPPED = os.path.join(ROOT, "k8s", "base", "pipelines.yaml")
WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workload.py")
GiB = 1 << 30
NODE = "node-1"
UUID0 = "GPU-d0d0d0d0-1111-2222-3333-444444444444"
UUID1 = "GPU-d1d1d1d1-1111-2222-3333-444444444444"
# Grafana's values for the template variables in this test (multi-value variables become regex alternatives)
VARIABLES = {"$node": NODE, "$namespace": "ml|web", "$pod": "trainer-0|web-0", "$__rate_interval": "20s",
             "$__range": "15m", "$__interval": "1s"}
RECEIVERS = ("cgroup", "podresources", "nvml", "ebpf")


def load() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def substitute(expr: str) -> str:
    for var in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(var, VARIABLES[var])
    return expr


def selectors(expr: str) -> set[str]:
    """Metric names in an expression (every selector in the dashboard has a {...} matcher)."""
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr)) - {"by", "on", "without", "ignoring"}


def declared_prometheus_names() -> dict[str, str]:
    """Prometheus family name -> component type, from every registered receiver's MetricSpecs."""
    from exporters.prometheus.translate import metric_name

    kinds = {"sum": "counter", "updowncounter": "updowncounter", "gauge": "gauge", "histogram": "histogram"}
    out: dict[str, str] = {}
    for type_ in RECEIVERS:
        factory = registry().get("receiver", type_)
        if factory is None:
            continue
        for spec in factory.metrics:
            name = metric_name(spec.name, spec.unit, kinds[spec.instrument], True)
            out[name] = type_
            if spec.instrument == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    out[name + suffix] = type_
    return out


def declared_telemetry_names() -> set[str]:
    """The agent's own series (:8888), from a real podmeter.telemetry.Telemetry registry."""
    from podmeter.telemetry import Telemetry

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
    names = set()
    for fam in Telemetry().registry.collect():
        names |= {fam.name + s for s in suffixes.get(fam.type, ("",))}
        names |= {sample.name for sample in fam.samples}
    return names


# ------------------------------------------------------------------------------------------------------------
# structure


def test_dashboard_structure():
    dash = load()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("node", "namespace", "pod"):
        assert variables[name]["type"] == "query" and variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    # panels do not overlap on the 24-column grid
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another at {(x, y)}"
                cells.add((x, y))
    used = set()
    for p in panels(dash):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["refId"], p["title"]
            used |= set(re.findall(r"\$(\w+)", t["expr"]))
    assert {"node", "namespace", "pod"} <= used
    # what users asked to see
    titles = " ".join(p["title"].lower() for p in panels(dash))
    for topic in ("gpu memory by pod", "gpu memory by namespace", "gpu utilization by pod",
                  "gpu utilization by namespace", "allocated vs used", "cpu by pod", "cpu by namespace",
                  "memory working set by pod", "throttling", "pressure", "run-queue latency", "tcp retransmits",
                  "oom kills"):
        assert topic in titles, topic


def test_every_queried_metric_is_declared_by_a_component():
    for type_ in RECEIVERS:
        require(registry().get("receiver", type_) is not None, f"needs the {type_} receiver")
    declared = set(declared_prometheus_names()) | declared_telemetry_names()
    for p in panels(load()):
        for t in p["targets"]:
            for name in selectors(t["expr"]):
                assert name in declared, f"panel {p['title']!r} queries {name}, which no receiver declares"
    for v in load()["templating"]["list"]:
        if v["type"] == "query":
            for name in selectors(v["definition"]) | set(re.findall(r"label_values\((\w+)", v["definition"])):
                assert name in declared, f"variable {v['name']} queries {name}"


def test_promql_parses():
    """Every expression (variables substituted) is accepted by the real Prometheus' parser (promtool)."""
    promtool = shutil.which("promtool")
    require(promtool is not None, "needs promtool (apt-get install prometheus)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"podmeter:panel_{p['id']}_{t['refId']}", "expr": substitute(t["expr"])}
        for p in panels(load()) for t in p["targets"]]}]}
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"podmeter-dashboard-rules-{os.getpid()}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(rules, f)
    try:
        proc = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------------------
# every panel against a real Prometheus scraping a real podmeter


def _limit_cpu(pod: PodCgroup, quota_us: int) -> None:
    if os.path.isdir(f"/sys/fs/cgroup/cpu{pod.container_path}"):
        pod.set("cpu", "cpu.cfs_quota_us", str(quota_us))
    else:
        with open(f"{v2_root()}{pod.container_path}/cpu.max", "w") as f:
            f.write(f"{quota_us} 100000")


def _limit_memory(pod: PodCgroup, nbytes: int) -> None:
    if os.path.isdir(f"/sys/fs/cgroup/memory{pod.container_path}"):
        pod.set("memory", "memory.limit_in_bytes", str(nbytes))
    else:
        with open(f"{v2_root()}{pod.container_path}/memory.max", "w") as f:
            f.write(str(nbytes))


def _has_data(rows) -> bool:
    return any(not math.isnan(v) for _, v in rows)


@pytest.mark.slow
def test_every_panel_query_returns_data_from_a_real_prometheus(tmp_path):
    require(os.geteuid() == 0, "needs root: pod-shaped cgroups, eBPF")
    prometheus_binary()
    for type_ in (*RECEIVERS, "prometheus", "k8sattributes"):
        kind = "exporter" if type_ == "prometheus" else "processor" if type_ == "k8sattributes" else "receiver"
        require(registry().get(kind, type_) is not None, f"needs the {type_} {kind}")
    require(shutil.which("gcc") is not None, "needs gcc to build the fake libnvidia-ml.so.1")
    from harness.apiserver import ApiServer
    from harness.apiserver import pod as api_pod
    from harness.fake_nvml import GPU, Process, Scenario, build_fake_nvml

    lib = build_fake_nvml()
    trainer = PodCgroup().create()
    web = PodCgroup(qos="guaranteed").create()
    cleanup: list = []
    agent = None
    try:
        _limit_cpu(trainer, 50_000)  # half a core for two busy processes: throttled
        _limit_memory(web, 48 << 20)
        burners = [trainer.spawn([sys.executable, WORKLOAD, "burn"]) for _ in range(2)]
        web.spawn(["sleep", "600"])

        api = ApiServer().start()
        cleanup.append(api.stop)
        for ns in ("ml", "web"):
            api.create("namespaces", None, {"metadata": {"name": ns}})
        api.create("pods", "ml", api_pod("trainer-0", NODE, uid=trainer.uid,
                                         container_ids={"main": f"containerd://{trainer.container_id}"}))
        api.create("pods", "web", api_pod("web-0", NODE, uid=web.uid,
                                          container_ids={"main": f"containerd://{web.container_id}"}))
        kubeconfig = api.write_kubeconfig(str(tmp_path))

        os.makedirs(tmp_path / "kubelet" / "pod-resources")
        socket_path = str(tmp_path / "kubelet" / "pod-resources" / "kubelet.sock")
        kubelet = serve_podresources(socket_path, {("ml", "trainer-0", "main"): [UUID0],
                                                   ("web", "web-0", "main"): [UUID1]})
        cleanup.append(lambda: kubelet.stop(0).wait())

        scenario = str(tmp_path / "nvml-scenario.txt")
        Scenario(gpus=[GPU(uuid=UUID0, mem_used=12 * GiB, util_gpu=65), GPU(uuid=UUID1, util_gpu=0)],
                 processes=[Process(pid=burners[0].pid, gpu=0, used_mem=10 * GiB, sm=70)]).write(scenario)

        # the DaemonSet's pipelines.yaml, with host paths, ports and the API server of this machine merged over it
        port, health, telemetry = free_port(), free_port(), free_port()
        override = {
            "receivers": {
                "cgroup": {"cgroup_root": "/sys/fs/cgroup", "proc_root": "/proc", "collection_interval": "1s", "timeout": "10s",
                           "initial_delay": "0s"},
                "podresources": {"endpoint": f"unix://{socket_path}", "collection_interval": "1s", "timeout": "10s",
                                 "refresh_interval": "1s", "initial_delay": "0s"},
                "nvml": {"library_path": lib, "proc_root": "/proc", "collection_interval": "1s", "timeout": "10s",
                         "initial_delay": "0s"},
                "ebpf": {"cgroup_root": "/sys/fs/cgroup", "collection_interval": "1s", "timeout": "10s", "initial_delay": "0s"},
                "cri": {"endpoint": f"unix://{tmp_path}/no-containerd/containerd.sock"},
            },
            "processors": {"k8sattributes": {"auth_type": "kubeConfig", "kube_config_path": kubeconfig,
                                             "proc_root": "/proc", "wait_for_metadata": True}},
            "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{port}"},
                          "otlp": {"sending_queue": {"storage": str(tmp_path / "queue")}}},
            "extensions": {"health_check": {"endpoint": f"127.0.0.1:{health}"}},
            "service": {"telemetry": {"metrics": {"address": f"127.0.0.1:{telemetry}"}},
                        # no containerd runs here: pod names come from the API stand-in, and the cri receiver
                        # finding no socket is a real error for the agent's error panel
                        "pipelines": {"metrics": {"receivers": [*RECEIVERS, "cri"]}}},
        }
        override_path = tmp_path / "override.yaml"
        override_path.write_text(yaml.safe_dump(override))
        log_path = tmp_path / "agent.log"
        log = open(log_path, "w")
        cleanup.append(log.close)
        env = dict(os.environ, K8S_NODE_NAME=NODE, FAKE_NVML_SCENARIO=scenario)
        agent = subprocess.Popen([sys.executable, "-m", "podmeter.cli", "run", "--config", SHIPPED, "--config",
                                  str(override_path)], stdout=log, stderr=subprocess.STDOUT, env=env)

        # both of the agent's endpoints, as the ServiceMonitor scrapes them
        prom = PrometheusServer([f"127.0.0.1:{port}", f"127.0.0.1:{telemetry}"])
        with open(prom.config_path) as f:
            cfg = yaml.safe_load(f)
        cfg["scrape_configs"][0]["static_configs"][0]["labels"] = {"node": NODE}  # what the ServiceMonitor adds
        with open(prom.config_path, "w") as f:
            yaml.safe_dump(cfg, f)
        with prom:
            try:
                prom.wait_for('k8s_pod_memory_working_set_bytes{k8s_pod_name="trainer-0"}', timeout=90)
                prom.wait_for('process_gpu_memory_usage_bytes{k8s_pod_name="trainer-0"}', timeout=60)
            except AssertionError as exc:
                pytest.fail(f"{exc}\nagent log:\n{log_path.read_text()[-6000:]}")

            # events while everything watches: an OOM kill in web-0, TCP retransmissions in trainer-0
            victim = web.spawn([sys.executable, WORKLOAD, "alloc", "512"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
            assert victim.wait(timeout=120) == -9, "the memory-limited process was not OOM-killed"
            retrans = None
            if shutil.which("unshare") and shutil.which("tc") and shutil.which("ip"):
                script = ("ip link set lo up && ip link set lo mtu 1500 && "
                          "tc qdisc add dev lo root tbf rate 20mbit burst 16kb limit 30000 && "
                          f"exec {sys.executable} {WORKLOAD} tcp {2 << 20}")
                p = trainer.spawn(["unshare", "-n", "sh", "-c", script], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                out, err = p.communicate(timeout=180)
                if p.returncode == 0:
                    retrans = json.loads(out.strip().splitlines()[-1])["RetransSegs"]

            problems = []
            for p in panels(load()):
                for t in p["targets"]:
                    expr = substitute(t["expr"])
                    try:
                        prom.wait_for(expr, _has_data, timeout=60)
                    except AssertionError:
                        problems.append(f"panel {p['title']!r} {t['refId']}: no data for {expr}")
            for v in load()["templating"]["list"]:
                if v["type"] != "query":
                    continue
                m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["definition"])
                rows = prom.query(f"group by ({m.group(2)}) ({substitute(m.group(1))})")
                values = {r.get(m.group(2)) for r, _ in rows}
                expected = {"node": {NODE}, "namespace": {"ml", "web"}, "pod": {"trainer-0", "web-0"}}[v["name"]]
                if not expected <= values:
                    problems.append(f"variable {v['name']}: {sorted(expected - values)} missing from {sorted(values)}")
            assert not problems, "\n".join(problems) + f"\nagent log tail:\n{log_path.read_text()[-4000:]}"

            # and the values mean what the panels say
            def by_pod(expr):
                return {r.get("k8s_pod_name"): v for r, v in prom.query(substitute(expr))}

            gpu_mem = by_pod('sum by (k8s_namespace_name, k8s_pod_name) (process_gpu_memory_usage_bytes'
                             '{node=~"$node", k8s_pod_name=~"$pod"})')
            assert gpu_mem == {"trainer-0": 10 * GiB}
            allocated = by_pod('count by (k8s_namespace_name, k8s_pod_name) (max by (k8s_namespace_name, '
                               'k8s_pod_name, hw_id) (hw_gpu_allocation_ratio{k8s_pod_name=~"$pod"}))')
            assert allocated == {"trainer-0": 1, "web-0": 1}
            used = by_pod('sum by (k8s_namespace_name, k8s_pod_name) (process_gpu_utilization_ratio'
                          '{hw_gpu_task="sm", k8s_pod_name=~"$pod"})')
            assert used == {"trainer-0": pytest.approx(0.7)}  # web-0 holds a GPU it does not use
            # the kill shows once a collection after it has been scraped
            oom = prom.wait_for(substitute('sum by (k8s_pod_name) (container_memory_oom_kills_total'
                                           '{k8s_pod_name=~"$pod"})'),
                                lambda rows: {r["k8s_pod_name"]: v for r, v in rows}.get("web-0", 0) >= 1)
            assert {r["k8s_pod_name"]: v for r, v in oom}.get("trainer-0") == 0
            throttled = prom.wait_for(substitute(
                'sum by (k8s_pod_name) (rate(container_cpu_throttling_data_throttled_periods_total'
                '{k8s_pod_name="trainer-0"}[$__rate_interval]))'), lambda rows: rows and rows[0][1] > 0)
            assert throttled
            if retrans:
                # the counter reaches the kernel's own count once the next collection is scraped
                prom.wait_for('sum(container_tcp_retransmits_total{k8s_pod_name="trainer-0"})',
                              lambda rows: rows and abs(rows[0][1] - retrans) <= 0.05 * retrans + 2)
            else:
                print("no retransmission happened (or no tc/unshare): the retransmit panel returned zeros only")
            # one source per series: the shipped config keeps CRI and eBPF from duplicating cgroup's series
            dup = prom.query('count by (k8s_pod_uid, container_id, cpu_mode) '
                             '(container_cpu_time_seconds_total{k8s_pod_name=~"trainer-0|web-0"}) > 1')
            assert dup == [], dup
            with urllib.request.urlopen(f"http://127.0.0.1:{telemetry}/metrics", timeout=5) as r:
                own = r.read().decode()
            assert 'cause="duplicate_series"' not in own and 'cause="type_conflict"' not in own
            print(own[-3000:])
        assert "Traceback" not in log_path.read_text()
        print(log_path.read_text()[-3000:])
    finally:
        stop_process(agent, 20)
        for fn in reversed(cleanup):
            fn()
        trainer.destroy()
        web.destroy()
