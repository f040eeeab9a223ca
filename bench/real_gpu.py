"""The nvml receiver on a real NVIDIA driver: what each NVML call answers there, what podmeter reports for real
GPU processes in pod-shaped cgroups, and its cost beside nvitop-exporter's on the same GPUs in the same run.

The tests and `make bench` run against the fake libnvidia-ml.so.1 (tests/harness/fake_nvml); this is the check for
a machine with the real driver. Run it as root (it makes pod-shaped cgroups) from the repository root:

    python -m bench.real_gpu --out DIR [--workload SECONDS] [--idle-procs N] [--iterations N]

With PyTorch importable, it starts GPU processes on GPU 0, each in its own pod-shaped cgroup: one busy with matrix
products and N (31) idle ones holding GPU memory, 32 in all, as one GPU of issue 10's 8 GPUs x 32 processes. Then:
the receiver in process (CPU per collection, with `energy` on and off, with `gpm` on and with `per_container` on, a
profile, the scrape), what GPM and the health calls (XID events, remapped rows, PCIe replays) answer and cost,
nvitop-exporter on the same processes, `podmeter run` with the nvml and cgroup receivers, and `podmeter collect` in
a PID namespace of its own (a pod without hostPID). It writes DIR/report.md (readable), DIR/report.json
(everything), DIR/metrics.txt (the agent's /metrics), DIR/telemetry.txt (its self-telemetry) and DIR/agent.log.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import importlib.util
import io
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

from harness import free_port
from prometheus_client import generate_latest

from podmeter.metrics import count_points
from receivers.nvml.gpm import GPM_METRICS, metrics_request
from receivers.nvml.receiver import TEMPERATURE_LIMITS
from receivers.nvml.xid import XID_CRITICAL

from . import REPO
from .components import Built, create, start_all
from .measure import cpu_per_call, proc_rss_bytes, scrape, wait_http
from .peers import run_nvitop

BUSY = textwrap.dedent("""
    import sys, time, torch
    end = time.time() + float(sys.argv[1])
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    print("ready", flush=True)
    while time.time() < end:
        for _ in range(20):
            y = x @ x
        torch.cuda.synchronize()
""")
# an idle GPU process made through the CUDA driver API alone: a context and 256 MiB, in a fraction of PyTorch's start
IDLE = textwrap.dedent("""
    import ctypes, sys, time
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx, mem = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    for rc in (cuda.cuInit(0), cuda.cuDeviceGet(ctypes.byref(dev), 0),
               cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), cuda.cuCtxSetCurrent(ctx),
               cuda.cuMemAlloc_v2(ctypes.byref(mem), 256 << 20)):
        if rc:
            sys.exit(f"CUDA error {rc}")
    print("ready", flush=True)
    time.sleep(float(sys.argv[1]))
""")


def _timed(fn, repeat: int) -> tuple[object, dict]:
    """`repeat` calls of fn: the last answer (or the NVMLError it raised), and the median wall time and this
    thread's CPU time per call in microseconds (a driver call may spin or sleep)."""
    import pynvml as N
    wall, cpu, answer = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            answer = fn()
        except N.NVMLError as exc:
            answer = exc
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return answer, {"us": round(statistics.median(wall) * 1e6, 1), "cpu_us": round(statistics.median(cpu) * 1e6, 1)}


def _call(fn, *args, repeat: int = 3) -> dict:
    """One NVML call: its answer (or its error's name and code), and its cost."""
    import pynvml as N
    answer, cost = _timed(lambda: fn(*args), repeat)
    if isinstance(answer, N.NVMLError):
        return {"error": str(answer), "code": answer.value, **cost}
    return {"value": _plain(answer), **cost}


def _plain(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, ctypes.Structure):
        return {name: _plain(getattr(v, name)) for name, *_ in v._fields_ if not name.startswith("_")}
    if isinstance(v, ctypes.Union):
        return None
    if type(v).__name__ == "nvmlFriendlyObject":  # how pynvml hands out the process lists
        return {k: _plain(x) for k, x in vars(v).items()}
    return v


def _size_query(handle, name: str, since: int) -> dict:
    """The first of pynvml's two calls, made directly: pynvml raises on any answer but INSUFFICIENT_SIZE, so an
    answer of SUCCESS with no samples would reach podmeter as an NVMLError of code 0."""
    import pynvml as N
    fn = N._nvmlGetFunctionPointer(name)
    count = ctypes.c_uint(0)
    ret = fn(handle, None, ctypes.byref(count), ctypes.c_ulonglong(since))
    return {"code": ret, "count": count.value}


def _gpm_metrics(h, seconds: float = 1.0) -> dict:
    """Two GPM samples of GPU `h` taken `seconds` apart, and what nvmlGpmMetricsGet makes of them for the metrics the
    receiver asks: {metric id: (its return code, its value)}."""
    import pynvml as N
    samples = [N.nvmlGpmSampleAlloc(), N.nvmlGpmSampleAlloc()]
    try:
        N.nvmlGpmSampleGet(h, samples[0])
        time.sleep(seconds)
        N.nvmlGpmSampleGet(h, samples[1])
        req = metrics_request(N, *samples)
        N.nvmlGpmMetricsGet(req)
        return {metric_id: (req.metrics[i].nvmlReturn, round(req.metrics[i].value, 2))
                for i, (metric_id, _, _) in enumerate(GPM_METRICS)}
    finally:
        for sample in samples:
            N.nvmlGpmSampleFree(sample)


def probe(label: str) -> dict:
    """Every NVML call the receiver makes, on every device, as the driver answers it now."""
    import pynvml as N
    out: dict = {"label": label, "system": {}, "devices": []}
    s = out["system"]
    s["driver"] = _call(N.nvmlSystemGetDriverVersion)
    s["nvml"] = _call(N.nvmlSystemGetNVMLVersion)
    s["cuda"] = _call(N.nvmlSystemGetCudaDriverVersion_v2)
    count = N.nvmlDeviceGetCount()
    now_us = int(time.time() * 1e6)
    for i in range(count):
        h = N.nvmlDeviceGetHandleByIndex(i)
        d: dict = {"index": i}
        for name, fn, args in (
                ("name", N.nvmlDeviceGetName, ()), ("uuid", N.nvmlDeviceGetUUID, ()),
                ("serial", N.nvmlDeviceGetSerial, ()), ("minor", N.nvmlDeviceGetMinorNumber, ()),
                ("pci_bus_id", lambda h: N.nvmlDeviceGetPciInfo(h).busId, ()),
                ("mig_mode", N.nvmlDeviceGetMigMode, ()), ("max_mig", N.nvmlDeviceGetMaxMigDeviceCount, ()),
                ("memory_v2", lambda h: N.nvmlDeviceGetMemoryInfo(h, version=N.nvmlMemory_v2), ()),
                ("utilization", N.nvmlDeviceGetUtilizationRates, ()),
                ("encoder", N.nvmlDeviceGetEncoderUtilization, ()), ("decoder", N.nvmlDeviceGetDecoderUtilization, ()),
                ("temperature", N.nvmlDeviceGetTemperature, (0,)), ("power_mw", N.nvmlDeviceGetPowerUsage, ()),
                ("power_limit_mw", N.nvmlDeviceGetEnforcedPowerLimit, ()),
                ("energy_mj", N.nvmlDeviceGetTotalEnergyConsumption, ()),
                ("clock_graphics_mhz", N.nvmlDeviceGetClockInfo, (0,)), ("clock_sm_mhz", N.nvmlDeviceGetClockInfo, (1,)),
                ("clock_memory_mhz", N.nvmlDeviceGetClockInfo, (2,)),
                ("clocks_event_reasons", N.nvmlDeviceGetCurrentClocksEventReasons, ()),
                ("ecc_corrected", N.nvmlDeviceGetTotalEccErrors, (0, 0)),
                ("ecc_uncorrected", N.nvmlDeviceGetTotalEccErrors, (1, 0)),
                ("pcie_tx_rx_bytes", lambda h: [(v.nvmlReturn, v.value.ullVal)
                                                for v in N.nvmlDeviceGetFieldValues(h, [197, 198])], ()),
                ("memory_temp_field_82", lambda h: [(v.nvmlReturn, v.valueType, v.value.uiVal)
                                                    for v in N.nvmlDeviceGetFieldValues(h, [82])], ()),
                ("nvlink_tx_rx_kib_link0_1", lambda h: [(v.nvmlReturn, v.value.ullVal) for v in
                                                        N.nvmlDeviceGetFieldValues(h, [(138, 0), (139, 0),
                                                                                       (138, 1), (139, 1)])], ()),
                ("remapped_rows", N.nvmlDeviceGetRemappedRows, ()),
                ("pcie_replays", N.nvmlDeviceGetPcieReplayCounter, ()),
                ("supported_event_types", N.nvmlDeviceGetSupportedEventTypes, ()),
                ("compute_processes_v3", N.nvmlDeviceGetComputeRunningProcesses_v3, ()),
                ("graphics_processes_v3", N.nvmlDeviceGetGraphicsRunningProcesses_v3, ()),
                ("mps_processes_v3", N.nvmlDeviceGetMPSComputeRunningProcesses_v3, ()),
                ("process_utilization_10s", N.nvmlDeviceGetProcessUtilization, (now_us - 10_000_000,)),
                ("processes_utilization_info_10s", N.nvmlDeviceGetProcessesUtilizationInfo,
                 (now_us - 10_000_000,))):
            d[name] = _call(fn, h, *args)
        d["temperature_thresholds"] = {name: _call(N.nvmlDeviceGetTemperatureThreshold, h, kind)
                                       for kind, name, _spec, _limit in TEMPERATURE_LIMITS}
        d["gpm_support"] = _call(N.nvmlGpmQueryDeviceSupport, h)
        d["gpm_metrics_1s"] = _call(_gpm_metrics, h, repeat=1)
        for since, tag in ((0, "all"), (now_us - 10_000_000, "10s"), (now_us + 60_000_000, "future")):
            d[f"process_utilization_size_query_{tag}"] = _size_query(h, "nvmlDeviceGetProcessUtilization", since)
        out["devices"].append(d)
    return out


def costs(repeat: int = 10) -> dict:
    """What the driver costs per call on GPU 0 (median of `repeat`, wall and CPU microseconds) for the calls the
    receiver makes each collection, beside the alternatives NVML offers for the same figures."""
    import pynvml as N
    h = N.nvmlDeviceGetHandleByIndex(0)
    now_us = int(time.time() * 1e6)
    detail = getattr(N, "nvmlDeviceGetRunningProcessDetailList", None)
    calls = {
        "energy: nvmlDeviceGetTotalEnergyConsumption": lambda: N.nvmlDeviceGetTotalEnergyConsumption(h),
        "energy: field 83": lambda: N.nvmlDeviceGetFieldValues(h, [83]),
        "pcie: fields 197,198": lambda: N.nvmlDeviceGetFieldValues(h, [197, 198]),
        "pcie+energy: fields 197,198,83": lambda: N.nvmlDeviceGetFieldValues(h, [197, 198, 83]),
        "pcie+memory temperature: fields 82,197,198": lambda: N.nvmlDeviceGetFieldValues(h, [82, 197, 198]),
        "power: nvmlDeviceGetPowerUsage": lambda: N.nvmlDeviceGetPowerUsage(h),
        "health: nvmlDeviceGetRemappedRows": lambda: N.nvmlDeviceGetRemappedRows(h),
        "health: nvmlDeviceGetPcieReplayCounter": lambda: N.nvmlDeviceGetPcieReplayCounter(h),
        "utilization: nvmlDeviceGetUtilizationRates": lambda: N.nvmlDeviceGetUtilizationRates(h),
        "memory: nvmlDeviceGetMemoryInfo v2": lambda: N.nvmlDeviceGetMemoryInfo(h, version=N.nvmlMemory_v2),
        "processes: compute v3": lambda: N.nvmlDeviceGetComputeRunningProcesses_v3(h),
        "processes: graphics v3": lambda: N.nvmlDeviceGetGraphicsRunningProcesses_v3(h),
        "processes: mps v3": lambda: N.nvmlDeviceGetMPSComputeRunningProcesses_v3(h),
        "process utilization: last 10 s": lambda: N.nvmlDeviceGetProcessUtilization(h, now_us - 10_000_000),
        "process utilization: newer than now": lambda: N.nvmlDeviceGetProcessUtilization(h, int(time.time() * 1e6)),
    }
    if detail is not None:
        for mode, label in ((0, "compute"), (1, "graphics"), (2, "mps"), (3, "all")):
            calls[f"processes: detail list {label}"] = (
                lambda mode=mode: detail(h, N.nvmlProcessDetailList_v1, mode))
    events = None
    try:
        events = N.nvmlEventSetCreate()
        N.nvmlDeviceRegisterEvents(h, XID_CRITICAL, events)
    except N.NVMLError as exc:
        calls["health: XID event set"] = lambda exc=exc: exc  # why there are no XID events here
    if events is not None:
        calls["health: nvmlEventSetWait_v2, nothing queued"] = lambda: N.nvmlEventSetWait_v2(events, 0)
    gpm: list = []
    try:
        gpm = [N.nvmlGpmSampleAlloc(), N.nvmlGpmSampleAlloc()]
        N.nvmlGpmSampleGet(h, gpm[0])
    except N.NVMLError as exc:
        calls["gpm: a first sample"] = lambda exc=exc: exc  # no GPM here: why, in the table
    if len(gpm) == 2:
        req = metrics_request(N, *gpm)
        calls["gpm: nvmlGpmSampleGet"] = lambda: N.nvmlGpmSampleGet(h, gpm[1]) and "sample"
        calls["gpm: nvmlGpmMetricsGet of two samples"] = lambda: N.nvmlGpmMetricsGet(req).numMetrics
    out = {}
    try:
        for name, fn in calls.items():
            v, cost = _timed(fn, repeat)
            if isinstance(v, N.NVMLError):
                answer = f"{v} ({v.value})"
            elif isinstance(v, ctypes.Array):  # field values: each field has its own answer
                answer = [(f.nvmlReturn, f.value.ullVal) for f in v]
            else:
                answer = len(v) if isinstance(v, list) else str(v)[:100]
            out[name] = {**cost, "answer": answer}
    finally:
        for sample in gpm:
            N.nvmlGpmSampleFree(sample)
        if events is not None:
            N.nvmlEventSetFree(events)
    return out


def start_mps() -> tuple[dict, str]:
    """NVIDIA's MPS control daemon (`nvidia-cuda-mps-control -d`, as the device plugin's MPS sharing runs it), with
    its pipe and log directories; (the environment its clients need, what went wrong)."""
    daemon = shutil.which("nvidia-cuda-mps-control")
    if daemon is None:
        return {}, "nvidia-cuda-mps-control is not on the PATH"
    base = tempfile.mkdtemp(prefix="podmeter-mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": f"{base}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{base}/log"}
    for d in env.values():
        os.makedirs(d)
    run = subprocess.run([daemon, "-d"], env=dict(os.environ, **env), capture_output=True, text=True, timeout=30)
    return env, "" if run.returncode == 0 else f"MPS daemon: rc {run.returncode} {run.stderr[-500:]}"


def stop_mps(env: dict, outdir: str) -> None:
    """Stop the daemon; its log is kept in `outdir`, its directories removed."""
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=dict(os.environ, **env), capture_output=True,
                   text=True, timeout=30)
    log = os.path.join(env["CUDA_MPS_LOG_DIRECTORY"], "control.log")
    if os.path.exists(log):
        shutil.copy(log, os.path.join(outdir, "mps-control.log"))
    shutil.rmtree(os.path.dirname(env["CUDA_MPS_LOG_DIRECTORY"]), ignore_errors=True)


def start_workloads(seconds: float, idle: int, extra_env: dict | None = None) -> tuple[list, list[dict], str]:
    """On GPU 0, one process busy with PyTorch matrix products and `idle` processes holding memory, each in its own
    pod-shaped cgroup; ([PodCgroup], [{role, pid, pod_uid, container_id}], what went wrong)."""
    from harness.cgroups import PodCgroup
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # PyTorch with its own packages
    env["CUDA_VISIBLE_DEVICES"] = "0"
    env.update(extra_env or {})
    pods, procs = [], []
    for role, code in [("busy", BUSY)] + [("idle", IDLE)] * idle:
        pod = PodCgroup().create()
        pods.append(pod)
        try:
            procs.append((role, pod, pod.spawn([sys.executable, "-c", code, str(seconds)], env=env,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        except OSError as exc:
            return pods, [], f"cannot start a {role} workload: {exc}"
    started, problems = [], []
    for role, pod, proc in procs:  # started together; each says "ready" once its GPU memory is allocated
        line = proc.stdout.readline().strip()
        if line != "ready":
            problems.append(f"a {role} workload did not start: {line} {proc.stdout.read()[-800:]}")
            continue
        started.append({"role": role, "pid": proc.pid, "pod_uid": pod.uid, "container_id": pod.container_id})
    return pods, started, "; ".join(problems[:3])


def in_process(iterations: int, scrapes: int, **nvml_config) -> dict:
    """The nvml receiver and the prometheus exporter built as the runtime builds them: CPU per collection, the
    scrape, and the receiver's own error counts."""
    built = Built()
    pending = []
    for kind, type_, cfg in (("exporter", "prometheus", {"endpoint": f"127.0.0.1:{free_port()}"}),
                             ("receiver", "nvml", {"collection_interval": "10s", **nvml_config})):
        comp = create(built, kind, type_, cfg)
        if comp is not None:
            pending.append((kind, type_, comp))
    start_all(built, pending)
    nvml, prom = built.get("nvml"), built.get("prometheus")
    out: dict = {"missing": built.missing}
    if nvml is None or prom is None:
        built.shutdown()
        return out
    try:
        first = nvml.collect()
        time.sleep(1.0)  # let the driver gather utilization samples for the next collections
        cpu = cpu_per_call(nvml.collect, iterations)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(iterations):
            nvml.collect()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        out["profile"] = text.getvalue().splitlines()
        pipeline = cpu_per_call(lambda: prom.export(nvml.collect()), iterations)
        prom.export(nvml.collect())
        s = scrape(f"http://127.0.0.1:{prom.port}/metrics", scrapes)
        out.update(cpu_collect=cpu.as_dict(), cpu_collect_export=pipeline.as_dict(),
                   scrape={"latency": s.latency.as_dict(), "bytes": s.bytes_plain, "series": s.series},
                   first_points=count_points(first),
                   rss=proc_rss_bytes(),
                   errors=[line for line in generate_latest(built.telemetry.registry).decode().splitlines()
                           if line.startswith("podmeter_component_errors")])
    finally:
        built.shutdown()
    return out


def _config(outdir: str, name: str, text: str) -> str:
    """`text` as <outdir>/<name>.yaml, kept with the results as a record of what ran; its path."""
    path = os.path.join(outdir, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def run_agent(outdir: str, seconds: float) -> dict:
    """The agent itself (`podmeter run`) with nvml and cgroup receivers: its /metrics and self-telemetry."""
    port, tport = free_port(), free_port()
    config = _config(outdir, "agent", f"""
        receivers:
          nvml: {{collection_interval: 1s, gpm: true}}
          cgroup: {{collection_interval: 2s}}
        exporters:
          prometheus: {{endpoint: "127.0.0.1:{port}"}}
        service:
          telemetry: {{metrics: {{address: "127.0.0.1:{tport}"}}}}
          pipelines:
            metrics: {{receivers: [nvml, cgroup], exporters: [prometheus]}}
    """)
    log = open(os.path.join(outdir, "agent.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "podmeter.cli", "run", "--config", config], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    out: dict = {}
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        out["up"] = wait_http(url, 60)
        time.sleep(seconds)
        for name, u in (("metrics.txt", url), ("telemetry.txt", f"http://127.0.0.1:{tport}/metrics")):
            try:
                body = urllib.request.urlopen(u, timeout=10).read()
            except OSError as exc:
                body = f"# could not scrape {u}: {exc}\n".encode()
            with open(os.path.join(outdir, name), "wb") as f:
                f.write(body)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out["exit"] = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit"] = "killed after 30 s"
        log.close()
    return out


def pid_namespace(outdir: str, workloads: list[dict]) -> dict:
    """What the driver lists to an agent in its own PID namespace (a pod without hostPID): `podmeter collect --once`
    under `unshare --pid --mount-proc` beside one CUDA process of its own namespace, once with that namespace's
    /proc and once with the host's /proc as proc_root; which PIDs it reports and which pods they are attributed to."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return {"skipped": "needs root and unshare"}
    host_proc = tempfile.mkdtemp(prefix="podmeter-host-proc-")
    subprocess.run(["mount", "--bind", "/proc", host_proc], check=True)
    out: dict = {"host_pids": {str(w["pid"]): w["pod_uid"] for w in workloads}}
    try:
        for label, name, proc_root in (("own /proc", "pidns-own-proc", "/proc"),
                                       ("host /proc as proc_root", "pidns-host-proc", host_proc)):
            config = _config(outdir, name, f"""
                receivers:
                  nvml: {{proc_root: "{proc_root}"}}
                exporters:
                  debug: {{}}
                service:
                  pipelines:
                    metrics: {{receivers: [nvml], exporters: [debug]}}
            """)
            idle = f"env -u PYTHONPATH CUDA_VISIBLE_DEVICES=0 {sys.executable} -c '{IDLE}' 60"
            script = (f"{idle} > /dev/null & sleep 4; {sys.executable} -m podmeter.cli collect --once "
                      f"--format otlp-json --log-level warning --config {config}; rc=$?; kill %1 2>/dev/null; exit $rc")
            run = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script], cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
            found = []
            try:
                for rm in json.loads(run.stdout[run.stdout.index("{"):]).get("resourceMetrics", []):
                    attrs = {a["key"]: next(iter(a["value"].values())) for a in rm["resource"].get("attributes", [])}
                    if "process.pid" in attrs:
                        found.append({k: attrs.get(k) for k in ("process.pid", "k8s.pod.uid",
                                                                 "process.executable.name")})
            except ValueError as exc:
                found = [f"no output to read: {exc}"]
            out[label] = {"rc": run.returncode, "processes": found, "log": run.stderr[-1500:]}
    finally:
        if subprocess.run(["umount", host_proc], check=False).returncode == 0:
            os.rmdir(host_proc)
    return out


def report_md(r: dict) -> str:
    def without_profile(key: str) -> str:
        return json.dumps({k: v for k, v in r.get(key, {}).items() if k != "profile"}, indent=1)

    lines = ["# nvml receiver on a real driver", ""]
    for p in r["probes"]:
        lines += [f"## NVML answers: {p['label']}", "", f"system: {json.dumps(p['system'], default=str)}", ""]
        for d in p["devices"]:
            lines.append(f"### GPU {d['index']}")
            for k, v in d.items():
                if k != "index":
                    lines.append(f"- `{k}`: {json.dumps(v, default=str)[:600]}")
            lines.append("")
    lines += ["## Driver cost per call on GPU 0, with the workloads running (median)", "",
              "| call | wall µs | CPU µs | answer |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['us']} | {v['cpu_us']} | {v['answer']} |" for k, v in r.get("costs", {}).items()]
    lines += ["", "## Workloads", "", json.dumps({"mps": r.get("mps"), **(r.get("workloads") or {})}, indent=1), "",
              "## In process (nvml receiver + prometheus exporter)", "",
              without_profile("in_process"), "",
              "```", *r.get("in_process", {}).get("profile", []), "```", "",
              "## The same with `energy: false`", "",
              without_profile("in_process_without_energy"), "",
              "## The same with `gpm: true`", "",
              without_profile("in_process_with_gpm"), "",
              "## The same with `per_container: true` (as the shipped DaemonSet configuration)", "",
              without_profile("in_process_per_container"), "",
              "## nvitop-exporter on the same GPUs", "", json.dumps(r.get("nvitop"), indent=1), "",
              "## Agent", "", json.dumps(r.get("agent"), indent=1), "",
              "## In its own PID namespace (no hostPID)", "", json.dumps(r.get("pid_namespace"), indent=1), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workload", type=float, default=120.0, help="seconds the PyTorch workloads run (0: none)")
    ap.add_argument("--idle-procs", type=int, default=31, help="idle GPU processes beside the busy one")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--agent-seconds", type=float, default=12.0)
    ap.add_argument("--mps", action="store_true", help="run the workloads as clients of an MPS daemon started here")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import pynvml as N
    N.nvmlInit()
    r: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "probes": [probe("before workloads")]}
    pods, mps_env = [], {}
    try:
        if args.mps:
            mps_env, why = start_mps()
            r["mps"] = {"env": mps_env, "problem": why}
        if args.workload > 0:
            if importlib.util.find_spec("torch") is not None:  # not imported here: its size is not podmeter's
                pods, started, why = start_workloads(args.workload, args.idle_procs, mps_env)
            else:
                started, why = [], "PyTorch is not importable: no workloads"
            r["workloads"] = {"started": started, "problem": why}
            time.sleep(3.0)  # some utilization samples
            r["probes"].append(probe("with the workloads running"))
        r["costs"] = costs()
        steps = (("in_process", lambda: in_process(args.iterations, 20)),
                 ("in_process_without_energy", lambda: in_process(args.iterations, 20, energy=False)),
                 ("in_process_with_gpm", lambda: in_process(args.iterations, 20, gpm=True)),
                 # as the shipped DaemonSet configuration: per-container series beside the per-process ones
                 ("in_process_per_container", lambda: in_process(args.iterations, 20, per_container=True)),
                 ("nvitop", lambda: _nvitop(args.iterations)),
                 ("pid_namespace", lambda: pid_namespace(args.out, r.get("workloads", {}).get("started", []))),
                 ("agent", lambda: run_agent(args.out, args.agent_seconds)))
        for key, step in steps:
            t0 = time.monotonic()
            try:
                r[key] = step()
            except Exception as exc:  # noqa: BLE001 - one step's failure is recorded; the others still run
                r[key] = {"failed": f"{type(exc).__name__}: {exc}"}
            print(f"{key}: {time.monotonic() - t0:.1f} s", flush=True)
    finally:
        for pod in pods:
            pod.destroy()
        if mps_env:
            stop_mps(mps_env, args.out)
        N.nvmlShutdown()
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(r, f, indent=1, default=str)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(report_md(r))
    return 0


def _nvitop(iterations: int) -> dict | str:
    class RealGPUs:  # what run_nvitop needs of a synthetic node: the real driver instead of the fake one
        workdir = "/tmp"

        @staticmethod
        def nvml_env() -> dict:
            return dict(os.environ)

    res = run_nvitop(RealGPUs(), iterations=iterations)
    if isinstance(res, str):
        return res
    return {"version": res.version, "cpu_total": res.cpu_total.as_dict(), "cpu_devices": res.cpu_devices.as_dict(),
            "scrape_latency": res.scrape.latency.as_dict(), "scrape_bytes": res.scrape.bytes_plain, "rss": res.rss}


if __name__ == "__main__":
    sys.exit(main())
