"""One node size: podmeter's components measured in-process on the synthetic node, the peers beside them on the
same node in the same run (nvitop-exporter, a raw read of the cgroup files), and the real agent as a process."""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field

from harness import free_port
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import Gauge, MetricsData, ResourceMetrics, ScopeMetrics

from exporters.otlp import OTLPExporter
from exporters.otlp.encode import Encoder
from podmeter.metrics import MetricSpec, count_points, make_metric, merge, number_point
from podmeter.runtime import tune_gc

from . import api as api_standin
from .agent import AgentResult, run_agent
from .components import Built, create, start_all
from .measure import Stats, cpu_per_call, proc_rss_bytes, scrape
from .node import NODE_NAME, SyntheticNode
from .peers import NvitopResult, OpenTracer, raw_read, run_nvitop
from .report import GPU_PIPELINE, GPU_PIPELINE_DAEMONSET

LOG = logging.getLogger("bench")
OTLP_MAX_BYTES = OTLPExporter.max_request_bytes


@dataclass
class ScaleResult:
    pods: int
    containers: int
    gpus: int
    procs: int
    real_cgroups: bool
    cpu: dict[str, Stats] = field(default_factory=dict)      # stage -> CPU seconds per call
    points: dict[str, int] = field(default_factory=dict)     # stage -> data points per collection
    raw: dict[str, Stats] = field(default_factory=dict)      # raw read of the cgroup receiver's files
    raw_files: int = 0
    model_floor: Stats | None = None  # making the OTel objects of one cgroup batch, nothing read or parsed
    model_metrics: int = 0
    raw_dirs: int = 0
    scrape: dict = field(default_factory=dict)               # in-process exporter (all receivers)
    gpu_scrape: dict = field(default_factory=dict)           # in-process exporter of the GPU pipeline only
    attribution: dict = field(default_factory=dict)          # GPU processes attributed to the right pod
    rss_in_process: int = 0
    nvitop: NvitopResult | None = None
    agent: AgentResult | None = None
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def component_configs(node: SyntheticNode, api) -> list[tuple[str, str, str, dict]]:
    """(kind, type, name, config) as a user would write them in pipelines.yaml for this node."""
    cfgs = [
        ("receiver", "cgroup", "", {"cgroup_root": node.cgroup_root, "proc_root": "/proc"}),
        ("receiver", "nvml", "", {"library_path": node.nvml_lib, "proc_root": "/proc"}),
        ("exporter", "prometheus", "", {"endpoint": f"127.0.0.1:{free_port()}"}),
        # a second exporter fed by the GPU pipeline alone: what compares with nvitop-exporter's exposition
        ("exporter", "prometheus", "gpu", {"endpoint": f"127.0.0.1:{free_port()}"}),
        # the same GPU pipeline as the shipped DaemonSet configuration runs it: per-container series beside the
        # per-process ones (k8s/base/pipelines.yaml), each with its own exporter
        ("receiver", "nvml", "daemonset", {"library_path": node.nvml_lib, "proc_root": "/proc",
                                           "per_container": True}),
        ("exporter", "prometheus", "gpu-daemonset", {"endpoint": f"127.0.0.1:{free_port()}"}),
    ]
    if api is not None:
        cfgs.append(("processor", "k8sattributes", "", api.k8sattributes_config(NODE_NAME)))
    return cfgs


def build(node: SyntheticNode, api, types: tuple[str, ...] = ("cgroup", "nvml", "k8sattributes", "prometheus")
          ) -> Built:
    built = Built()
    os.environ["FAKE_NVML_SCENARIO"] = node.scenario_path
    pending = []
    for kind, type_, name, cfg in component_configs(node, api):
        if type_ not in types:
            continue
        comp = create(built, kind, type_, cfg, name)
        if comp is not None:
            pending.append((kind, f"{type_}/{name}" if name else type_, comp))
    if "k8sattributes" in types and api is None:
        built.missing["k8sattributes"] = "no API stand-in to serve its pods"
    start_all(built, pending)
    k8s = built.get("k8sattributes")
    if k8s is not None and not k8s.ready(30.0):
        built.missing["k8sattributes"] = "no first sync from the API stand-in within 30 s"
        built.components.pop("k8sattributes")
    return built


def check_attribution(node: SyntheticNode, data, after_k8s=None) -> dict:
    """Every GPU process must carry its own pod's uid and container id (and, after k8sattributes, its names)."""
    expected = node.pid_to_pod()

    def by_pid(d) -> dict[int, dict]:
        out = {}
        for rm in d.resource_metrics:
            pid = rm.resource.attributes.get("process.pid")
            if pid is not None and int(pid) in expected:
                out[int(pid)] = dict(rm.resource.attributes)
        return out

    seen = by_pid(data)
    right = sum(1 for pid, pod in expected.items()
                if seen.get(pid, {}).get("k8s.pod.uid") == pod.uid
                and seen.get(pid, {}).get("container.id") == pod.containers[0][1])
    out = {"processes": len(expected), "reported": len(seen), "attributed": right}
    if after_k8s is not None:
        named = by_pid(after_k8s)
        out["named"] = sum(1 for pid, pod in expected.items()
                           if named.get(pid, {}).get("k8s.pod.name") == pod.name
                           and named.get(pid, {}).get("k8s.namespace.name") == pod.namespace
                           and named.get(pid, {}).get("k8s.container.name") == pod.containers[0][0])
    return out


def run_scale(pods: int, gpus: int, procs_per_gpu: int, iterations: int, scrapes: int, containers_per_pod: int = 2,
              nvitop: bool = True, agent: bool = True) -> ScaleResult:
    res = ScaleResult(pods, pods * containers_per_pod, gpus, gpus * procs_per_gpu, False)
    with SyntheticNode(pods, gpus, procs_per_gpu, containers_per_pod) as node:
        res.real_cgroups = node.real
        api, why = api_standin.start(node)
        if api is None:
            res.notes.append(why)
        try:
            built = build(node, api)
            res.missing.update(built.missing)
            threshold = gc.get_threshold()
            tune_gc()  # as `podmeter run` does once started
            try:
                _measure(node, built, res, iterations, scrapes)
            finally:
                gc.unfreeze()
                gc.set_threshold(*threshold)
                built.shutdown()
            if nvitop and gpus:
                LOG.info("  nvitop-exporter on the same fake GPUs")
                out = run_nvitop(node, iterations=max(5, iterations // 2), scrapes=scrapes)
                if isinstance(out, str):
                    res.missing["nvitop-exporter"] = out
                else:
                    res.nvitop = out
            if agent:
                LOG.info("  the agent (podmeter run) on the same node")
                receivers = {"cgroup": {"cgroup_root": node.cgroup_root}}
                if gpus:
                    receivers["nvml"] = {"library_path": node.nvml_lib}
                processors = {"k8sattributes": api.k8sattributes_config(NODE_NAME)} if api is not None else {}
                out = run_agent(node, api, {k: v for k, v in receivers.items() if k not in res.missing},
                                {k: v for k, v in processors.items() if k not in res.missing}, scrapes=scrapes)
                if isinstance(out, str):
                    res.missing["agent"] = out
                else:
                    res.agent = out
        finally:
            if api is not None:
                api.stop()
    return res


def _measure(node: SyntheticNode, built: Built, res: ScaleResult, iterations: int, scrapes: int) -> None:
    receivers = [(t, built.get(t)) for t in ("cgroup", "nvml") if built.get(t) is not None]
    k8s = built.get("k8sattributes")
    prom = built.get("prometheus")
    gpu_prom = built.get("prometheus/gpu")
    LOG.info("  in-process: %s", ", ".join(sorted(built.components)))

    batches = {}
    for type_, r in receivers:
        res.cpu[f"receiver/{type_}"] = cpu_per_call(r.collect, iterations)
        batches[type_] = r.collect()
        res.points[f"receiver/{type_}"] = count_points(batches[type_])
    batch = merge(batches.values())
    processed = batch
    if k8s is not None and receivers:
        res.cpu["processor/k8sattributes"] = cpu_per_call(lambda: k8s.process(batch), iterations)
        processed = k8s.process(batch) or batch
    if prom is not None and receivers:
        res.cpu["exporter/prometheus"] = cpu_per_call(lambda: prom.export(processed), iterations)
    if receivers:
        # the OTLP exporters' encoding of the same batch, beside opentelemetry-exporter-otlp's encoder
        encoder = Encoder()
        res.cpu["exporter/otlp: encode"] = cpu_per_call(lambda: encoder.requests(processed, OTLP_MAX_BYTES),
                                                        iterations)
        res.cpu["opentelemetry-exporter-otlp encode_metrics (same batch)"] = cpu_per_call(
            lambda: encode_metrics(processed).SerializeToString(), iterations)

    def end_to_end() -> None:
        # as the runtime runs it: each receiver's batch through the pipeline to the exporter
        for _t, r in receivers:
            data = r.collect()
            if k8s is not None:
                data = k8s.process(data) or data
            if prom is not None:
                prom.export(data)

    if receivers:
        res.cpu["end-to-end"] = cpu_per_call(end_to_end, iterations)
        res.points["end-to-end"] = count_points(batch)
    nvml = built.get("nvml")
    if nvml is not None:
        res.attribution = check_attribution(node, batches["nvml"], processed if k8s is not None else None)

        res.cpu[GPU_PIPELINE] = cpu_per_call(_gpu_pipeline(nvml, k8s, gpu_prom), iterations)
        if gpu_prom is not None and gpu_prom.port:
            s = scrape(f"http://127.0.0.1:{gpu_prom.port}/metrics", scrapes)
            res.gpu_scrape = {"latency": s.latency, "bytes": s.bytes_plain, "bytes_gzip": s.bytes_gzip,
                              "series": s.series}
    nvml_ds = built.get("nvml/daemonset")
    if nvml_ds is not None:
        res.cpu[GPU_PIPELINE_DAEMONSET] = cpu_per_call(
            _gpu_pipeline(nvml_ds, k8s, built.get("prometheus/gpu-daemonset")), iterations)
        res.points[GPU_PIPELINE_DAEMONSET] = count_points(nvml_ds.collect())
    if prom is not None and prom.port and receivers:
        end_to_end()
        s = scrape(f"http://127.0.0.1:{prom.port}/metrics", scrapes)
        res.scrape = {"latency": s.latency, "bytes": s.bytes_plain, "bytes_gzip": s.bytes_gzip, "series": s.series}

    if built.get("cgroup") is not None:
        _raw_floor(node, res, iterations)
        _model_floor(batches["cgroup"], res, iterations)
    res.rss_in_process = proc_rss_bytes()


def _gpu_pipeline(nvml, k8s, prom):
    """One collection of a GPU pipeline as the runtime runs it: nvml -> k8sattributes -> its own exporter."""

    def run() -> None:
        data = nvml.collect()
        if k8s is not None:
            data = k8s.process(data) or data
        if prom is not None:
            prom.export(data)

    return run


def _model_floor(batch, res: ScaleResult, iterations: int) -> None:
    """The data model's floor: making again every point, metric and resource entry of one cgroup batch with the
    constructors the receivers use, from values already at hand (nothing read, parsed or looked up). Whatever a
    receiver reads, handing the pipeline this many opentelemetry-sdk objects costs at least this much."""
    rows = []
    for rm in batch.resource_metrics:
        for sm in rm.scope_metrics:
            metrics = []
            for m in sm.metrics:
                data = m.data
                instrument = "gauge" if isinstance(data, Gauge) else "sum" if data.is_monotonic else "updowncounter"
                spec = MetricSpec(m.name, instrument, m.unit, m.description)
                metrics.append((spec, [(p.attributes, p.start_time_unix_nano, p.time_unix_nano, p.value)
                                       for p in data.data_points]))
            rows.append((rm.resource, sm.scope, metrics))
    res.model_metrics = sum(len(metrics) for _r, _s, metrics in rows)

    def build() -> None:
        MetricsData(resource_metrics=[
            ResourceMetrics(resource=resource, schema_url="", scope_metrics=[ScopeMetrics(
                scope=scope, schema_url="", metrics=[make_metric(spec, [number_point(*p) for p in points])
                                                     for spec, points in metrics])])
            for resource, scope, metrics in rows])

    res.model_floor = cpu_per_call(build, iterations)


def _raw_floor(node: SyntheticNode, res: ScaleResult, iterations: int) -> None:
    """The raw read of exactly the files one steady collection reads. The measured receiver keeps its files open
    (an audit hook sees no open after its first collection), so the paths come from a twin that keeps none, traced
    on its second collection (the first also reads the limits, which later ones read only every Nth time)."""
    twin_built = Built()
    twin = create(twin_built, "receiver", "cgroup", {"cgroup_root": node.cgroup_root, "proc_root": "/proc",
                                                     "max_open_files": 0})
    if twin is None:
        res.notes.append(f"raw read not measured: {twin_built.missing}")
        return
    twin.start(twin_built.host)
    try:
        twin.collect()
        with OpenTracer((node.cgroup_root, "/proc")) as tracer:
            twin.collect()
    finally:
        twin.shutdown()
    # files only: the twin also opens each pod's /proc/<pid> directory (O_PATH) and net/dev relative to it, which
    # the tracer sees without the directory
    paths = [p for p in dict.fromkeys(tracer.paths) if not os.path.isdir(p)]
    dirs = list(dict.fromkeys(tracer.listed))
    res.raw_files, res.raw_dirs = len(paths), len(dirs)
    files, listing, kept = raw_read(paths, dirs, iterations)
    res.raw["files"] = files
    res.raw["files+listing"] = listing
    res.raw["files kept open, pread"] = kept
    if len(paths) != len(tracer.paths):
        res.notes.append(f"the cgroup receiver opened {len(tracer.paths)} files for {len(paths)} distinct "
                         "paths in one collection")
