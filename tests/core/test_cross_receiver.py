"""Cross-receiver consistency on real pods: users join cgroup, cri, ebpf (and nvml, podresources) data on pod
identity, so every receiver must describe one pod and one container with the same attribute values.

One agent (the runtime's Service) runs cgroup + cri + ebpf + k8sattributes on real containerd pods (the CRI
harness: real containerd + runc, kubelet-shaped pods under /kubepods/burstable/pod<uid>/<id>), exporting to the
prometheus exporter and to an in-test recording exporter that keeps the last processed batch of each receiver.
The shipped pipelines.yaml is also run through the CLI (`podmeter run`, `podmeter collect --once`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from harness import free_port, http_get, require, require_root, stop_process, wait_for
from harness.containerd import Containerd, available

from podmeter.attribution import read_process
from podmeter.component import Exporter, Factory, registry
from podmeter.config import ComponentConfig, load
from podmeter.runtime import Service

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PODMETER = os.path.join(os.path.dirname(sys.executable), "podmeter")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RECEIVERS = ("cgroup", "cri", "ebpf")
# a child allocates past the container's 64 MiB limit and is OOM-killed; the shell (PID 1) stays
HOG = ["/bin/sh", "-c", "dd if=/dev/zero of=/dev/null bs=200M count=1; sleep 3600"]


# ---------------------------------------------------------------------------------------------------------
# An exporter that keeps, per receiver (scope), the last batch the pipeline produced (after k8sattributes)

LATEST: dict[str, list] = {}
_LOCK = threading.Lock()


class _KeepConfig(ComponentConfig):
    pass


class _KeepExporter(Exporter):
    def __init__(self, settings, config) -> None:
        super().__init__()

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        from opentelemetry.sdk.metrics.export import MetricExportResult

        by_scope: dict[str, list] = {}
        for rm in metrics_data.resource_metrics:
            for sm in rm.scope_metrics:
                by_scope.setdefault(sm.scope.name.rpartition("/")[2], []).append((dict(rm.resource.attributes), sm))
        with _LOCK:
            LATEST.update(by_scope)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        pass


def _register_keep() -> None:
    registry().register(Factory("exporter", "xkeep", _KeepConfig, _KeepExporter))


def latest(receiver: str) -> list[tuple[dict, object]]:
    with _LOCK:
        return list(LATEST.get(receiver, []))


def resources(receiver: str, uid: str | None = None) -> list[dict]:
    return [a for a, _ in latest(receiver) if uid is None or a.get("k8s.pod.uid") == uid]


def metric_values(receiver: str, container_id: str, name: str) -> list[float]:
    return [p.value for a, sm in latest(receiver) if a.get("container.id") == container_id
            for m in sm.metrics if m.name == name for p in m.data.data_points]


def _ebpf_prereqs() -> None:
    from harness.cgroups import v2_root

    from receivers.ebpf.programs import DEFAULT_OBJECT

    require(os.path.exists("/sys/kernel/btf/vmlinux"), "needs a kernel with BTF")
    require(v2_root() is not None, "needs a cgroup2 hierarchy")
    require(os.path.exists(DEFAULT_OBJECT), f"{DEFAULT_OBJECT} not built: run `make bpf`")


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one containerd with one pod, one agent running every pod receiver on it


@pytest.fixture(scope="module")
def node():
    require_root()
    ok, why = available()
    require(ok, why)
    c = Containerd().start()
    try:
        pod = c.run_pod("web-0", "shop", containers={
            "app": ["/bin/sh", "-c", "while :; do sleep 0.2; done"],
            "side": ["/bin/sleep", "3600"],
        })
        yield c, pod
    finally:
        c.close()


class Agent:
    def __init__(self, service, prom_port, tel_port, pod, ctrd) -> None:
        self.service, self.prom_port, self.tel_port, self.pod, self.ctrd = service, prom_port, tel_port, pod, ctrd

    def scrape(self) -> str:
        got = http_get(f"http://127.0.0.1:{self.prom_port}/metrics")
        assert got and got[0] == 200, got
        return got[1]

    def telemetry(self) -> str:
        got = http_get(f"http://127.0.0.1:{self.tel_port}/metrics")
        assert got and got[0] == 200, got
        return got[1]


@pytest.fixture(scope="module")
def agent(node, tmp_path_factory):
    """cgroup + cri + ebpf (each with its own defaults) -> k8sattributes -> prometheus and the recording exporter."""
    _ebpf_prereqs()
    _register_keep()
    c, pod = node
    prom_port, tel_port = free_port(), free_port()
    path = tmp_path_factory.mktemp("xr") / "agent.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          cgroup: {{collection_interval: 1s, initial_delay: 0s}}
          cri: {{endpoint: "{c.endpoint}", collection_interval: 1s, initial_delay: 0s}}
          ebpf: {{collection_interval: 1s, initial_delay: 0s}}
        processors:
          k8sattributes: {{auth_type: none}}
        exporters:
          prometheus: {{endpoint: "127.0.0.1:{prom_port}"}}
          xkeep:
        service:
          telemetry: {{metrics: {{address: "127.0.0.1:{tel_port}"}}}}
          pipelines:
            metrics:
              receivers: [cgroup, cri, ebpf]
              processors: [k8sattributes]
              exporters: [prometheus, xkeep]
        """))
    LATEST.clear()
    service = Service(load([str(path)], env={}))
    service.start()
    try:
        # after ebpf is attached: an OOM kill both the cgroup and ebpf receivers can count
        hog = c.add_container(pod, "hog", HOG)
        app = pod.containers["app"]

        def ready():
            return (any(a.get("container.id") == app for a in resources("ebpf"))
                    and any(a.get("container.id") == app for a in resources("cri"))
                    and any(v >= 1 for v in metric_values("cgroup", hog, "container.memory.oom.kills")))

        wait_for(ready, timeout=60, interval=0.2, what="cgroup, cri and ebpf data on the pod, and the OOM kill")
        time.sleep(2.5)  # one more collection of each, so every batch comes from after the OOM kill
        yield Agent(service, prom_port, tel_port, pod, c)
    finally:
        service.shutdown(timeout=10)


# ---------------------------------------------------------------------------------------------------------
# Identity: pod uid, container id, names


def test_pod_uid_and_container_id_have_one_form_in_every_receiver(agent):
    pod, ids = agent.pod, set(agent.pod.containers.values()) | {agent.pod.sandbox_id}
    for r in RECEIVERS:
        mine = resources(r, pod.uid)
        assert mine, f"{r}: nothing for pod {pod.uid}"
        for a in resources(r):
            uid = a.get("k8s.pod.uid")
            if uid is not None:
                assert UUID.match(uid), f"{r}: k8s.pod.uid {uid!r} is not the dashed lowercase form"
        for a in mine:
            cid = a.get("container.id")
            if cid is None:
                continue
            assert HEX64.match(cid), f"{r}: container.id {cid!r} is not bare 64-hex"
            assert cid in ids, f"{r}: container.id {cid} is none of the pod's ({ids})"
    app = pod.containers["app"]
    for r in RECEIVERS:
        assert any(a.get("container.id") == app for a in resources(r, pod.uid)), f"{r} has no series for app"


def test_names_are_identical_after_k8sattributes_whichever_receiver(agent):
    pod = agent.pod
    keys = ("k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "k8s.container.name")
    by_cid: dict[str, set] = {}
    for r in RECEIVERS:
        for a in resources(r, pod.uid):
            if a.get("container.id"):
                by_cid.setdefault(a["container.id"], set()).add((r, tuple(a.get(k) for k in keys)))
    for name, cid in pod.containers.items():
        seen = by_cid.get(cid, set())
        assert {v for _, v in seen} == {(pod.uid, "web-0", "shop", name)}, (name, seen)
    # pod-level resources (no container.id) name the pod the same way too
    for r in ("cgroup",):
        pod_level = [a for a in resources(r, pod.uid) if "container.id" not in a]
        assert pod_level and all((a.get("k8s.pod.name"), a.get("k8s.namespace.name")) == ("web-0", "shop")
                                 for a in pod_level), pod_level


def test_ebpf_and_cgroup_resolve_one_process_to_the_same_pod_and_container(agent):
    """The ebpf receiver's per-cgroup-id data, the cgroup receiver's directories and the PID attribution nvml and
    k8sattributes use (PID -> /proc/<pid>/cgroup) agree on the app container's process."""
    pod, c = agent.pod, agent.ctrd
    app = pod.containers["app"]
    pid = c.container_pid(app)
    info = read_process("/proc", pid)
    assert info is not None and (info.ref.pod_uid, info.ref.container_id) == (pod.uid, app), info
    ident = ("k8s.pod.uid", "container.id", "container.runtime.name", "k8s.pod.qos_class")
    process_attrs = {k: v for k, v in info.attributes().items() if k in ident}
    for r in ("cgroup", "ebpf"):
        mine = [a for a in resources(r, pod.uid) if a.get("container.id") == app]
        assert mine, f"{r} has no series for the app container"
        for a in mine:
            # (after k8sattributes, which may add what the cgroup path does not say, e.g. the runtime)
            assert {k: a.get(k) for k in process_attrs} == process_attrs, (r, a, process_attrs)


def test_pause_container_is_treated_the_same_by_cgroup_and_cri(agent):
    """The sandbox (pause) container: the cgroup receiver reports it (README: "reported like any other
    container"), with no k8s.container.name, as cAdvisor on containerd does (container=""); the cri receiver has no
    stats for it (ListContainerStats lists containers only) and its provider names no container for the sandbox id,
    so the two agree: same container.id, same pod names, no container name from either."""
    pod = agent.pod
    sb = pod.sandbox_id
    cg = [a for a in resources("cgroup", pod.uid) if a.get("container.id") == sb]
    assert cg, "the cgroup receiver does not report the sandbox container"
    assert all(a.get("k8s.container.name") in (None, "") for a in cg), cg
    assert all((a.get("k8s.pod.name"), a.get("k8s.namespace.name")) == ("web-0", "shop") for a in cg), cg
    assert not [a for a in resources("cri", pod.uid) if a.get("container.id") == sb]
    assert not [a for a in resources("ebpf", pod.uid) if a.get("container.id") == sb and a.get("k8s.container.name")]


def test_container_runtime_name_agrees_across_receivers(agent):
    app = agent.pod.containers["app"]
    values = {r: {a.get("container.runtime.name") for a in resources(r) if a.get("container.id") == app}
              for r in RECEIVERS}
    assert len(set().union(*values.values())) == 1, values


# ---------------------------------------------------------------------------------------------------------
# The same entity, the same resource attribute set: target_info and PromQL joins


def _target_infos(text: str, container_id: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith("target_info{") and f'container_id="{container_id}"' in line]


def test_promoted_labels_are_the_same_set_per_kind_of_entity(agent):
    """What becomes a Prometheus label by default (the exporter's promote list) is one set for every container
    series and one for every pod series, whichever receiver sent it: `sum by (k8s_pod_name)` works across metrics."""
    from exporters.prometheus.config import DEFAULT_PROMOTED
    from exporters.prometheus.translate import promoter

    promote = promoter(list(DEFAULT_PROMOTED), False)
    pod = agent.pod
    named = set(pod.containers.values())
    sets: dict[str, set] = {"container": set(), "pod": set()}
    for r in RECEIVERS:
        for a in resources(r, pod.uid):
            if a.get("container.id") == pod.sandbox_id:
                continue  # nameless by design (see the pause test)
            kind = "container" if "container.id" in a else "pod"
            assert kind == "pod" or a["container.id"] in named
            sets[kind].add((r, frozenset(k for k in a if promote(k))))
    assert {s for _, s in sets["container"]} == {frozenset({"k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name",
                                                            "k8s.container.name", "container.id"})}, sets
    assert {s for _, s in sets["pod"]} == {frozenset({"k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name"})}, sets
    text = agent.scrape()
    assert 'k8s_pod_name="web-0"' in text


def test_one_target_info_per_container_so_promql_joins_work(agent):
    from harness.prometheus import PrometheusServer, prometheus_binary

    prometheus_binary()
    app = agent.pod.containers["app"]
    # the user's join, as the prometheus exporter's README gives it: metadata from target_info onto a cgroup
    # metric, selecting containers' target_info (a node's pods each have one without container_id as well)
    with PrometheusServer([f"127.0.0.1:{agent.prom_port}"]) as prom:
        prom.wait_for(f'target_info{{container_id="{app}"}}')
        expr = (f'container_memory_working_set_bytes{{container_id="{app}"}} '
                '* on (container_id) group_left (container_image_name) target_info{container_id!="",process_pid=""}')
        try:
            rows = prom.query(expr)
        except Exception as exc:  # HTTP 422: many-to-many matching
            body = exc.read().decode(errors="replace") if hasattr(exc, "read") else ""
            pytest.fail(f"PromQL join failed: {exc} {body}")
        assert [r.get("container_image_name") for r, _ in rows] == ["localhost/podmeter-busybox"], rows
    infos = _target_infos(agent.scrape(), app)
    assert len(infos) == 1, "\n".join(infos)


def test_descriptive_resource_attributes_agree_per_container(agent):
    """Beyond the promoted labels: for one container, every receiver's resource (after k8sattributes) carries the
    same attributes, so OTLP backends and target_info see one resource, not three."""
    app = agent.pod.containers["app"]
    ignore = {"cgroup.path"}
    sets = {r: {frozenset((k, v) for k, v in a.items() if k not in ignore)
                for a in resources(r) if a.get("container.id") == app} for r in RECEIVERS}
    union = set().union(*sets.values())
    assert len(union) == 1, {r: [dict(s) for s in v] for r, v in sets.items()}


# ---------------------------------------------------------------------------------------------------------
# One meaning, one name; one name, one series


def _prom_name(metric) -> str:
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    from exporters.prometheus.translate import metric_name

    data = metric.data
    if isinstance(data, Sum):
        kind = "counter" if data.is_monotonic else "updowncounter"
    elif isinstance(data, Histogram):
        kind = "histogram"
    elif isinstance(data, Gauge):
        kind = "gauge"
    else:
        kind = "gauge"
    return metric_name(metric.name, metric.unit or "", kind, True)


def test_no_two_metric_names_become_one_prometheus_series(agent):
    """cgroup's container.memory.oom.kills and ebpf's former container.memory.oom_kills (on by default) were one
    meaning under two names, both exposed as container_memory_oom_kills_total with the same labels: the exporter
    dropped one as a duplicate series."""
    owners: dict[str, set] = {}
    for r in RECEIVERS:
        for _, sm in latest(r):
            for m in sm.metrics:
                owners.setdefault(_prom_name(m), set()).add((r, m.name))
    clashes = {p: sorted(o) for p, o in owners.items() if len({n for _, n in o}) > 1}
    dropped = [line for line in agent.telemetry().splitlines()
               if line.startswith("podmeter_prometheus_dropped_points_total") and 'cause="duplicate_series"' in line
               and not line.rstrip().endswith(" 0.0")]
    assert not clashes and not dropped, (clashes, dropped)


def test_oom_kills_come_from_one_receiver(agent):
    """The OOM kill of the hog container's child is counted once: by the cgroup receiver. ebpf's count of the same
    kills has the same name and is off by default (tests/ebpf counts it when turned on)."""
    hog = agent.pod.containers["hog"]
    cg = metric_values("cgroup", hog, "container.memory.oom.kills")
    eb = metric_values("ebpf", hog, "container.memory.oom.kills")
    assert cg == [1] and eb == [], (cg, eb)
    names = {a.get("k8s.container.name") for r in ("cgroup", "ebpf") for a in resources(r)
             if a.get("container.id") == hog}
    assert names == {"hog"}


def test_cri_stats_agree_with_cgroup_when_both_are_on(node, tmp_path):
    """cri's container stats are off by default (README: the cgroup receiver measures the same; two sources of one
    series double-count). Turned on, they carry the same name and the same identifying labels as cgroup's, and the
    values agree for an idle container."""
    c, pod = node
    path = tmp_path / "both.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          cgroup: {{collection_interval: 1s, initial_delay: 0s}}
          cri:
            endpoint: "{c.endpoint}"
            metrics:
              container.cpu.time: {{enabled: true}}
              container.memory.working_set: {{enabled: true}}
              container.memory.usage: {{enabled: true}}
        processors:
          k8sattributes: {{auth_type: none}}
        exporters:
          prometheus: {{endpoint: "127.0.0.1:{free_port()}"}}
        service:
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics: {{receivers: [cgroup, cri], processors: [k8sattributes], exporters: [prometheus]}}
        """))
    data = Service(load([str(path)], env={})).collect_once(wait_timeout=10)
    side = pod.containers["side"]
    got: dict[tuple, list] = {}
    labels: dict[str, set] = {}
    for rm in data.resource_metrics:
        a = dict(rm.resource.attributes)
        if a.get("container.id") != side:
            continue
        for sm in rm.scope_metrics:
            r = sm.scope.name.rpartition("/")[2]
            labels.setdefault(r, set()).add(tuple(sorted((k, a.get(k)) for k in (
                "k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "k8s.container.name", "container.id"))))
            for m in sm.metrics:
                got[(r, m.name)] = [p.value for p in m.data.data_points]
    assert labels["cgroup"] == labels["cri"], labels
    for name in ("container.memory.working_set", "container.memory.usage"):
        cg, cri = got[("cgroup", name)], got[("cri", name)]
        assert len(cg) == len(cri) == 1 and abs(cg[0] - cri[0]) <= 64 << 10, (name, cg, cri)
    cg_cpu, cri_cpu = sum(got[("cgroup", "container.cpu.time")]), sum(got[("cri", "container.cpu.time")])
    assert abs(cg_cpu - cri_cpu) <= 0.05 + 0.05 * cri_cpu, (cg_cpu, cri_cpu)


# ---------------------------------------------------------------------------------------------------------
# The shipped pipelines.yaml, as a user runs it


def test_shipped_pipelines_yaml_with_a_real_pod(node, tmp_path):
    """`podmeter run` and `podmeter collect --once` with the shipped pipelines.yaml (ports and intervals
    overridden by a second file): the pod appears once per container, under one name, with no duplicate series."""
    _ebpf_prereqs()
    c, pod = node
    prom, tel, health = free_port(), free_port(), free_port()
    override = tmp_path / "override.yaml"
    override.write_text(textwrap.dedent(f"""
        receivers:
          cgroup: {{collection_interval: 1s, initial_delay: 0s}}
          ebpf: {{collection_interval: 1s}}
        extensions:
          health_check: {{endpoint: "127.0.0.1:{health}"}}
        service:
          telemetry: {{metrics: {{address: "127.0.0.1:{tel}"}}}}
        """))
    env = dict(os.environ, PODMETER_CRI_ENDPOINT=c.endpoint, PODMETER_PROMETHEUS_ENDPOINT=f"127.0.0.1:{prom}")
    args = ["--config", os.path.join(ROOT, "pipelines.yaml"), "--config", str(override)]
    app = pod.containers["app"]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([PODMETER, "run", *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        def scraped():
            got = http_get(f"http://127.0.0.1:{prom}/metrics")
            text = got[1] if got and got[0] == 200 else ""
            return (f'container_id="{app}"' in text and "container_context_switches_total" in text
                    and "container_filesystem_usage_bytes" in text and text)

        text = wait_for(scraped, timeout=40, interval=0.25, what="the pod in the shipped configuration's output")
        time.sleep(2.5)
        text = http_get(f"http://127.0.0.1:{prom}/metrics")[1]
        telemetry = http_get(f"http://127.0.0.1:{tel}/metrics")[1]
    finally:
        stop_process(proc)
        log.close()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    keys = [line.rpartition(" ")[0] for line in samples]
    assert len(keys) == len(set(keys)), "duplicate series in the exposition"
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a family declared twice"
    drops = [line for line in telemetry.splitlines() if line.startswith("podmeter_prometheus_dropped_points_total")
             and not line.rstrip().endswith(" 0.0")]
    assert not drops, drops
    # every series about the app container names it the same way, from all three receivers
    app_lines = [line for line in samples if f'container_id="{app}"' in line and not line.startswith("target_info")]
    families = {line.partition("{")[0] for line in app_lines}
    assert {"container_cpu_time_seconds_total", "container_filesystem_usage_bytes",
            "container_context_switches_total"} <= families, families
    for line in app_lines:
        assert 'k8s_container_name="app"' in line and 'k8s_pod_name="web-0"' in line \
               and 'k8s_namespace_name="shop"' in line and f'k8s_pod_uid="{pod.uid}"' in line, line
    # `podmeter collect --once`: one group per container, the app's holding all three receivers' metrics
    out = subprocess.run([PODMETER, "collect", "--once", *args, "--wait", "10"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    heads = [line for line in out.stdout.splitlines() if line.startswith(f"POD shop/web-0 uid={pod.uid}")]
    assert len(heads) == len(set(heads)), heads
    assert f"POD shop/web-0 uid={pod.uid}  CONTAINER app" in heads, heads
    block = out.stdout.split(f"POD shop/web-0 uid={pod.uid}  CONTAINER app", 1)[1].split("\nPOD ", 1)[0]
    for metric in ("container.cpu.time", "container.filesystem.usage", "container.context_switches"):
        assert f"  {metric}" in block, (metric, block[:2000])


# ---------------------------------------------------------------------------------------------------------
# podresources: device allocations per pod container, joined to the same pod's cgroup data


@pytest.fixture
def kubelet_podresources(tmp_path, node):
    """A stand-in for the kubelet's PodResources gRPC server only (no kubelet runs here), on a real unix socket,
    listing the harness pod's app container as holding one GPU."""
    from concurrent import futures

    import grpc

    from receivers.podresources import api_pb2 as pb
    from receivers.podresources import api_pb2_grpc as pbg

    class Kubelet(pbg.PodResourcesListerServicer):
        def List(self, request, context):
            return pb.ListPodResourcesResponse(pod_resources=[pb.PodResources(
                name="web-0", namespace="shop", containers=[
                    pb.ContainerResources(name="app", devices=[pb.ContainerDevices(
                        resource_name="nvidia.com/gpu", device_ids=["GPU-6b7a1c2e-0d4f-4c1e-9f7e-1a2b3c4d5e60"])]),
                    pb.ContainerResources(name="side")])])

        def GetAllocatableResources(self, request, context):
            return pb.AllocatableResourcesResponse()

    os.makedirs(tmp_path / "kubelet" / "pod-resources")
    sock = tmp_path / "kubelet" / "pod-resources" / "kubelet.sock"
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_PodResourcesListerServicer_to_server(Kubelet(), server)
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    yield f"unix://{sock}"
    server.stop(0).wait()


def _podresources_and_cgroup(node, endpoint, tmp_path):
    c, pod = node
    path = tmp_path / "pr.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          cgroup: {{collection_interval: 1s, initial_delay: 0s}}
          cri: {{endpoint: "{c.endpoint}"}}
          podresources: {{endpoint: "{endpoint}"}}
        processors:
          k8sattributes: {{auth_type: none}}
        exporters:
          prometheus: {{endpoint: "127.0.0.1:{free_port()}"}}
        service:
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics: {{receivers: [cgroup, cri, podresources], processors: [k8sattributes], exporters: [prometheus]}}
        """))
    data = Service(load([str(path)], env={})).collect_once(wait_timeout=10)
    out: dict[str, list[dict]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            if sm.metrics:
                out.setdefault(sm.scope.name.rpartition("/")[2], []).append(dict(rm.resource.attributes))
    return pod, out


def test_podresources_names_the_same_pod_as_cgroup(node, kubelet_podresources, tmp_path):
    pod, out = _podresources_and_cgroup(node, kubelet_podresources, tmp_path)
    pr = [a for a in out.get("podresources", []) if a.get("k8s.container.name") == "app"]
    assert pr, out.get("podresources")
    cg = [a for a in out["cgroup"] if a.get("container.id") == pod.containers["app"]]
    keys = ("k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "k8s.container.name")
    assert {tuple(a.get(k) for k in keys) for a in pr + cg} == {(pod.uid, "web-0", "shop", "app")}, (pr, cg)


def test_podresources_container_series_carry_the_container_id(node, kubelet_podresources, tmp_path):
    pod, out = _podresources_and_cgroup(node, kubelet_podresources, tmp_path)
    pr = [a for a in out.get("podresources", []) if a.get("k8s.container.name") == "app"]
    assert pr and all(a.get("container.id") == pod.containers["app"] for a in pr), pr
