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

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from deploy.kubelet import serve_podresources
from harness import IN_CI, free_port, require, stop_process, wait_for
from harness.cgroups import PodCgroup, v2_root
from harness.prometheus import PrometheusServer, prometheus_binary

from podmeter.component import registry
from podmeter.docs import prometheus_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "dashboards", "podmeter.json")
SHIPPED = os.path.join(ROOT, "k8s", "base", "pipelines.yaml")
WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workload.py")
GiB = 1 << 30
NODE = "node-1"
UUID0 = "GPU-d0d0d0d0-1111-2222-3333-444444444444"
UUID1 = "GPU-d1d1d1d1-1111-2222-3333-444444444444"
UUID2 = "GPU-d2d2d2d2-1111-2222-3333-444444444444"  # in MIG mode
MIG1 = "MIG-11111111-1111-2222-3333-444444444444"
MIG2 = "MIG-22222222-1111-2222-3333-444444444444"
# Grafana's values for the template variables in this test (multi-value variables become regex alternatives)
VARIABLES = {"$node": NODE, "$namespace": "ml|web", "$pod": "trainer-0|web-0", "$__rate_interval": "20s",
             "$__range": "15m", "$__interval": "1s"}
RECEIVERS = ("cgroup", "podresources", "nvml", "ebpf")


def load() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    variables = VARIABLES if variables is None else variables
    for var in sorted(variables, key=len, reverse=True):
        expr = expr.replace(var, variables[var])
    return expr


def all_selected() -> dict[str, str]:
    """The variables as Grafana substitutes them when `All` is selected: each one's allValue."""
    out = dict(VARIABLES)
    for v in load()["templating"]["list"]:
        if v.get("includeAll"):
            out[f"${v['name']}"] = v["allValue"]
    return out


def selectors(expr: str) -> set[str]:
    """Metric names in an expression (every selector in the dashboard has a {...} matcher)."""
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr)) - {"by", "on", "without", "ignoring"}


def declared_prometheus_names() -> dict[str, str]:
    """Prometheus family name -> component type, from every registered receiver's MetricSpecs."""
    out: dict[str, str] = {}
    for type_ in RECEIVERS:
        factory = registry().get("receiver", type_)
        if factory is None:
            continue
        for spec in factory.metrics:
            name = prometheus_name(spec)
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


def _seconds(duration: str) -> float:
    return sum(float(n) * {"ms": .001, "s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def test_rate_windows_hold_enough_scrapes_of_the_shipped_monitors():
    """Grafana's $__rate_interval is max($__interval + S, 4 S), S being the panel's min interval or else the
    data source's scrape interval (15s unless someone changed it). The shipped ServiceMonitor and PodMonitor scrape
    the metrics port every 30s and the telemetry port every 60s: with S = 15s a 60s window holds one telemetry
    sample (no rate at all) and two metric samples (a gap at every missed scrape). Each panel that rates must
    say its endpoint's interval, so that the window is at least four scrapes, as Grafana and Prometheus advise."""
    intervals: dict[str, float] = {}
    for rel in ("k8s/base/servicemonitor.yaml", "k8s/overlays/podmonitor/podmonitor.yaml"):
        with open(os.path.join(ROOT, rel)) as f:
            spec = yaml.safe_load(f)["spec"]
        for ep in spec.get("endpoints") or spec.get("podMetricsEndpoints"):
            intervals[ep["port"]] = max(intervals.get(ep["port"], 0), _seconds(ep["interval"]))
    assert set(intervals) == {"metrics", "telemetry"}, intervals
    telemetry = declared_telemetry_names()
    problems = []
    for p in panels(load()):
        for t in p["targets"]:
            if "$__rate_interval" not in t["expr"]:
                continue
            names = selectors(t["expr"])
            scraped = max(intervals["telemetry" if name in telemetry else "metrics"] for name in names)
            s = _seconds(p.get("interval") or "15s")
            window = max(s + s, 4 * s)  # $__interval is at least the min interval S
            if window < 4 * scraped:
                problems.append(f"panel {p['title']!r} {t['refId']}: $__rate_interval can be {window:g}s over series "
                                f"scraped every {scraped:g}s")
    assert not problems, "\n".join(problems)


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


def _working_set(pod: PodCgroup) -> int:
    """The pod's working set as the kernel accounts it now (usage - inactive_file), the panel's ground truth."""
    v1 = f"/sys/fs/cgroup/memory{pod.pod_path}"
    base, usage, inactive = (v1, "memory.usage_in_bytes", "total_inactive_file") if os.path.isdir(v1) else \
        (f"{v2_root()}{pod.pod_path}", "memory.current", "inactive_file")
    with open(f"{base}/{usage}") as f:
        used = int(f.read())
    with open(f"{base}/memory.stat") as f:
        stat = dict(line.split() for line in f)
    return max(used - int(stat[inactive]), 0)


def _has_data(rows) -> bool:
    return any(not math.isnan(v) for _, v in rows)


class Live:
    """What the `live` fixture started: the Prometheus, the pods, and what the workload did."""

    prom: PrometheusServer
    trainer: PodCgroup
    web: PodCgroup
    log_path: str
    telemetry: int
    agent: subprocess.Popen
    retrans: int | None = None
    retrans_problem: str = ""  # why `retrans` is None


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real Prometheus scraping a real `podmeter run` (the DaemonSet's pipelines.yaml) on real pod cgroups.

    trainer-0 (ml): two busy processes under half a core (throttled); process 1 on GPU 0 (10 GiB, 70% SM), process
    2 on MIG device MIG1 of GPU 2 (8 GiB); the kubelet allocated it GPU 0 and MIG1. web-0 (web): idle, 48 MiB
    limit, one process OOM-killed; allocated GPU 1, which it does not use. A process outside every pod uses 1 GiB
    and 20% SM of GPU 0 (a host daemon): GPU 0 shows 12 GiB used and 65% busy in all."""
    require(os.geteuid() == 0, "needs root: pod-shaped cgroups, eBPF")
    prometheus_binary()
    for type_ in (*RECEIVERS, "prometheus", "k8sattributes"):
        kind = "exporter" if type_ == "prometheus" else "processor" if type_ == "k8sattributes" else "receiver"
        require(registry().get(kind, type_) is not None, f"needs the {type_} {kind}")
    require(shutil.which("gcc") is not None, "needs gcc to build the fake libnvidia-ml.so.1")
    from harness.apiserver import ApiServer
    from harness.apiserver import pod as api_pod
    from harness.fake_nvml import GPU, MigDevice, Process, Scenario, Xid, build_fake_nvml

    tmp_path = tmp_path_factory.mktemp("dashboard")
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
        host_daemon = subprocess.Popen(["sleep", "600"])  # in no pod
        cleanup.append(lambda: stop_process(host_daemon, 5))

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
        kubelet = serve_podresources(socket_path, {("ml", "trainer-0", "main"): [UUID0, MIG1],
                                                   ("web", "web-0", "main"): [UUID1]})
        cleanup.append(lambda: kubelet.stop(0).wait())

        scenario = str(tmp_path / "nvml-scenario.txt")
        # GPU 1 is an older model: no GPM, and a remapped row waiting for a reset
        nvml_scenario = Scenario(
            gpus=[GPU(uuid=UUID0, mem_used=12 * GiB, util_gpu=65, gpm={2: 60, 5: 30}, temp=61, temp_slowdown=89,
                      mem_temp=70, temp_mem_max=95),
                  GPU(uuid=UUID1, util_gpu=0, remap_unc=2, remap_pending=1, temp_slowdown=90),
                  GPU(uuid=UUID2, mem_used=10 * GiB, mig=1, gpm={})],
            mig=[MigDevice(gpu=2, gi=1, uuid=MIG1, mem_used=9 * GiB, gpm={2: 40, 5: 20}),
                 MigDevice(gpu=2, gi=2, uuid=MIG2, mem_used=1 * GiB, gpm={2: 10, 5: 0})],
            processes=[Process(pid=burners[0].pid, gpu=0, used_mem=10 * GiB, sm=70),
                       Process(pid=burners[1].pid, gpu=2, gi=1, ci=0, used_mem=8 * GiB),
                       Process(pid=host_daemon.pid, gpu=0, used_mem=1 * GiB, sm=20)])
        nvml_scenario.write(scenario)

        # the DaemonSet's pipelines.yaml, with host paths, ports and the API server of this machine merged over it
        port, health, telemetry = free_port(), free_port(), free_port()
        override = {
            "receivers": {
                "cgroup": {"cgroup_root": "/sys/fs/cgroup", "proc_root": "/proc", "collection_interval": "1s", "timeout": "10s",
                           "initial_delay": "0s"},
                "podresources": {"endpoint": f"unix://{socket_path}", "collection_interval": "1s", "timeout": "10s",
                                 "refresh_interval": "1s", "initial_delay": "0s"},
                "nvml": {"library_path": lib, "proc_root": "/proc", "collection_interval": "1s", "timeout": "10s",
                         "initial_delay": "0s", "gpm": True},
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

            # events while everything watches: two XID errors on GPU 1 and PCIe replays on GPU 0, an OOM kill in
            # web-0, TCP retransmissions in trainer-0
            gpus = list(nvml_scenario.gpus)
            gpus[0] = dataclasses.replace(gpus[0], pcie_replays=40)
            dataclasses.replace(nvml_scenario, gpus=gpus, xids=[Xid(1, 48), Xid(1, 63)]).write(scenario)
            victim = web.spawn([sys.executable, WORKLOAD, "alloc", "512"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
            assert victim.wait(timeout=120) == -9, "the memory-limited process was not OOM-killed"
            state = Live()
            state.prom, state.trainer, state.web, state.log_path, state.telemetry = prom, trainer, web, log_path, telemetry
            state.agent = agent
            if shutil.which("unshare") and shutil.which("tc") and shutil.which("ip"):
                script = ("ip link set lo up && ip link set lo mtu 1500 && "
                          "tc qdisc add dev lo root tbf rate 20mbit burst 16kb limit 30000 && "
                          f"exec {sys.executable} {WORKLOAD} tcp {2 << 20}")
                p = trainer.spawn(["unshare", "-n", "sh", "-c", script], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                out, err = p.communicate(timeout=180)
                if p.returncode == 0:
                    state.retrans = json.loads(out.strip().splitlines()[-1])["RetransSegs"]
                else:
                    state.retrans_problem = f"the retransmitting workload failed ({p.returncode}): {err[-2000:]}"
            else:
                state.retrans_problem = "no unshare, tc or ip on PATH (make test-deps installs them)"
            yield state
        assert "Traceback" not in log_path.read_text()
    finally:
        stop_process(agent, 20)
        for fn in reversed(cleanup):
            fn()
        trainer.destroy()
        web.destroy()


@pytest.mark.slow
def test_every_panel_query_returns_data_from_a_real_prometheus(live):
    prom, log_path = live.prom, live.log_path
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

    if live.retrans:
        # the counter reaches the kernel's own count once the next collection is scraped
        prom.wait_for('sum(container_tcp_retransmits_total{k8s_pod_name="trainer-0"})',
                      lambda rows: rows and abs(rows[0][1] - live.retrans) <= 0.05 * live.retrans + 2)
    else:
        why = live.retrans_problem or "the workload's connection had no retransmission"
        if IN_CI:  # the retransmit panel's values would be checked against nothing
            pytest.fail(f"retransmit panel unchecked: {why}", pytrace=False)
        print(f"retransmit panel unchecked: {why}")
    # one source per series: the shipped config keeps CRI and eBPF from duplicating cgroup's series
    dup = prom.query('count by (k8s_pod_uid, container_id, cpu_mode) '
                     '(container_cpu_time_seconds_total{k8s_pod_name=~"trainer-0|web-0"}) > 1')
    assert dup == [], dup
    with urllib.request.urlopen(f"http://127.0.0.1:{live.telemetry}/metrics", timeout=5) as r:
        own = r.read().decode()
    assert 'cause="duplicate_series"' not in own and 'cause="type_conflict"' not in own
    assert "Traceback" not in log_path.read_text()


def _target(title: str, ref: str) -> dict:
    [t] = [t for p in panels(load()) if p["title"] == title for t in p["targets"] if t["refId"] == ref]
    return t


def _legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def _shown(prom: PrometheusServer, title: str, ref: str, variables: dict, key=None) -> tuple[dict, list]:
    """What the panel shows: {legend (or key(labels) for tables): value}, and what is wrong with its legends (two
    series sharing one, a label no series has)."""
    t = _target(title, ref)
    out: dict = {}
    clashes = []
    rows = prom.query(substitute(t["expr"], variables))
    if rows and not key:  # a legend naming a label no series has shows nothing where the user expects a name
        present = {name for labels, _ in rows for name in labels}
        clashes += [f"{{{{{name}}}}} is on no series" for name in re.findall(r"\{\{\s*(\w+)\s*\}\}", t["legendFormat"])
                    if name not in present]
    for labels, value in rows:
        name = key(labels) if key else _legend(t["legendFormat"], labels)
        if name in out:
            clashes.append(name)
        out[name] = value
    return out, clashes


def _near(value: float | None, expected: float, rel: float = 0.02, abs_: float = 1e-9) -> bool:
    return value is not None and not math.isnan(value) and abs(value - expected) <= max(rel * abs(expected), abs_)


@pytest.mark.slow
def test_every_panel_shows_what_the_workload_did(live):
    """Each panel's own expression, with the test's pods selected and with `All` selected, against what the pods,
    GPUs and kernel did: values, not just data. A table of wrong values (or of series two legends share) fails."""
    prom, trainer, web = live.prom, live.trainer, live.web
    mib = 1 << 20
    pods = lambda labels: (labels.get("k8s_pod_name", ""), labels.get("hw_id", ""))  # noqa: E731
    errs = lambda labels: (labels.get("component", ""), labels.get("cause", ""))  # noqa: E731
    gpus = lambda labels: labels.get("hw_gpu_index", "")  # noqa: E731
    checks = [
        # GPU: trainer-0's two processes (10 GiB on GPU 0, 8 GiB on a MIG device); the host daemon is in no pod
        ("GPU memory by pod", "A", None, lambda s: s == {"ml/trainer-0": 18 * GiB}),
        ("GPU memory by namespace", "A", None, lambda s: s == {"ml": 18 * GiB}),
        ("GPU utilization by pod", "A", None, lambda s: s.keys() == {"ml/trainer-0"} and _near(s["ml/trainer-0"], .7)),
        ("GPU utilization by namespace", "A", None, lambda s: s.keys() == {"ml"} and _near(s["ml"], .7)),
        ("GPUs allocated vs used by pod", "A", None,
         lambda s: s == {"allocated ml/trainer-0": 2, "allocated web/web-0": 1}),
        ("GPUs allocated vs used by pod", "B", None,
         lambda s: s.keys() == {"used ml/trainer-0"} and _near(s["used ml/trainer-0"], .7)),
        ("Allocated GPUs and their use", "A", pods,
         lambda s: s.keys() == {("trainer-0", UUID0), ("web-0", UUID1)} and _near(s["trainer-0", UUID0], .65)
         and s["web-0", UUID1] == 0),
        ("Allocated GPUs and their use", "B", pods,
         lambda s: s == {("trainer-0", UUID0): 12 * GiB, ("web-0", UUID1): 0, ("trainer-0", MIG1): 9 * GiB}),
        ("GPU device utilization", "A", None,
         lambda s: s.keys() == {f"{NODE} GPU 0", f"{NODE} GPU 1"} and _near(s[f"{NODE} GPU 0"], .65)
         and s[f"{NODE} GPU 1"] == 0),
        # GPU 0: 12 of 80 GiB; GPU 1: none; GPU 2 (MIG mode): 10 of 80 GiB, its MIG devices 9 and 1 of 10 GiB
        ("GPU device memory used", "A", None,
         lambda s: len(s) == 5 and all(_near(a, b) for a, b in zip(sorted(s.values()), [0, .1, .125, .15, .9], strict=True))),
        # GPU health: GPU 1's two XIDs and its remapped row, GPU 0's replays; GPU 2 (MIG) has had none
        ("GPU health", "A", gpus, lambda s: s == {"0": 0, "1": 2, "2": 0}),
        ("GPU health", "B", gpus, lambda s: s == {"0": 0, "1": 2, "2": 0}),
        ("GPU health", "C", gpus, lambda s: s == {"0": 0, "1": 1, "2": 0}),
        ("GPU health", "D", gpus, lambda s: s.get("0", 0) >= 40 and s.get("1") == 0),
        # degrees below each GPU's own limits: GPU 0 at 61 of 89 and its memory at 70 of 95; GPU 1 at 40 of 90 and
        # no memory sensor; GPU 2 reports no limit
        ("GPU health", "E", gpus, lambda s: s == {"0": 28, "1": 50}),
        ("GPU health", "F", gpus, lambda s: s == {"0": 25}),
        # GPM: GPU 0, and GPU 2's two MIG instances; GPU 1 has no GPM
        ("GPU SM activity", "A", None,
         lambda s: s == {f"{NODE} GPU 0  SMs": .6, f"{NODE} GPU 2 1 SMs": .4, f"{NODE} GPU 2 2 SMs": .1}),
        ("GPU SM activity", "B", None,
         lambda s: s == {f"{NODE} GPU 0  tensor": .3, f"{NODE} GPU 2 1 tensor": .2, f"{NODE} GPU 2 2 tensor": 0}),
        # CPU: two busy processes under a quota of half a core; web-0 sleeps
        ("CPU by pod", "A", None,
         lambda s: s.keys() == {"ml/trainer-0", "web/web-0"} and .35 <= s["ml/trainer-0"] <= .7
         and s["web/web-0"] < .05),
        ("CPU by namespace", "A", None, lambda s: s.keys() == {"ml", "web"} and .35 <= s["ml"] <= .7 and s["web"] < .05),
        ("CPU throttling by pod", "A", None, lambda s: s.get("periods ml/trainer-0", 0) > .8),
        ("CPU throttling by pod", "B", None, lambda s: s.get("throttled time ml/trainer-0", 0) > .1),
        # trainer-0 runs at its quota of half a core (as "CPU by pod" sees it); web-0 has no CPU limit
        ("CPU usage vs limit by container", "A", None,
         lambda s: s.keys() == {"ml/trainer-0/main"} and .7 <= s["ml/trainer-0/main"] <= 1.4),
        # memory: the kernel's own working set of each pod now
        ("Memory working set by pod", "A", None,
         lambda s: s.keys() == {"ml/trainer-0", "web/web-0"}
         and _near(s["ml/trainer-0"], _working_set(trainer), .15, 2 * mib)
         and _near(s["web/web-0"], _working_set(web), .15, 2 * mib)),
        ("Memory working set by namespace", "A", None,
         lambda s: s.keys() == {"ml", "web"} and _near(s["ml"], _working_set(trainer), .15, 2 * mib)),
        ("Memory working set vs limit by container", "A", None,
         lambda s: s.keys() == {"web/web-0/main"} and _near(s["web/web-0/main"], _working_set(web) / (48 * mib), .15,
                                                            .05)),
        ("OOM kills by pod", "A", None,
         lambda s: round(s.get("web/web-0", 0)) == 1 and s.get("ml/trainer-0") == 0),
        # kernel (eBPF): trainer-0 sleeps 1 ms between bursts (a syscall and a voluntary switch each) and waits for
        # its quota on the run queue
        ("Run-queue latency p99 by pod", "A", None, lambda s: 0 < s.get("p99 ml/trainer-0", 0) <= 1.1),
        ("Context switches by pod", "A", None, lambda s: s.get("voluntary ml/trainer-0", 0) > 10),
        ("Syscall errors by pod", "B", None, lambda s: s.get("all ml/trainer-0", 0) > 10),
        # the agent itself
        ("Collection time p99 by receiver", "A", None,
         lambda s: {f"{NODE} {r}" for r in RECEIVERS} <= s.keys() and all(0 < v < 10 for v in s.values())),
        ("Errors by component and cause", "A", errs, lambda s: s.get(("cri", "socket_absent"), 0) >= 1),
        ("Agent memory and CPU", "A", None, lambda s: 10 * mib < s.get(f"{NODE} memory", 0) < 2048 * mib),
        ("Agent memory and CPU", "B", None, lambda s: 0 < s.get(f"{NODE} CPU cores", 0) <= 2),
    ]
    psi = prom.query('k8s_pod_pressure_stall_time_seconds_total{pressure_resource="cpu"}')
    if psi:
        checks.append(("Pressure stall by pod", "A", None, lambda s: s.get("cpu ml/trainer-0", 0) > .1))
    elif IN_CI:
        pytest.fail("pressure panel unchecked: no k8s_pod_pressure_stall_time_seconds_total (PSI off on this kernel?)",
                    pytrace=False)
    problems = []
    for name, variables in (("selected", VARIABLES), ("All", all_selected())):
        pending = list(checks)
        deadline = time.monotonic() + 60  # rates need a window of samples; counters the next collection
        while pending:
            last = {}
            for check in list(pending):
                title, ref, key, ok = check
                shown, clashes = _shown(prom, title, ref, variables, key)
                last[check] = (shown, clashes)
                if not clashes and ok(shown):
                    pending.remove(check)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(1)
        for title, ref, key, ok in pending:
            shown, clashes = last[title, ref, key, ok]
            problems.append(f"{name}: panel {title!r} {ref} shows {shown}"
                            + (f" (legend problems: {clashes})" if clashes else ""))
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_the_target_info_joins_the_exporter_readme_gives(live):
    """The joins exporters/prometheus/README.md gives, run by a real Prometheus on a node with GPU processes in
    pods (their target_info carries their container's container_id and their GPU's hw_id) and MIG devices: each
    returns its entity's descriptive label, none is refused as many-to-many."""
    prom = live.prom
    readme = open(os.path.join(ROOT, "exporters", "prometheus", "README.md")).read()
    joins = re.findall(r"- a (container|pod|GPU): `(\* on \(\w+\) group_left \((\w+)\) target_info\{[^`]*\})`", readme)
    assert {kind for kind, _, _ in joins} == {"container", "pod", "GPU"}, joins
    left = {"container": 'container_memory_working_set_bytes{k8s_pod_name="trainer-0"}',
            "pod": 'k8s_pod_memory_working_set_bytes{k8s_pod_name="trainer-0"}',
            "GPU": "hw_gpu_memory_usage_bytes"}
    prom.wait_for('target_info{process_pid!=""}')  # the GPU processes' own target_info is there to collide with
    for kind, join, label in joins:
        expr = f"{left[kind]} {join}"
        try:
            rows = prom.query(expr)
        except Exception as exc:  # HTTP 422: many-to-many
            body = exc.read().decode(errors="replace") if hasattr(exc, "read") else ""
            pytest.fail(f"{kind} join refused: {expr}: {exc} {body}")
        assert rows and all(r.get(label) for r, _ in rows), (kind, expr, rows)


@pytest.mark.slow
def test_oom_kills_of_a_container_first_read_after_its_kill(live):
    """The classic OOM kill: a container killed (and replaced under a new id) between two collections. Its own
    series starts with the kill already counted, or never appears at all (on cgroup v2 it is removed first), and
    increase() counts nothing in a series that starts after the event: the panel must not sum container series.
    A second container of web-0 is made and one of its processes OOM-killed while the agent is stopped (SIGSTOP,
    so that no collection falls between), as a runtime does while the agent reads other cgroups."""
    prom, web = live.prom, live.web
    require(live.agent.poll() is None, "the agent of the live fixture exited")
    panel = lambda variables: _shown(prom, "OOM kills by pod", "A", variables)[0].get("web/web-0", 0)  # noqa: E731
    # the fixture's kill first, settled (increase() extrapolates a young series' step)
    prom.wait_for('k8s_pod_memory_oom_kills_total{k8s_pod_name="web-0"} == 1', timeout=60)
    wait_for(lambda: 0.9 <= panel(VARIABLES) < 1.5, timeout=90, interval=1, what="web-0's first OOM kill on the panel")
    second = PodCgroup(uid=web.uid, qos=web.qos)
    live.agent.send_signal(signal.SIGSTOP)
    try:
        second.create()
        _limit_memory(second, 48 << 20)
        second.spawn(["sleep", "600"])  # the container lives on, as one whose worker was killed
        victim = second.spawn([sys.executable, WORKLOAD, "alloc", "512"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        assert victim.wait(timeout=120) == -9, "the memory-limited process was not OOM-killed"
    finally:
        live.agent.send_signal(signal.SIGCONT)
    try:
        # the new container's series is scraped a few times (first read with its kill counted)
        prom.wait_for(f'count_over_time(container_memory_oom_kills_total{{container_id="{second.container_id}"}}[15m])'
                      ' >= 5', timeout=60)
        shown = {}
        for name, variables in (("selected", VARIABLES), ("All", all_selected())):
            deadline = time.monotonic() + 30
            while (shown.setdefault(name, panel(variables)) < 1.8) and time.monotonic() < deadline:
                time.sleep(1)
                shown[name] = panel(variables)
        # two kills in web-0: the fixture's and this one
        assert all(1.8 <= v < 2.9 for v in shown.values()), shown
    finally:
        for proc in second.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_errors_table_counts_an_error_whose_series_starts_with_it(tmp_path):
    """An error cause's counter is made at its first error, so its series starts at 1: increase() alone counts
    nothing for an error that happened once (a 403, a GPU falling off the bus), and the table showed it as 0. A real
    Prometheus scrapes a stand-in for the agent's :8888 serving one old cause that does not change and, later, one
    that appears with its single error; the table's expression must show 0 and 1. (A stand-in: the agent's own
    one-off errors cannot be caused on cue here.)"""
    import http.server
    import threading

    prometheus_binary()
    series = {'component="cri",cause="socket_absent"': 5}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = "# TYPE podmeter_component_errors_total counter\n" + "".join(
                f"podmeter_component_errors_total{{{labels}}} {value}\n" for labels, value in list(series.items()))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prom = PrometheusServer([f"127.0.0.1:{server.server_address[1]}"])
        with open(prom.config_path) as f:
            cfg = yaml.safe_load(f)
        cfg["scrape_configs"][0]["static_configs"][0]["labels"] = {"node": NODE}
        with open(prom.config_path, "w") as f:
            yaml.safe_dump(cfg, f)
        variables = dict(VARIABLES, **{"$__range": "20s"})
        with prom:
            # the old cause has samples from before the range
            prom.wait_for('count_over_time(podmeter_component_errors_total[1h]) >= 25', timeout=90)
            series['component="k8sattributes",cause="forbidden"'] = 1  # its first (and only) error
            prom.wait_for('count_over_time(podmeter_component_errors_total{cause="forbidden"}[1h]) >= 4', timeout=60)
            shown, _ = _shown(prom, "Errors by component and cause", "A", variables,
                              lambda labels: (labels.get("component", ""), labels.get("cause", "")))
    finally:
        server.shutdown()
        server.server_close()
    assert shown.keys() == {("cri", "socket_absent"), ("k8sattributes", "forbidden")}, shown
    assert shown["cri", "socket_absent"] == 0, shown
    assert _near(shown["k8sattributes", "forbidden"], 1, 0.1), shown
